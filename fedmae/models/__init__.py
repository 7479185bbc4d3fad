"""Models: the ViT encoder, the MAE, and the fine-tune models (classifier, UNETR), 2D and 3D."""

from fedmae.models.classifier import ViTClassifier
from fedmae.models.mae import MaskedAutoencoder
from fedmae.models.sizes import MODEL_NAMES, ModelSize, parse_model_name
from fedmae.models.unetr import UNETR
from fedmae.models.vit import ViTEncoder

__all__ = ["MODEL_NAMES", "MaskedAutoencoder", "ModelSize", "UNETR", "ViTClassifier", "ViTEncoder", "parse_model_name"]
