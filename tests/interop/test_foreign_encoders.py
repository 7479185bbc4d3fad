"""Foreign encoders start fedmae's: each built by its own library (timm, MONAI) or by a module
with its published names (facebookresearch/mae, SelfMedMAE), saved as its code saves it, read
back with every key accounted for, and giving the same features in fedmae's encoder."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from monai.networks.nets import UNETR
from safetensors.torch import save_file
from torch.nn import functional as F

from fedmae.interop import InteropError, import_encoder_for
from tests.interop.common import (DEPTH, HEADS, PATCH, SIDE, WIDTH, assert_every_key_accounted, config, encoder_with,
                                  images, monai_mae, monai_tokens, monai_vit, save_torch, timm_vit, tokens_without_cls)
from tests.interop.reference_models import MaeViT, SelfMedMae, randomize

EXACT = {"rtol": 1e-5, "atol": 1e-5}
# MONAI's LayerNorms use eps 1e-5, fedmae's 1e-6: the same weights give features a little apart.
MONAI = {"rtol": 1e-4, "atol": 1e-4}


# ---- timm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_gives_the_same_tokens_and_its_head_is_dropped(tmp_path, caplog, suffix):
    model = timm_vit()
    path = tmp_path / f"vit{suffix}"
    state = model.state_dict()
    save_file(state, path) if suffix == ".safetensors" else save_torch(state, path)
    cfg = config(2)
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(path, cfg)
    assert imported.format == "timm" and set(imported.dropped) == {"head.weight", "head.bias"}
    assert_every_key_accounted(imported, set(state))
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x), model.forward_features(x),
                                   **EXACT)
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"using the encoder of {path} (timm, detected" in line and "2 dropped" in line for line in lines), lines
    assert f"{path}: dropped head.*: a classification head (task-specific; fine-tuning adds its own)" in lines, lines


def test_rgb_timm_vit_summed_to_grey_sees_a_grey_image_as_timm_sees_it_in_rgb(tmp_path, caplog):
    model = timm_vit(channels=3)
    path = save_torch(model.state_dict(), tmp_path / "rgb.pth")
    cfg = config(2)
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(f"timm:{path}", cfg)
    grey = images(2)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(grey),
                                   model.forward_features(grey.repeat(1, 3, 1, 1)), **EXACT)
    assert any("patch embedding of 3 channels summed to 1 channel" in r.getMessage() for r in caplog.records)
    assert any("(timm, as named" in r.getMessage() for r in caplog.records)


def test_position_table_is_resampled_to_the_model_grid_with_a_note(tmp_path, caplog):
    model = timm_vit(side=64)  # an 8x8 grid for the model's 4x4
    path = save_torch(model.state_dict(), tmp_path / "vit64.pth")
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(path, config(2))
    table = model.pos_embed.detach()
    patches = table[:, 1:].reshape(1, 8, 8, WIDTH).permute(0, 3, 1, 2)
    expected = F.interpolate(patches, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(imported.weights["pos_embed"], torch.cat([table[:, :1], expected], dim=1))
    assert any("position table resampled from a 8x8 grid to 4x4 (bicubic)" in r.getMessage() for r in caplog.records)


def test_layer_scale_is_folded_into_the_blocks_with_the_same_function(tmp_path):
    model = timm_vit(init_values=0.1)
    path = save_torch(model.state_dict(), tmp_path / "deit3.pth")
    cfg = config(2)
    imported = import_encoder_for(path, cfg)
    assert imported.mapped["blocks.0.ls1.gamma"] == "blocks.0.attn.proj (folded in)"
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x), model.forward_features(x),
                                   **EXACT)


def test_a_table_without_a_cls_row_gets_a_zero_one_as_timm_adds_no_position_to_the_cls_token(tmp_path):
    model = timm_vit(no_embed_class=True)
    assert model.pos_embed.shape[1] == (SIDE // PATCH) ** 2
    cfg = config(2)
    imported = import_encoder_for(save_torch(model.state_dict(), tmp_path / "v.pth"), cfg)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x), model.forward_features(x),
                                   **EXACT)


def test_a_pooled_head_norm_becomes_the_final_norm_with_a_note(tmp_path, caplog):
    model = timm_vit(global_pool="avg")  # timm moves the final norm after the pooling: fc_norm, no norm
    path = save_torch(model.state_dict(), tmp_path / "ft.pth")
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(path, config(2))
    assert imported.mapped["fc_norm.weight"] == "norm.weight"
    torch.testing.assert_close(imported.weights["norm.weight"], model.fc_norm.weight.detach())
    assert any("fc_norm" in r.getMessage() and "becomes the final norm" in r.getMessage() for r in caplog.records)


def test_register_tokens_are_refused_in_one_line(tmp_path):
    path = save_torch(timm_vit(reg_tokens=2).state_dict(), tmp_path / "reg.pth")
    with pytest.raises(InteropError) as info:
        import_encoder_for(path, config(2))
    assert str(info.value) == (f"{path}: reg_token is a register token, which fedmae's encoder does not have; this "
                               "encoder cannot start a fedmae model")


# ---- facebookresearch/mae --------------------------------------------------------------------


def test_mae_checkpoint_gives_the_same_tokens_and_its_decoder_is_dropped(tmp_path, caplog):
    mae = randomize(MaeViT(in_chans=1)).eval()
    state = mae.state_dict()
    path = save_torch({"model": state, "epoch": 399}, tmp_path / "checkpoint-399.pth")  # as main_pretrain.py keeps it
    cfg = config(2)
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(path, cfg)
    assert imported.format == "mae"
    assert_every_key_accounted(imported, set(state))
    assert {k for k in imported.dropped} == {k for k in state if k.startswith("decoder") or k == "mask_token"}
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x), mae.forward_features(x),
                                   **EXACT)
    lines = [r.getMessage() for r in caplog.records]
    assert (f"{path}: dropped mask_token, decoder_pos_embed, decoder_embed.*, decoder_blocks.* (12 keys), decoder_norm.*, "
            "decoder_pred.*: the MAE decoder and mask token (they stay with pre-training)") in lines, lines
    assert any("its epoch (not the weights) not used" in line for line in lines), lines


def test_mae_checkpoint_holding_its_argparse_namespace_is_refused_unread(tmp_path):
    path = save_torch({"model": MaeViT().state_dict(), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "mae.pth")
    with pytest.raises(ValueError) as info:
        import_encoder_for(path, config(2))
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable fedmae checkpoint (it holds a pickled Python object "
                              "(argparse.Namespace)") and "\n" not in message
    assert "its weights alone: a state dict of tensors, or .safetensors" in message


# ---- MONAI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_vit_with_a_cls_token_gives_the_same_tokens(tmp_path, caplog, dims):
    vit = monai_vit(dims, classification=True)
    state = vit.state_dict()
    cfg = config(dims)
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(save_torch(state, tmp_path / "vit.pt"), cfg)
    assert imported.format == "monai-vit"
    assert_every_key_accounted(imported, set(state))
    assert imported.mapped["blocks.1.attn.out_proj.weight"] == "blocks.1.attn.proj.weight"
    assert imported.mapped["blocks.1.mlp.linear2.bias"] == "blocks.1.mlp.fc2.bias"
    x = images(dims)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x), monai_tokens(vit, x), **MONAI)
    assert any("eps 1e-5" in r.getMessage() for r in caplog.records)


def test_monai_vit_without_a_cls_token_gets_a_zero_one_and_a_warning(tmp_path, caplog):
    vit = monai_vit(3, classification=False)
    cfg = config(3)
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(save_torch(vit.state_dict(), tmp_path / "vit.pt"), cfg)
    assert torch.equal(imported.weights["cls_token"], torch.zeros(1, 1, WIDTH))
    x = images(3)
    with torch.no_grad():  # the same blocks: fedmae's encoder on the patch tokens alone is MONAI's ViT
        torch.testing.assert_close(tokens_without_cls(encoder_with(imported.weights, cfg), x), vit(x)[0], **MONAI)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "it has no cls token" in warning and "differ" in warning


def test_monai_unetr_gives_its_vit_and_drops_its_decoder(tmp_path):
    unetr = randomize(UNETR(in_channels=1, out_channels=2, img_size=(SIDE,) * 3, feature_size=4, hidden_size=WIDTH,
                            mlp_dim=4 * WIDTH, num_heads=HEADS, spatial_dims=3, qkv_bias=True)).eval()
    state = unetr.state_dict()
    cfg = config(3, name="vit_tiny_patch16_3d", depth=12)  # MONAI's UNETR: patch 16, 12 blocks
    imported = import_encoder_for(save_torch(state, tmp_path / "unetr.pt"), cfg)
    assert imported.format == "monai-vit"
    assert_every_key_accounted(imported, set(state))
    assert {k for k in imported.dropped if not k.startswith("vit.")} == {k for k in state if not k.startswith("vit.")}
    assert "UNETR's convolutional decoder" in imported.dropped["out.conv.conv.weight"]
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(tokens_without_cls(encoder_with(imported.weights, cfg), x), unetr.vit(x)[0], **MONAI)


@pytest.mark.parametrize("dims", [2, 3])
def test_monai_masked_autoencoder_gives_the_same_tokens_and_its_decoder_is_dropped(tmp_path, dims):
    mae = monai_mae(dims)
    state = mae.state_dict()
    cfg = config(dims)
    imported = import_encoder_for(save_torch(state, tmp_path / "mae.pt"), cfg)
    assert imported.format == "monai-mae"
    assert_every_key_accounted(imported, set(state))
    assert imported.mapped[f"blocks.{DEPTH}.weight"] == "norm.weight"  # the norm that closes its blocks
    assert {"mask_tokens", "decoder_pos_embedding", "decoder_pred.weight"} <= set(imported.dropped)
    x = images(dims)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x), monai_tokens(mae, x), **MONAI)


def test_grey_encoder_starts_a_four_channel_model_seeing_equal_channels_as_one(tmp_path, caplog):
    mae = monai_mae(3)
    cfg = config(3, in_channels=4)
    with caplog.at_level(logging.INFO, logger="fedmae"):
        imported = import_encoder_for(save_torch(mae.state_dict(), tmp_path / "mae.pt"), cfg)
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x.repeat(1, 4, 1, 1, 1)),
                                   monai_tokens(mae, x), **MONAI)
    assert any("repeated over 4 channels and scaled by 1/4" in r.getMessage() for r in caplog.records)


# ---- SelfMedMAE -----------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [3, 2])
def test_selfmedmae_checkpoint_gives_the_same_tokens_and_its_decoder_is_dropped(tmp_path, dims):
    model = randomize(SelfMedMae(dims=dims)).eval()
    state = model.state_dict()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = save_torch({"epoch": 1000, "arch": "vit_base", "state_dict": state, "optimizer": optimizer.state_dict(),
                       "scaler": {"scale": 65536.0, "growth_tracker": 0}}, tmp_path / "checkpoint_0999.pth.tar")
    cfg = config(dims)
    imported = import_encoder_for(path, cfg)
    assert imported.format == "selfmedmae"
    assert_every_key_accounted(imported, set(state))
    assert imported.mapped["encoder_pos_embed"] == "pos_embed"
    assert {"decoder.head.weight", "encoder_to_decoder.weight", "mask_token", "decoder_pos_embed"} <= set(imported.dropped)
    assert any("arch, epoch, optimizer, scaler (not the weights) not used" in note for note in imported.notes)
    x = images(dims)
    with torch.no_grad():
        torch.testing.assert_close(encoder_with(imported.weights, cfg).forward_features(x), model.forward_features(x),
                                   **EXACT)


# ---- what cannot start fedmae's encoder ------------------------------------------------------


@pytest.mark.parametrize("cfg_model,words", [
    ({"depth": 3}, "its encoder has 4 blocks, the model 3: set model.depth: 4"),
    ({"embed_dim": 64}, "its encoder is 32 wide, the model 64: set model.embed_dim: 32"),
    ({"mlp_ratio": 2.0}, "its MLPs are 128 wide, the model's 64: set model.mlp_ratio: 4"),
    ({"name": "vit_tiny_patch16_2d"}, "its patches are 8x8, the model's 16: choose the model.name with patch8"),
])
def test_an_encoder_of_another_shape_is_refused_naming_the_setting(tmp_path, cfg_model, words):
    path = save_torch(timm_vit().state_dict(), tmp_path / "vit.pth")
    with pytest.raises(InteropError) as info:
        import_encoder_for(path, config(2, **cfg_model))
    assert str(info.value) == f"{path}: {words}" or str(info.value).startswith(f"{path}: {words}"), str(info.value)


def test_a_2d_encoder_cannot_start_a_3d_model(tmp_path):
    path = save_torch(timm_vit().state_dict(), tmp_path / "vit.pth")
    with pytest.raises(InteropError, match="a 2-D encoder cannot start a 3-D model; choose a model.name ending in _2d"):
        import_encoder_for(path, config(3))


def test_keys_of_no_known_layout_ask_for_the_format_by_name(tmp_path):
    path = save_torch({"conv1.weight": torch.zeros(2, 1, 3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(InteropError) as info:
        import_encoder_for(path, config(2))
    assert str(info.value).startswith(f"{path}: cannot tell which encoder its keys (conv1.weight) belong to; name the "
                                      f"format as FORMAT:{path} with FORMAT one of fedmae-safetensors, timm, mae")


def test_a_key_fedmae_has_no_place_for_is_refused(tmp_path):
    state = timm_vit().state_dict()
    state["blocks.0.attn.rel_pos_h"] = torch.zeros(7, 16)
    path = save_torch(state, tmp_path / "vit.pth")
    with pytest.raises(InteropError, match=r"blocks\.0\.attn\.rel_pos_h: fedmae's encoder has nothing like this"):
        import_encoder_for(path, config(2))


def test_data_parallel_prefix_is_removed_with_a_note(tmp_path):
    model = timm_vit()
    path = save_torch({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    imported = import_encoder_for(path, config(2))
    assert imported.format == "timm" and any("DistributedDataParallel" in note for note in imported.notes)


def test_a_fedmae_checkpoint_named_as_a_foreign_format_is_refused(tmp_path):
    from fedmae.checkpoint import save_checkpoint
    from fedmae.models.factory import build_mae

    cfg = config(2)
    path = save_checkpoint(tmp_path / "c.pt", kind="mae", model_state=build_mae(cfg).state_dict(),
                           config=cfg.to_dict(), epoch=1, step=1)
    with pytest.raises(InteropError, match="a fedmae checkpoint, not timm; leave out the 'timm:' before it"):
        import_encoder_for(f"timm:{path}", cfg)
    assert import_encoder_for(path, cfg).format == "fedmae"
