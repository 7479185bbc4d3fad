"""Fitting a foreign encoder (under fedmae's names, at its own geometry) to the configured model.

What can be fitted is, with a note: the position table resampled to the model's token grid
(bicubic in 2-D, trilinear in 3-D, as MAE and timm resample), the patch embedding's channels
(an RGB embedding summed to grey, timm's rule otherwise), a missing qkv bias (zeros: the same
function), a missing cls token (zeros, with a warning: the features then differ). What cannot is
refused in one line naming the setting to change: the width, the depth, the MLP width, the patch
size, 2-D against 3-D. The number of attention heads is not in the weights; the config's is used.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from fedmae.interop.formats import InteropError
from fedmae.interop.keymaps import SourceEncoder
from fedmae.models.state import check_state_fits
from fedmae.models.vit import ViTEncoder

REQUIRED = {"patch_embed.proj.weight": "patch embedding", "pos_embed": "position table", "norm.weight": "final norm"}


def fit_encoder(source: SourceEncoder, target: ViTEncoder,
                origin: str) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """``source``'s weights fitted to ``target`` (keys and shapes exactly ``target``'s), the notes
    on what was changed, and warnings on what changes the encoder's function."""
    weights = {k: v.float() if v.is_floating_point() else v for k, v in source.weights.items()}
    notes, warnings = list(source.notes), []
    for key, what in REQUIRED.items():
        if key not in weights:
            raise InteropError(f"{origin}: its encoder has no {what} ({key}), which fedmae's needs")
    _check_architecture(weights, target, origin)
    for block in range(target.depth):
        qkv = f"blocks.{block}.attn.qkv"
        if f"{qkv}.weight" in weights and f"{qkv}.bias" not in weights:
            weights[f"{qkv}.bias"] = torch.zeros(weights[f"{qkv}.weight"].shape[0])
            _once(notes, "no qkv bias (trained with qkv_bias=False): zero biases, the same function")
    if "cls_token" not in weights:
        weights["cls_token"] = torch.zeros(1, 1, target.embed_dim)
        warnings.append("it has no cls token (e.g. a MONAI ViT with classification=False, as UNETR builds it): "
                        "fedmae's encoder gets a zero one, so its tokens differ from the original model's until "
                        "fine-tuned")
    proj = weights["patch_embed.proj.weight"]
    weights["patch_embed.proj.weight"], note = fit_channels(proj, target.patch_embed.in_channels)
    if note:
        notes.append(note)
    weights["pos_embed"], note = fit_position_table(weights["pos_embed"], source.pos_cls_row, source.grid,
                                                    target.grid_size, origin)
    if note:
        notes.append(note)
    check_state_fits(target, weights, f"the encoder of {origin}")
    return weights, notes, warnings


def _check_architecture(weights: dict[str, torch.Tensor], target: ViTEncoder, origin: str) -> None:
    """What no resampling can change: 2-D or 3-D, width, patch size, depth, MLP width."""
    proj = weights["patch_embed.proj.weight"]  # (D, C, p, p[, p])
    dims, width, patch = proj.ndim - 2, proj.shape[0], tuple(proj.shape[2:])
    embed = target.patch_embed
    if dims != embed.spatial_dims:
        raise InteropError(f"{origin}: a {dims}-D encoder cannot start a {embed.spatial_dims}-D model; choose a "
                           f"model.name ending in _{dims}d")
    if width != target.embed_dim:
        raise InteropError(f"{origin}: its encoder is {width} wide, the model {target.embed_dim}: set model.embed_dim: "
                           f"{width} (and model.num_heads to the heads it was trained with)")
    if patch != (embed.patch_size,) * dims:
        raise InteropError(f"{origin}: its patches are {'x'.join(map(str, patch))}, the model's {embed.patch_size}: "
                           f"choose the model.name with patch{patch[0]}" + ("" if len(set(patch)) == 1 else
                                                                             " (fedmae's patches are isotropic)"))
    blocks = sorted({int(m[1]) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))})
    if len(blocks) != target.depth:
        raise InteropError(f"{origin}: its encoder has {len(blocks)} blocks, the model {target.depth}: set "
                           f"model.depth: {len(blocks)}")
    hidden = weights.get("blocks.0.mlp.fc1.weight")
    wanted = target.blocks[0].mlp.fc1.out_features
    if hidden is not None and hidden.shape[0] != wanted:
        raise InteropError(f"{origin}: its MLPs are {hidden.shape[0]} wide, the model's {wanted}: set model.mlp_ratio: "
                           f"{hidden.shape[0] / width:g}")


def fit_channels(weight: torch.Tensor, channels: int) -> tuple[torch.Tensor, str | None]:
    """A patch embedding (D, C, *p) for ``channels`` input channels. To one channel: the sum over
    channels (a grey image repeated in every channel gives the same tokens); otherwise the channels
    repeated in turn and scaled by C / channels (timm's rule: an image whose channels are equal
    gives the same tokens when the source had one channel)."""
    source = weight.shape[1]
    if source == channels:
        return weight, None
    if channels == 1:
        note = f"patch embedding of {source} channels summed to 1 channel (a grey image shown in {source} channels " \
               "gives the same tokens)"
        return weight.sum(dim=1, keepdim=True), note
    repeats = math.ceil(channels / source)
    fitted = weight.repeat(1, repeats, *[1] * (weight.ndim - 2))[:, :channels] * (source / channels)
    return fitted, (f"patch embedding of {source} channel(s) repeated over {channels} channels and scaled by "
                    f"{source}/{channels} (timm's rule)")


def fit_position_table(table: torch.Tensor, cls_row: bool | None, grid: Sequence[int] | None,
                       target_grid: Sequence[int], origin: str) -> tuple[torch.Tensor, str | None]:
    """A (1, n, D) position table as fedmae's (1, 1 + L, D) for ``target_grid``: a zero cls row
    added where the source has none (it added no position to its cls token), the patch rows
    resampled when the grids differ. ``grid``: the source's, when known; else the target's if
    the count matches, else the square / cube the count makes."""
    dims, length = len(target_grid), math.prod(target_grid)
    rows = table.shape[1]
    if cls_row is None:  # timm: a cls row unless no_embed_class; tell by the count
        if grid is not None:
            cls_row = rows == math.prod(grid) + 1
        elif rows in (length, length + 1):
            cls_row = rows == length + 1
        else:
            cls_row = _side(rows - 1, dims) is not None
    cls = table[:, :1] if cls_row else table.new_zeros(1, 1, table.shape[2])
    patches = table[:, 1:] if cls_row else table  # (1, L_source, D)
    source_grid = tuple(grid) if grid is not None else _grid_of(patches.shape[1], dims, tuple(target_grid), origin)
    if math.prod(source_grid) != patches.shape[1]:
        raise InteropError(f"{origin}: its position table has {patches.shape[1]} patch rows, not the "
                           f"{math.prod(source_grid)} of its grid {list(source_grid)}")
    note = None
    if source_grid != tuple(target_grid):
        patches = resample_positions(patches, source_grid, target_grid)
        note = (f"position table resampled from a {'x'.join(map(str, source_grid))} grid to "
                f"{'x'.join(map(str, target_grid))} ({'bicubic' if dims == 2 else 'trilinear'})")
    return torch.cat([cls, patches], dim=1), note


def resample_positions(patches: torch.Tensor, grid: Sequence[int], target_grid: Sequence[int]) -> torch.Tensor:
    """(1, L, D) rows in row-major grid order -> (1, L', D) for ``target_grid``."""
    width = patches.shape[2]
    volume = patches.reshape(1, *grid, width).movedim(-1, 1)  # (1, D, *grid)
    mode = "bicubic" if len(grid) == 2 else "trilinear"
    volume = F.interpolate(volume.float(), size=tuple(target_grid), mode=mode, align_corners=False)  # (1, D, *target)
    return volume.flatten(2).transpose(1, 2).to(patches.dtype)  # (1, L', D)


def _grid_of(count: int, dims: int, target_grid: tuple[int, ...], origin: str) -> tuple[int, ...]:
    if count == math.prod(target_grid):
        return target_grid
    side = _side(count, dims)
    if side is None:
        shape = "square" if dims == 2 else "cube"
        raise InteropError(f"{origin}: its {count} position rows are neither the model's grid {list(target_grid)} nor "
                           f"a {shape}, so their grid is unknown; use a model.img_size with that many patches")
    return (side,) * dims


def _side(count: int, dims: int) -> int | None:
    side = round(count ** (1 / dims)) if count > 0 else 0
    return side if side > 0 and side**dims == count else None


def _once(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)
