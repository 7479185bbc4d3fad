"""The pre-trained MAE encoder loads into both fine-tune models with every weight accounted for."""

from __future__ import annotations

import pytest
import torch

from fedmae.models.factory import build_finetune_model, build_mae
from fedmae.models.state import (
    WeightMismatchError,
    encoder_state,
    load_encoder,
    load_model_state,
    site_local_state,
)
from tests.tiny import tiny_config


@pytest.mark.parametrize("dims,task", [(2, "classification"), (2, "segmentation"), (3, "classification"), (3, "segmentation")])
def test_mae_encoder_loads_strictly_into_finetune_model(dims, task):
    cfg = tiny_config(dims, task)
    mae = build_mae(cfg)
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(torch.randn_like(p))  # make pre-trained values distinguishable from any init
    finetune = build_finetune_model(cfg, num_outputs=3)
    pretrained = encoder_state(mae.state_dict())
    load_encoder(finetune, pretrained)

    finetune_encoder = {k[len("encoder."):]: v for k, v in finetune.state_dict().items() if k.startswith("encoder.")}
    assert set(finetune_encoder) == set(pretrained)  # nothing missing, nothing unexpected
    for key, value in pretrained.items():
        assert torch.equal(finetune_encoder[key], value), key
    assert finetune.encoder.pos_embed.requires_grad  # the fixed table becomes learnable


def test_encoder_and_site_local_keys_partition_the_mae():
    mae = build_mae(tiny_config(2))
    state = mae.state_dict()
    enc, local = encoder_state(state), site_local_state(state)
    assert len(enc) + len(local) == len(state)
    assert {"mask_token", "decoder_pos_embed", "decoder_pred.weight"} <= set(local)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(enc)


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("blocks.0.attn.qkv.weight"), "missing blocks.0.attn.qkv.weight"),
    (lambda s: s.update({"blocks.9.mlp.fc1.weight": torch.zeros(1)}), "unexpected blocks.9.mlp.fc1.weight"),
    (lambda s: s.update({"pos_embed": torch.zeros(1, 5, 32)}), "wrong shape pos_embed"),
])
def test_mismatched_encoder_is_refused_by_name(mutate, message):
    cfg = tiny_config(2)
    state = encoder_state(build_mae(cfg).state_dict())
    mutate(state)
    with pytest.raises(WeightMismatchError, match=message):
        load_encoder(build_finetune_model(cfg, 2), state)


def test_encoder_from_other_geometry_is_refused():
    small = encoder_state(build_mae(tiny_config(2)).state_dict())
    other = tiny_config(2, model={"img_size": [48, 48]})
    with pytest.raises(WeightMismatchError, match="pos_embed"):
        load_encoder(build_finetune_model(other, 2), small)


def test_whole_model_load_is_strict():
    cfg = tiny_config(2, "segmentation")
    model = build_finetune_model(cfg, 3)
    state = model.state_dict()
    del state["out.conv.conv.weight"]
    with pytest.raises(WeightMismatchError, match="missing out.conv.conv.weight"):
        load_model_state(model, state)
