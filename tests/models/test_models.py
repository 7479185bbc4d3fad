"""Forward/backward of every named size and the fine-tune models in 2D and 3D."""

from __future__ import annotations

import math

import pytest
import torch

from fedmae.models import MODEL_NAMES, MaskedAutoencoder, UNETR, ViTClassifier, ViTEncoder, parse_model_name
from fedmae.models.pos_embed import sincos_pos_embed

# (model name, in_channels, input size): every named size, 1/3/4 channels, non-square/non-cubic inputs
NAMED_CASES = [
    ("vit_tiny_patch16_2d", 1, (48, 32)),
    ("vit_small_patch16_2d", 3, (32, 64)),
    ("vit_base_patch16_2d", 4, (32, 48)),
    ("vit_tiny_patch16_3d", 4, (32, 16, 48)),
    ("vit_small_patch16_3d", 1, (16, 32, 32)),
    ("vit_base_patch16_3d", 3, (32, 32, 16)),
]


def build(name: str, channels: int, size: tuple[int, ...], **kwargs) -> ViTEncoder:
    spec, patch, dims = parse_model_name(name)
    return ViTEncoder(dims, channels, size, patch, spec.embed_dim, spec.depth, spec.num_heads, **kwargs)


def test_named_cases_cover_every_name():
    assert sorted(n for n, _, _ in NAMED_CASES) == sorted(MODEL_NAMES)


@pytest.mark.parametrize("name,channels,size", NAMED_CASES)
def test_mae_forward_backward_named_sizes(name, channels, size):
    spec, patch, _ = parse_model_name(name)
    mae = MaskedAutoencoder(build(name, channels, size), spec.decoder_dim, 1, spec.decoder_heads)
    x = torch.randn(2, channels, *size)
    loss, pred, mask = mae(x)
    loss.backward()
    tokens = math.prod(s // patch for s in size)
    assert pred.shape == (2, tokens, patch ** len(size) * channels)
    assert mask.shape == (2, tokens)
    assert torch.isfinite(loss)
    assert mae.encoder.patch_embed.proj.weight.grad is not None
    assert mae.encoder.pos_embed.grad is None  # the sin-cos table is fixed in pre-training


@pytest.mark.parametrize("dims,channels,size", [(2, 1, (32, 48)), (3, 4, (16, 32, 24)), (3, 3, (32, 16, 16))])
def test_classifier_forward_backward(dims, channels, size):
    encoder = ViTEncoder(dims, channels, size, 8, 32, 2, 2, drop_path_rate=0.1, learnable_pos_embed=True)
    model = ViTClassifier(encoder, num_classes=5)
    logits = model(torch.randn(3, channels, *size))
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert model.encoder.pos_embed.grad is not None  # learnable when fine-tuning


@pytest.mark.parametrize("dims,patch,size,skips", [
    (2, 16, (32, 64), (1, 2, 3)),
    (3, 16, (32, 16, 48), (1, 2, 3)),
    (2, 8, (24, 40), (1, 3)),
    (3, 4, (8, 12, 16), (2,)),
])
def test_unetr_output_matches_input_size(dims, patch, size, skips):
    encoder = ViTEncoder(dims, 2, size, patch, 32, 4, 2)
    model = UNETR(encoder, out_channels=3, skip_blocks=skips, feature_size=4)
    out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 3, *size)
    out.mean().backward()


@pytest.mark.parametrize("patch,skips,message", [
    (12, (1, 2), "power-of-two"),
    (16, (1, 2), "needs 3 skip blocks"),
    (16, (3, 2, 1), "must increase"),
])
def test_unetr_rejects_impossible_geometry(patch, skips, message):
    encoder = ViTEncoder(2, 1, (48, 48), patch, 32, 4, 2)
    with pytest.raises(ValueError, match=message):
        UNETR(encoder, 2, skip_blocks=skips)


def test_wrong_input_shape_names_expected_shape():
    encoder = ViTEncoder(2, 1, (32, 32), 8, 32, 2, 2)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 1, 32, 32\)"):
        encoder(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("dim,grid", [(32, (4, 4)), (48, (2, 3, 4)), (40, (3, 5, 2))])
def test_sincos_table_shape_and_distinct_rows(dim, grid):
    table = sincos_pos_embed(dim, grid)
    assert table.shape == (1, 1 + math.prod(grid), dim)
    assert torch.all(table[0, 0] == 0)  # the cls row
    rows = table[0, 1:]
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]  # every position is distinguishable
