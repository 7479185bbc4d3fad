"""Build models from an ExperimentConfig: the only place that reads the model section."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from fedmae.models.classifier import ViTClassifier
from fedmae.models.mae import MaskedAutoencoder
from fedmae.models.vit import ViTEncoder

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig


def build_encoder(cfg: ExperimentConfig, drop_path_rate: float = 0.0, learnable_pos_embed: bool = False) -> ViTEncoder:
    size = cfg.size
    return ViTEncoder(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.model.in_channels,
        img_size=cfg.model.img_size,
        patch_size=cfg.patch_size,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=cfg.model.mlp_ratio,
        drop_path_rate=drop_path_rate,
        learnable_pos_embed=learnable_pos_embed,
    )


def build_mae(cfg: ExperimentConfig) -> MaskedAutoencoder:
    size = cfg.size
    return MaskedAutoencoder(
        build_encoder(cfg),
        decoder_dim=size.decoder_dim,
        decoder_depth=size.decoder_depth,
        decoder_heads=size.decoder_heads,
        mlp_ratio=cfg.model.mlp_ratio,
        mask_ratio=cfg.model.mask_ratio,
        norm_pix_loss=cfg.model.norm_pix_loss,
    )


def build_finetune_model(cfg: ExperimentConfig, num_outputs: int) -> nn.Module:
    """Classifier or UNETR (per ``task.type``) with ``num_outputs`` classes/channels."""
    encoder = build_encoder(cfg, drop_path_rate=cfg.finetune.drop_path, learnable_pos_embed=True)
    if cfg.task.type == "classification":
        return ViTClassifier(encoder, num_outputs)
    from fedmae.models.unetr import UNETR  # imports MONAI (2 s): only segmentation pays for it here

    return UNETR(encoder, num_outputs, skip_blocks=cfg.skip_blocks, feature_size=cfg.model.feature_size)
