"""Secure aggregation with Flower's SecAgg+, run by the real ServerApp and ClientApp code in one
process: the server gets the right average without ever receiving a site's weights, survives a
site dropping out, and keeps the previous model when the protocol cannot finish."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message

from tests.federated.in_process import global_encoder, rounds_log, run, setup_run

SECURE = {"min_sites": 2, "privacy": {"secure_aggregation": True}}


def crash_at(site_node: int, round_number: int):
    def crash(request: Message) -> str | None:
        if request.metadata.message_type != "train":
            return None
        config = request.content.config_records
        # SecAgg+ fit messages carry the fedmae config inside Flower's legacy fit record.
        round_of = config["config"]["round"] if "config" in config else config.get("fitins.config", {}).get("round")
        return "site lost power" if round_of == round_number else None

    return {site_node: crash}


def test_the_secure_sum_is_fedavg_and_no_site_weights_reach_the_server(tmp_path):
    grid, plain = setup_run(tmp_path / "plain", num_sites=3, federated={"min_sites": 2, "finetune": "federated"})
    run(grid, plain)
    grid, secure = setup_run(tmp_path / "secure", num_sites=3, federated={**SECURE, "finetune": "federated"})
    summary = run(grid, secure)
    for name in ("pretrain_last.pt", "finetune_last.pt"):
        a, b = global_encoder(plain, name), global_encoder(secure, name)
        # Quantisation to 2**22 levels over +-8: error ~1e-5 per round (measured 6e-6).
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    # What the server received during training: Flower's SecAgg+ stage records, never an array.
    train_replies = [kind for direction, kind, size in grid.traffic if direction == "up" and kind == "train" and size]
    assert train_replies == []
    assert set(summary["finetune"]["test"]["sites"]) == {"site-0", "site-1", "site-2"}
    ok = [r for r in rounds_log(secure) if r.get("status") == "ok"]
    assert len(ok) == 12 and all(r["site"].startswith("site-") and "train_loss" in r for r in ok)


def test_a_site_dropping_out_mid_round_leaves_the_average_of_the_others(tmp_path):
    grid, plain = setup_run(tmp_path / "plain", num_sites=3)
    grid.crashes = crash_at(101, 2)
    run(grid, plain)
    grid, secure = setup_run(tmp_path / "secure", num_sites=3, federated=SECURE)
    grid.crashes = crash_at(101, 2)
    run(grid, secure)
    a, b = global_encoder(plain), global_encoder(secure)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    failed = [(r["round"], r["site"]) for r in rounds_log(secure) if r.get("status") == "failed"]
    assert failed == [(2, "site-1")]


def test_too_few_sites_for_the_threshold_keeps_the_previous_model(tmp_path):
    grid, secure = setup_run(tmp_path, num_sites=3, federated={**SECURE, "min_sites": 1})
    grid.crashes = {**crash_at(101, 2), **crash_at(102, 2)}  # one site left; the threshold is 2
    summary = run(grid, secure)
    assert summary["rounds_without_update"]["pretrain"] == [2]
    kept = next(r for r in rounds_log(secure) if r.get("kept_previous_model"))
    assert kept["round"] == 2 and "SecAgg+ halted" in kept["reason"]
    out = secure["output-dir"]
    after_1 = global_encoder(secure, "pretrain_round_0001.pt")
    after_2 = global_encoder(secure, "pretrain_round_0002.pt")
    assert all(torch.equal(after_1[k], after_2[k]) for k in after_1), out


def test_secure_aggregation_needs_as_many_sites_as_shares(tmp_path):
    grid, secure = setup_run(tmp_path, num_sites=2, federated=SECURE)
    with pytest.raises(ValueError, match="fewer than federated.privacy.secagg_shares=3"):
        run(grid, secure)
