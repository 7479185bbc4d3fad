"""Fixed sin-cos position embeddings for 2D and 3D token grids.

MAE pre-training uses a fixed (not learned) sin-cos table so the encoder and decoder agree on
where each visible token sits; fine-tuning starts from the same table and lets it learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 1D positions: (N,) -> (N, dim), dim even (half sin, half cos)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed(embed_dim: int, grid_size: Sequence[int], cls_token: bool = True) -> torch.Tensor:
    """Sin-cos position table for an N-D grid of tokens in row-major (patchify) order.

    Each axis gets ``embed_dim // (2 * ndim)`` frequencies (the paper's 3D version: dim/6 per axis);
    any remainder of channels is zero-padded. Returns (1, [1 +] prod(grid_size), embed_dim) with a
    zero row for the cls token first.
    """
    ndim = len(grid_size)
    per_axis = (embed_dim // (2 * ndim)) * 2
    if per_axis == 0:
        raise ValueError(f"embed_dim {embed_dim} is too small for a {ndim}-D sin-cos position embedding")
    coords = torch.meshgrid(*[torch.arange(n) for n in grid_size], indexing="ij")
    parts = [sincos_1d(per_axis, c.reshape(-1)) for c in coords]  # ndim × (L, per_axis)
    table = torch.cat(parts, dim=1)  # (L, ndim * per_axis)
    pad = embed_dim - table.shape[1]
    if pad:
        table = torch.cat([table, table.new_zeros(table.shape[0], pad)], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.float().unsqueeze(0)
