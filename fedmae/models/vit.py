"""Vision Transformer encoder for 2D and 3D images, built on timm's transformer blocks.

One class serves pre-training and fine-tuning so that their state-dict keys are identical: the MAE
encoder loads into a fine-tune model without a key map. The position table is a fixed sin-cos
table during pre-training and becomes a learnable parameter for fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from fedmae.models.pos_embed import sincos_pos_embed

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, via a strided convolution (2D or 3D)."""

    def __init__(self, spatial_dims: int, in_channels: int, img_size: Sequence[int], patch_size: int, embed_dim: int):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(img_size) != spatial_dims or any(s % patch_size for s in img_size):
            raise ValueError(f"img_size {list(img_size)} must have {spatial_dims} sides divisible by patch {patch_size}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = tuple(s // patch_size for s in img_size)
        self.num_patches = math.prod(self.grid_size)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        x = self.proj(x)  # (B, D, *grid)
        return x.flatten(2).transpose(1, 2)  # (B, L, D), tokens in row-major grid order

    def patch_values(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, L, C * p^d): each patch's values in the order of the projection's
        weights (C, p, ..., p), tokens in the same row-major grid order as :meth:`forward`."""
        self._check(x)
        p, d = self.patch_size, self.spatial_dims
        batch, channels = x.shape[:2]
        x = x.reshape(batch, channels, *[n for g in self.grid_size for n in (g, p)])  # (B, C, g1, p, g2, p[, g3, p])
        order = [0, *range(2, 2 + 2 * d, 2), 1, *range(3, 3 + 2 * d, 2)]  # -> (B, g1, g2[, g3], C, p, p[, p])
        return x.permute(order).reshape(batch, self.num_patches, channels * p**d)

    def project(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N, C * p^d) patch values -> (B, N, D) tokens: the convolution of :meth:`forward`
        applied to just these patches, as one matrix product."""
        return nn.functional.linear(values, self.proj.weight.flatten(1), self.proj.bias)

    def _check(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, *self.img_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")


class ViTEncoder(nn.Module):
    """ViT encoder: patch embedding, cls token, position table, timm blocks, final LayerNorm.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT/X-ray, 4 for BraTS MRI).
        img_size: input size per spatial axis; each side divisible by ``patch_size``.
        patch_size: isotropic patch side.
        embed_dim, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        drop_path_rate: stochastic depth at the last block (linearly increasing), for fine-tuning.
        learnable_pos_embed: False in pre-training (fixed sin-cos), True when fine-tuning.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        img_size: Sequence[int],
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        learnable_pos_embed: bool = False,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_embed = PatchEmbed(spatial_dims, in_channels, img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_pos_embed(embed_dim, self.patch_embed.grid_size, cls_token=True),  # (1, 1 + L, D)
            requires_grad=learnable_pos_embed,
        )
        drop_path = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path[i], norm_layer=LayerNorm)
            for i in range(depth)
        )
        self.norm = LayerNorm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation: the patch projection as a linear layer (xavier), small cls token.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks.apply(init_linear_and_norm)
        init_linear_and_norm(self.norm)

    @property
    def grid_size(self) -> tuple[int, ...]:
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> patch tokens with their position embedding, (B, L, D); no cls token."""
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def prepend_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, 1 + N, D) with the position-embedded cls token first."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def forward_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run every block then the final norm on a token sequence (any length)."""
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> normalised tokens (B, 1 + L, D), cls first."""
        return self.forward_blocks(self.prepend_cls(self.embed_patches(x)))

    def forward_intermediates(
        self, x: torch.Tensor, indices: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final normalised patch tokens (B, L, D) and the patch tokens after each 1-based block in ``indices``."""
        wanted = set(indices)
        if any(not 1 <= i <= self.depth for i in wanted):
            raise ValueError(f"block indices must be in 1..{self.depth}, got {sorted(wanted)}")
        tokens = self.prepend_cls(self.embed_patches(x))
        intermediates = []
        for number, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if number in wanted:
                intermediates.append(tokens[:, 1:, :])  # drop cls: (B, L, D)
        return self.norm(tokens)[:, 1:, :], intermediates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def init_linear_and_norm(module: nn.Module) -> None:
    """MAE/timm initialisation for transformer layers: xavier-uniform linears, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def tokens_to_grid(tokens: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
    """(B, L, D) patch tokens -> (B, D, *grid) feature map (inverse of PatchEmbed's flatten)."""
    batch, length, dim = tokens.shape
    if length != math.prod(grid_size):
        raise ValueError(f"{length} tokens do not fill a grid of {list(grid_size)}")
    return tokens.transpose(1, 2).reshape(batch, dim, *grid_size)  # (B, D, *grid)
