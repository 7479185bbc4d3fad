"""MAE invariants: visible-token count, unshuffling, loss on masked patches only, patchify."""

from __future__ import annotations

import pytest
import torch

from fedmae.models import MaskedAutoencoder, ViTEncoder

GEOMETRIES = [(2, 1, (32, 48), 8), (2, 3, (16, 16), 4), (3, 4, (16, 24, 8), 8), (3, 1, (32, 32, 32), 16)]


def make_mae(dims, channels, size, patch, ratio=0.75, norm_pix=True) -> MaskedAutoencoder:
    encoder = ViTEncoder(dims, channels, size, patch, 32, 2, 2)
    return MaskedAutoencoder(encoder, 32, 1, 2, mask_ratio=ratio, norm_pix_loss=norm_pix)


@pytest.mark.parametrize("dims,channels,size,patch", GEOMETRIES)
def test_patchify_round_trip(dims, channels, size, patch):
    mae = make_mae(dims, channels, size, patch)
    x = torch.randn(2, channels, *size)
    assert torch.equal(mae.unpatchify(mae.patchify(x)), x)


def test_patchify_puts_one_patch_per_token_in_grid_order():
    mae = make_mae(2, 2, (8, 12), 4)
    x = torch.zeros(1, 2, 8, 12)
    x[0, :, 4:8, 0:4] = 7.0  # the patch at grid row 1, column 0 -> token 1 * 3 + 0
    patches = mae.patchify(x)
    assert patches.shape == (1, 6, 4 * 4 * 2)
    assert torch.all(patches[0, 3] == 7.0) and patches[0].abs().sum() == patches[0, 3].abs().sum()


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
@pytest.mark.parametrize("dims,channels,size,patch", GEOMETRIES[:3])
def test_masking_keeps_exact_count_and_restore_inverts(dims, channels, size, patch, ratio):
    mae = make_mae(dims, channels, size, patch)
    length = mae.encoder.num_patches
    tokens = torch.arange(3 * length, dtype=torch.float32).reshape(3, length, 1).expand(-1, -1, 4)
    visible, mask, ids_restore = mae.random_masking(tokens, ratio)
    keep = max(1, int(length * (1 - ratio)))
    assert visible.shape == (3, keep, 4)
    assert torch.all(mask.sum(dim=1) == length - keep)
    for b in range(3):
        positions = tokens[b, :, 0]
        kept = visible[b, :, 0]
        ids_shuffle = torch.argsort(ids_restore[b])
        assert sorted(ids_restore[b].tolist()) == list(range(length))  # a permutation
        assert torch.equal(kept, positions[ids_shuffle[:keep]])  # visible = first of the shuffle
        assert torch.all(mask[b, ids_shuffle[:keep]] == 0) and torch.all(mask[b, ids_shuffle[keep:]] == 1)
        # gathering the shuffled sequence with ids_restore gives back grid order
        assert torch.equal(torch.gather(positions[ids_shuffle], 0, ids_restore[b]), positions)


def test_masks_differ_per_sample():
    mae = make_mae(2, 1, (32, 32), 4)
    _, mask, _ = mae.random_masking(torch.randn(4, mae.encoder.num_patches, 8), 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 4


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_only_on_masked_patches(norm_pix):
    torch.manual_seed(0)
    mae = make_mae(2, 2, (16, 24), 4, norm_pix=norm_pix)
    x = torch.randn(2, 2, 16, 24)
    loss, pred, mask = mae(x)
    # changing predictions at visible positions does not change the loss ...
    altered = pred.detach().clone()
    altered[mask == 0] += 100.0
    assert torch.allclose(mae.forward_loss(x, altered, mask), loss)
    # ... and the gradient w.r.t. the prediction is zero there and non-zero where masked
    p = pred.detach().clone().requires_grad_(True)
    mae.forward_loss(x, p, mask).backward()
    assert torch.all(p.grad[mask == 0] == 0)
    assert torch.all(p.grad[mask == 1].abs().sum(dim=-1) > 0)


def test_norm_pix_target_is_standardised_per_patch():
    mae = make_mae(2, 1, (16, 16), 4)
    target = mae.reconstruction_target(torch.rand(2, 1, 16, 16) * 50 + 10)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.std(-1), torch.ones(2, 16), atol=1e-3)


def test_reconstruct_keeps_visible_patches():
    mae = make_mae(2, 1, (16, 16), 4)
    x = torch.randn(1, 1, 16, 16)
    _, pred, mask = mae(x)
    image = mae.reconstruct(x, pred, mask)
    visible = mae.patchify(image)[mask == 0]
    assert torch.allclose(visible, mae.patchify(x)[mask == 0])


@pytest.mark.parametrize("dims,channels,size,patch", GEOMETRIES)
def test_encoding_only_the_visible_patches_equals_embedding_all_then_masking(dims, channels, size, patch):
    mae = make_mae(dims, channels, size, patch)
    x = torch.randn(2, channels, *size)
    torch.manual_seed(1)
    latent, mask, ids_restore = mae.forward_encoder(x, 0.75)
    torch.manual_seed(1)  # the same masking noise
    visible, mask_all, restore_all = mae.random_masking(mae.encoder.embed_patches(x), 0.75)
    expected = mae.encoder.forward_blocks(mae.encoder.prepend_cls(visible))
    assert torch.equal(mask, mask_all) and torch.equal(ids_restore, restore_all)
    assert torch.allclose(latent, expected, atol=1e-5)
