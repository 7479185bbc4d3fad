"""int8 transport: blockwise codes both ways, the sites' updates with error feedback, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message

from fedmae.typed_yaml import ConfigError
from fedmae.federated import site_run
from fedmae.federated.settings import experiment_config
from fedmae.federated.updates import (BLOCK, SCALES, dequantise, nbytes, quantise, received_model, to_wire,
                                      update_from_wire, update_to_wire)
from tests.federated.in_process import global_encoder, rounds_log, run, run_until_stopped_after_round_2, setup_run

INT8 = {"federated": {"transport": "int8"}}


def test_blockwise_codes_keep_the_shape_and_err_by_at_most_half_a_step_of_their_block():
    torch.manual_seed(0)
    tensor = torch.randn(5, 3 * BLOCK // 5 + 7) * torch.logspace(-4, 1, 5)[:, None]  # blocks of very different sizes
    codes, scales = quantise(tensor)
    assert codes.dtype == torch.int8 and codes.shape == tensor.shape and scales.shape == (-(-tensor.numel() // BLOCK),)
    error = (dequantise(codes, scales) - tensor).abs().reshape(-1)
    step = (scales / 127).repeat_interleave(BLOCK)[: tensor.numel()]
    assert bool((error <= step / 2 * (1 + 1e-5)).all())
    zero_codes, zero_scales = quantise(torch.zeros(3))
    assert torch.equal(dequantise(zero_codes, zero_scales), torch.zeros(3))
    with pytest.raises(ValueError, match="block scales"):
        dequantise(codes, scales[:-1])


def test_error_feedback_sends_every_update_in_full_over_the_rounds():
    """What quantisation drops of one round's update is sent in a later one: the sum of what the
    server decoded equals the sum of the true updates, up to the one loss still carried."""
    torch.manual_seed(0)
    reference = {"w": torch.randn(4 * BLOCK), "steps": torch.tensor(3)}
    carried, true_total, sent_total = None, torch.zeros(4 * BLOCK), torch.zeros(4 * BLOCK)
    for _ in range(20):
        update = torch.randn(4 * BLOCK) * 1e-3
        update[0] = 0.05  # one large value per block coarsens the whole block's step
        state = {"w": reference["w"] + update, "steps": reference["steps"]}
        wire, carried = update_to_wire(state, reference, "int8", carried)
        decoded = update_from_wire(wire, "int8", reference)
        assert torch.equal(decoded["steps"], reference["steps"])
        true_total += update
        sent_total += decoded["w"] - reference["w"]
    one_round_error = (quantise(update)[1] / 254).max()
    torch.testing.assert_close(sent_total + carried["w"], true_total, atol=1e-5, rtol=0)
    assert float((sent_total - true_total).abs().max()) <= float(one_round_error) * 1.01


def test_int8_runs_send_a_quarter_of_the_bytes_each_way_and_end_close_to_fp32(tmp_path):
    grids = {}
    for transport in ("fp32", "int8"):
        grid, run_config = setup_run(tmp_path / transport, pretrain={"epochs": 3, "warmup_epochs": 1},
                                     federated={"transport": transport, "finetune": "federated"})
        run(grid, run_config)
        grids[transport] = (grid, run_config)
    grid, run_config = grids["int8"]
    request = next(m for m in grid.sent if m.metadata.message_type == "train")
    arrays = request.content["arrays"].to_torch_state_dict()
    weights = {k: v for k, v in arrays.items() if k != SCALES}
    assert all(v.dtype == torch.int8 for v in weights.values())
    def first_train_bytes(grid, way):  # of pre-training round 1: the encoder each way
        return next(b for direction, kind, b in grid.traffic if direction == way and kind == "train")

    fp32 = first_train_bytes(grids["fp32"][0], "down")
    assert first_train_bytes(grids["fp32"][0], "up") == fp32
    # 1 byte a weight plus 4 a block of 256; a tiny model's many short tensors each pay a whole
    # block and ~190 bytes of protobuf per array (the demo model travels at ~0.26x, benchmarks/bench_federated.py).
    assert first_train_bytes(grid, "down") <= 0.30 * fp32 and first_train_bytes(grid, "up") <= 0.30 * fp32
    # The server's model stays fp32; quantisation moves it only slightly from the fp32 run's.
    a, b = global_encoder(grids["fp32"][1]), global_encoder(run_config)
    assert all(t.dtype == torch.float32 for t in b.values())
    first = global_encoder(grids["fp32"][1], "pretrain_round_0001.pt")
    drift, moved = (sum(float(((x[k] - y[k]) ** 2).sum()) for k in a) ** 0.5 for x, y in ((a, b), (a, first)))
    assert 0 < drift < 0.1 * moved  # measured: 0.04x (bf16 transport, no error feedback: 1.5x)

    def val_loss(run_config, rnd):
        return [r["evaluation"]["val_loss"] for r in rounds_log(run_config) if "evaluation" in r and r["phase"] == "pretrain" and r["round"] == rnd]

    assert all(abs(x - y) < 0.005 for x, y in zip(val_loss(grids["fp32"][1], 3), val_loss(run_config, 3), strict=True))
    assert {r["status"] for r in rounds_log(run_config) if "status" in r} == {"ok"}
    last = global_encoder(run_config, "finetune_last.pt")
    assert all(torch.isfinite(t).all() for t in last.values())


def test_an_int8_run_resumes_and_rebuilds_its_sites_to_the_same_weights(tmp_path, monkeypatch):
    """What a site carries to its next round is in its state on disk: a run stopped after round 2
    and resumed, with one site live per process, ends as an uninterrupted all-live run does."""
    sections = {"pretrain": {"epochs": 4, "warmup_epochs": 1}}
    grid, straight = setup_run(tmp_path / "straight", num_sites=3, **sections, **INT8)
    run(grid, straight)
    site_run.forget_site_runs()
    grid, stopped = setup_run(tmp_path / "stopped", num_sites=3, **sections,
                              federated={"transport": "int8", "live_sites": 1})
    run_until_stopped_after_round_2(grid, stopped, monkeypatch)
    site_run.forget_site_runs()  # as a restarted process would
    run(grid, stopped, resume=True)
    a, b = global_encoder(straight), global_encoder(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    carried = torch.load(next(Path(stopped["output-dir"]).rglob("site-0/pretrain/round_00004.pt")), weights_only=True)
    assert set(carried["extra"]["transport_carry"]) == {"encoder." + k for k in a if a[k].is_floating_point()}


def test_an_int8_reply_without_its_scales_or_with_too_few_is_rejected(tmp_path):
    grid, run_config = setup_run(tmp_path, num_sites=3, **INT8)

    def scales(edit):
        def fault(request: Message, reply: Message) -> Message:
            if request.metadata.message_type == "train" and not reply.has_error():
                state = reply.content["arrays"].to_torch_state_dict()
                edit(state)
                reply.content["arrays"] = ArrayRecord(state)
            return reply
        return fault

    grid.faults = {100: scales(lambda s: s.pop(SCALES)), 101: scales(lambda s: s.update({SCALES: s[SCALES][:-1]}))}
    run(grid, run_config)
    rejected = {r["site"]: r["reason"] for r in rounds_log(run_config) if r.get("status") == "rejected"}
    assert "arrived without their block scales" in rejected["site-0"]
    assert "block scales expected" in rejected["site-1"]
    assert {r["site"] for r in rounds_log(run_config) if r.get("status") == "ok"} == {"site-2"}


def test_the_server_s_int8_model_is_what_the_sites_decode():
    torch.manual_seed(0)
    weights = {"encoder.w": torch.randn(3, 70), "encoder.n": torch.tensor([1, 2])}
    received = received_model(to_wire(weights, "int8"), "int8")
    assert received["encoder.w"].dtype == torch.float32 and torch.equal(received["encoder.n"], weights["encoder.n"])
    assert float((received["encoder.w"] - weights["encoder.w"]).abs().max()) <= float(weights["encoder.w"].abs().max()) / 254
    assert nbytes(to_wire(weights, "int8")) < 0.3 * nbytes(weights)


@pytest.mark.parametrize("privacy,message", [
    ({"dp": "client", "noise_multiplier": 0.1}, "outside the clipping client-side DP accounts for"),
    ({"secure_aggregation": True}, "secure aggregation quantises the weights itself"),
])
def test_int8_is_refused_where_it_cannot_apply(tmp_path, privacy, message):
    _, run_config = setup_run(tmp_path, federated={"transport": "int8", "privacy": privacy})
    with pytest.raises(ConfigError, match=message):
        experiment_config(run_config)
