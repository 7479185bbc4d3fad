"""Learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import pytest

from fedmae.engine.optim import build_optimizer, layer_id, lr_at, param_groups, set_lr
from fedmae.models.factory import build_finetune_model, build_mae
from tests.tiny import tiny_config


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    lrs = [lr_at(s, total_steps=110, warmup_steps=10, peak_lr=1.0, min_lr=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half-way through the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, 110, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_no_decay_for_biases_norms_and_tokens():
    mae = build_mae(tiny_config(2))
    groups = param_groups(mae, weight_decay=0.05)
    names = {id(p): n for n, p in mae.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"mask_token", "encoder.cls_token", "encoder.norm.weight", "decoder_pred.bias"} <= no_decay
    assert "encoder.blocks.0.attn.qkv.weight" not in no_decay
    # the fixed sin-cos tables are not optimised at all
    optimised = {names[id(p)] for g in groups for p in g["params"]}
    assert "encoder.pos_embed" not in optimised and "decoder_pos_embed" not in optimised


def test_layer_decay_scales_lr_by_depth():
    model = build_finetune_model(tiny_config(2), 3)  # depth 4
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.05, betas=(0.9, 0.95), layer_decay=0.5)
    set_lr(optimizer, 1.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["head.weight"])] == pytest.approx(1.0)
    assert lr_of[id(params["encoder.blocks.3.mlp.fc1.weight"])] == pytest.approx(0.5)
    assert lr_of[id(params["encoder.blocks.0.mlp.fc1.weight"])] == pytest.approx(0.5**4)
    assert lr_of[id(params["encoder.patch_embed.proj.weight"])] == pytest.approx(0.5**5)
    assert lr_of[id(params["encoder.pos_embed"])] == pytest.approx(0.5**5)  # learnable when fine-tuning


@pytest.mark.parametrize("name,expected", [
    ("encoder.cls_token", 0), ("encoder.patch_embed.proj.bias", 0), ("encoder.blocks.0.norm1.weight", 1),
    ("encoder.blocks.11.attn.proj.weight", 12), ("encoder.norm.weight", 13), ("head.weight", 13),
])
def test_layer_ids(name, expected):
    assert layer_id(name, depth=12) == expected
