"""Named model sizes, timm-style: ``vit_{tiny,small,base}_patch{P}_{2d,3d}``.

The encoder widths are timm's ViT-Ti/S/B. The MAE decoders for ViT-B follow the paper
(2D: dim 256, depth 8, 8 heads; 3D: dim 384, depth 8, 12 heads); tiny and small get lighter ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int


_ENCODERS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
_DECODERS = {
    ("tiny", 2): (128, 4, 4),
    ("tiny", 3): (128, 4, 4),
    ("small", 2): (256, 4, 8),
    ("small", 3): (256, 4, 8),
    ("base", 2): (256, 8, 8),
    ("base", 3): (384, 8, 12),
}
_NAME = re.compile(r"^vit_(tiny|small|base)_patch(\d+)_([23])d$")

MODEL_NAMES: tuple[str, ...] = tuple(
    f"vit_{size}_patch16_{dims}d" for dims in (2, 3) for size in ("tiny", "small", "base")
)


def parse_model_name(name: str) -> tuple[ModelSize, int, int]:
    """``vit_base_patch16_3d`` -> (its ModelSize, patch size 16, spatial dims 3)."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(
            f"unknown model name {name!r}: expected vit_{{tiny,small,base}}_patch{{P}}_{{2d,3d}}, "
            f"e.g. {', '.join(MODEL_NAMES[:3])}"
        )
    size, patch, dims = match.group(1), int(match.group(2)), int(match.group(3))
    if patch < 2:
        raise ValueError(f"patch size in {name!r} must be at least 2")
    return ModelSize(*_ENCODERS[size], *_DECODERS[(size, dims)]), patch, dims
