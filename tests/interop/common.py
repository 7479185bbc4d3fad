"""What the interop tests share: the tiny fedmae model, its features, and the key accounting check."""

from __future__ import annotations

from pathlib import Path

import torch

from fedmae.config import ExperimentConfig
from fedmae.interop.foreign import ImportedEncoder
from fedmae.models.factory import build_encoder
from fedmae.models.vit import ViTEncoder
from tests.tiny import tiny_config

# tests/tiny.py's model: patch 8, 32 wide, 4 blocks, 2 heads, MLP x4, inputs of 32 per side.
WIDTH, DEPTH, HEADS, PATCH, SIDE = 32, 4, 2, 8, 32


def config(dims: int = 2, **model) -> ExperimentConfig:
    return tiny_config(dims, model=model) if model else tiny_config(dims)


def encoder_with(weights: dict[str, torch.Tensor], cfg: ExperimentConfig) -> ViTEncoder:
    """fedmae's encoder for ``cfg`` holding ``weights``, loaded strictly, in eval mode."""
    encoder = build_encoder(cfg)
    encoder.load_state_dict(weights, strict=True)
    return encoder.eval()


def tokens_without_cls(encoder: ViTEncoder, images: torch.Tensor) -> torch.Tensor:
    """fedmae's encoder run on the patch tokens alone: what a MONAI ViT without a cls token computes."""
    return encoder.forward_blocks(encoder.embed_patches(images))


def images(dims: int, channels: int = 1, batch: int = 2, side: int = SIDE, seed: int = 1) -> torch.Tensor:
    return torch.randn((batch, channels, *[side] * dims), generator=torch.Generator().manual_seed(seed))


def assert_every_key_accounted(imported: ImportedEncoder, keys: set[str]) -> None:
    """Each key of the file mapped or dropped (with a reason), none both, none forgotten."""
    assert set(imported.mapped) | set(imported.dropped) == keys
    assert not set(imported.mapped) & set(imported.dropped)
    assert all(imported.dropped.values())


def save_torch(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


# ---- foreign models at the tiny model's sizes, every weight random ---------------------------


def timm_vit(side: int = SIDE, channels: int = 1, **kwargs) -> torch.nn.Module:
    import timm

    from tests.interop.reference_models import randomize

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=side, patch_size=PATCH,
                              in_chans=channels, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                              **{"num_classes": 5, **kwargs})
    return randomize(model).eval()


def monai_vit(dims: int, classification: bool, channels: int = 1) -> torch.nn.Module:
    from monai.networks.nets import ViT

    from tests.interop.reference_models import randomize

    vit = ViT(in_channels=channels, img_size=(SIDE,) * dims, patch_size=PATCH, hidden_size=WIDTH, mlp_dim=4 * WIDTH,
              num_layers=DEPTH, num_heads=HEADS, spatial_dims=dims, qkv_bias=True, classification=classification,
              num_classes=3)
    return randomize(vit).eval()


def monai_mae(dims: int, channels: int = 1) -> torch.nn.Module:
    from monai.networks.nets import MaskedAutoEncoderViT

    from tests.interop.reference_models import randomize

    mae = MaskedAutoEncoderViT(in_channels=channels, img_size=(SIDE,) * dims, patch_size=PATCH, hidden_size=WIDTH,
                               mlp_dim=4 * WIDTH, num_layers=DEPTH, num_heads=HEADS, decoder_hidden_size=16,
                               decoder_mlp_dim=32, decoder_num_layers=1, decoder_num_heads=2, spatial_dims=dims,
                               pos_embed_type="learnable", decoder_pos_embed_type="learnable", qkv_bias=True)
    return randomize(mae).eval()


def monai_tokens(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A MONAI ViT's (with a cls token) or MaskedAutoEncoderViT's encoder on every patch, cls first: (B, 1 + L, D)."""
    from monai.networks.nets import MaskedAutoEncoderViT

    tokens = vit.patch_embedding(x)
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    if isinstance(vit, MaskedAutoEncoderViT):
        return vit.blocks(tokens)  # its final norm is the Sequential's last entry
    for block in vit.blocks:
        tokens = block(tokens)
    return vit.norm(tokens)
