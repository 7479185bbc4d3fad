"""Models: the ViT encoder, the MAE, and the fine-tune models (classifier, UNETR), 2D and 3D.

Names are imported on first use, so reading a config (which only needs the named sizes) does not
pay for importing torch, timm and MONAI; a config error is reported in a fraction of a second.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fedmae.models.sizes import MODEL_NAMES, ModelSize, parse_model_name

_LAZY = {
    "MaskedAutoencoder": "fedmae.models.mae",
    "UNETR": "fedmae.models.unetr",
    "ViTClassifier": "fedmae.models.classifier",
    "ViTEncoder": "fedmae.models.vit",
}

if TYPE_CHECKING:
    from fedmae.models.classifier import ViTClassifier
    from fedmae.models.mae import MaskedAutoencoder
    from fedmae.models.unetr import UNETR
    from fedmae.models.vit import ViTEncoder


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedmae.models' has no attribute {name!r}")


__all__ = ["MODEL_NAMES", "MaskedAutoencoder", "ModelSize", "UNETR", "ViTClassifier", "ViTEncoder", "parse_model_name"]
