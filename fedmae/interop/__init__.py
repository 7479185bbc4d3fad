"""Weights in and out of fedmae: foreign encoders to start from (timm, facebookresearch/mae,
MONAI, SelfMedMAE, fedmae safetensors) and fedmae encoders for timm, MONAI or as safetensors with
a model card. ``docs/interop.md`` says what each format holds and how it maps.

| module | owns |
|---|---|
| ``formats.py`` | the format names and the ``FORMAT:FILE`` spelling (no torch: the config reads it) |
| ``keymaps.py`` | state-dict names, foreign <-> fedmae, every key accounted for |
| ``adapt.py`` | fitting a foreign encoder to the configured model (grid, channels) or refusing in one line |
| ``foreign.py`` | reading a file (weights only), detecting its format, :func:`import_encoder` |
| ``export.py`` | ``fedmae export`` |
| ``model_card.py`` | the JSON card beside an exported encoder |

Names are imported on first use, so that reading a config does not import torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fedmae.interop.formats import FORMATS, InteropError, split_encoder_spec

_LAZY = {
    "ImportedEncoder": "fedmae.interop.foreign",
    "import_encoder": "fedmae.interop.foreign",
    "import_encoder_for": "fedmae.interop.foreign",
    "is_fedmae_checkpoint": "fedmae.interop.foreign",
    "export_encoder": "fedmae.interop.export",
    "TARGETS": "fedmae.interop.export",
}

if TYPE_CHECKING:
    from fedmae.interop.export import TARGETS, export_encoder
    from fedmae.interop.foreign import ImportedEncoder, import_encoder, import_encoder_for, is_fedmae_checkpoint


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedmae.interop' has no attribute {name!r}")


__all__ = ["FORMATS", "ImportedEncoder", "InteropError", "TARGETS", "export_encoder", "import_encoder",
           "import_encoder_for", "is_fedmae_checkpoint", "split_encoder_spec"]
