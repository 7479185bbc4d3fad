"""fedmae export: a fedmae encoder exported to timm and to MONAI gives the same features there;
fedmae safetensors read back as the same weights; a file in the way or a 3-D encoder for timm is
refused in one line."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from monai.networks.nets import UNETR, ViT
from safetensors import safe_open
from safetensors.torch import load_file

from fedmae.checkpoint import save_checkpoint, sha256_of
from fedmae.interop import InteropError, export_encoder, import_encoder_for
from fedmae.interop.export import monai_kwargs, timm_kwargs
from fedmae.models.classifier import ViTClassifier
from fedmae.models.factory import build_mae
from fedmae.models.state import encoder_state
from tests.command_line import fedmae
from tests.interop.common import config, encoder_with, images, tokens_without_cls
from tests.interop.reference_models import randomize

MONAI = {"rtol": 1e-4, "atol": 1e-4}  # MONAI's LayerNorm eps is 1e-5, fedmae's 1e-6


def fedmae_checkpoint(tmp_path, dims: int = 2, **model):
    """A pre-training checkpoint of the tiny model with every weight random; its config and encoder."""
    cfg = config(dims, **model)
    mae = randomize(build_mae(cfg))
    path = save_checkpoint(tmp_path / "pretrain" / "checkpoint_last.pt", kind="mae", model_state=mae.state_dict(),
                           config=cfg.to_dict(), epoch=3, step=12)
    return path, cfg, encoder_state(mae.state_dict())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_loads_the_export_strictly_and_gives_fedmaes_tokens_and_pooled_features(tmp_path, suffix):
    checkpoint, cfg, weights = fedmae_checkpoint(tmp_path)
    out = export_encoder(checkpoint, "timm", tmp_path / f"encoder{suffix}")
    kwargs = timm_kwargs(cfg)
    model = timm.create_model(kwargs.pop("model_name"), **kwargs).eval()
    state = load_file(out.weights) if suffix == ".safetensors" else torch.load(out.weights, weights_only=True)
    model.load_state_dict(state, strict=True)
    encoder = encoder_with(weights, cfg)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), encoder.forward_features(x), rtol=1e-5, atol=1e-5)
        pooled = ViTClassifier(encoder, 2).forward_features(x)  # what fedmae fine-tunes on
        torch.testing.assert_close(model(x), pooled, rtol=1e-5, atol=1e-5)
    assert out.load_with.startswith("timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, "
                                    "global_pool='avg', fc_norm=False, img_size=(32, 32), patch_size=8, in_chans=1")


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_vit_loads_the_export_strictly_and_gives_fedmaes_patch_tokens(tmp_path, dims):
    checkpoint, cfg, weights = fedmae_checkpoint(tmp_path, dims)
    out = export_encoder(checkpoint, "monai", tmp_path / "encoder.safetensors")
    vit = ViT(**monai_kwargs(cfg)).eval()
    vit.load_state_dict(load_file(out.weights), strict=True)
    x = images(dims)
    with torch.no_grad():  # MONAI's ViT has no cls token: fedmae's encoder on the patch tokens alone
        torch.testing.assert_close(vit(x)[0], tokens_without_cls(encoder_with(weights, cfg), x), **MONAI)
    card = json.loads(out.card.read_text())
    assert "cls token" in card["weights"]["left_out"]


def test_monai_unetr_vit_loads_the_export_of_a_12_block_patch_16_encoder(tmp_path):
    checkpoint, cfg, weights = fedmae_checkpoint(tmp_path, 3, name="vit_tiny_patch16_3d", depth=12)
    out = export_encoder(checkpoint, "monai", tmp_path / "encoder.pt")
    kwargs = {k: v for k, v in monai_kwargs(cfg).items() if k not in ("patch_size", "num_layers", "pos_embed_type",
                                                                        "classification")}
    unetr = UNETR(out_channels=2, feature_size=4, **kwargs).eval()
    unetr.vit.load_state_dict(torch.load(out.weights, weights_only=True), strict=True)
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(unetr.vit(x)[0], tokens_without_cls(encoder_with(weights, cfg), x), **MONAI)
    assert "UNETR(" in out.load_with


def test_safetensors_export_reads_back_as_the_same_encoder_and_describes_itself(tmp_path):
    checkpoint, cfg, weights = fedmae_checkpoint(tmp_path, 3)
    out = export_encoder(checkpoint, "safetensors", tmp_path / "encoder.safetensors")
    imported = import_encoder_for(out.weights, cfg)
    assert imported.format == "fedmae-safetensors" and imported.weights.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(imported.weights[key], value), key
    with safe_open(str(out.weights), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["fedmae_format"] == "fedmae-encoder" and metadata["grid"] == "4,4,4"
    assert json.loads(metadata["model_card"])["architecture"]["spatial_dims"] == 3
    assert json.loads(out.card.read_text())["weights"]["sha256"] == sha256_of(out.weights)


def test_safetensors_export_starts_a_model_on_another_grid_resampled_but_not_one_with_other_heads(tmp_path):
    checkpoint, cfg, _ = fedmae_checkpoint(tmp_path, 2)
    out = export_encoder(checkpoint, "safetensors", tmp_path / "encoder.safetensors")
    bigger = import_encoder_for(out.weights, config(2, img_size=[48, 48]))
    assert bigger.weights["pos_embed"].shape == (1, 1 + 36, 32)
    assert any("resampled from a 4x4 grid to 6x6" in note for note in bigger.notes)
    with pytest.raises(InteropError, match="its encoder has 2 attention heads, the model 4: set model.num_heads: 2"):
        import_encoder_for(out.weights, config(2, num_heads=4))


def test_a_3d_encoder_is_not_exported_for_timm(tmp_path):
    checkpoint, _, _ = fedmae_checkpoint(tmp_path, 3)
    with pytest.raises(InteropError) as info:
        export_encoder(checkpoint, "timm", tmp_path / "encoder.safetensors")
    assert str(info.value) == (f"{checkpoint}: a 3-D encoder; timm's VisionTransformer is 2-D: export it --to monai "
                               "or --to safetensors")
    assert not (tmp_path / "encoder.safetensors").exists() and not (tmp_path / "encoder.json").exists()


def test_export_from_the_command_line_and_a_second_one_refused_without_force(tmp_path):
    checkpoint, _, _ = fedmae_checkpoint(tmp_path)
    first = fedmae("export", str(checkpoint), "--to", "timm", "--output", "enc.safetensors", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[:2] == ["encoder: enc.safetensors", "model card: enc.json"]
    assert "load it with: timm.create_model(" in first.stdout
    again = fedmae("export", str(checkpoint), "--to", "timm", "--output", "enc.safetensors", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip() == "fedmae: error: --output enc.safetensors: enc.safetensors exists; pass --force to replace it"
    forced = fedmae("export", str(checkpoint), "--to", "timm", "--output", "enc.safetensors", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


def test_export_to_an_unknown_suffix_is_refused(tmp_path):
    checkpoint, _, _ = fedmae_checkpoint(tmp_path)
    with pytest.raises(InteropError, match=r"enc\.pt: name the file \.safetensors$"):
        export_encoder(checkpoint, "safetensors", tmp_path / "enc.pt")
    with pytest.raises(InteropError, match=r"name the file .safetensors or .pt / .pth / .bin"):
        export_encoder(checkpoint, "monai", tmp_path / "enc.npz")
