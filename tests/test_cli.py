"""The ``fedmae`` command end to end: pretrain -> finetune -> evaluate in 2D and 3D, and its errors.
The CLI runs in-process (tests/command_line.py) but for one test of the console script."""

from __future__ import annotations

import json

import pytest

from fedmae.checkpoint import load_checkpoint
from fedmae.engine.loop import MetricsLog
from tests.command_line import fedmae, fedmae_console_script, write_config
from tests.tiny import tiny_raw


@pytest.mark.slow
def test_the_console_script_trains_logs_to_stderr_and_exits_2_on_a_mistake(tmp_path):
    # The one test of the installed script as its own process; the others call fedmae.cli.main.
    config = write_config(tmp_path, tiny_raw(2, pretrain={"epochs": 1, "warmup_epochs": 0}))
    pre = fedmae_console_script("pretrain", "--config", str(config), "--output", "pre", cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr
    assert "encoder checkpoint: pre/checkpoint_last.pt" in pre.stdout
    assert " INFO fedmae" in pre.stderr  # the CLI's log lines reach the console
    assert load_checkpoint(tmp_path / "pre/checkpoint_last.pt", expect_kind="mae")["epoch"] == 1
    wrong = fedmae_console_script("pretrain", "--config", str(config), "--set", "pretrain.epochz=3", cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.startswith("fedmae: error: ")
    assert "--set pretrain.epochz=3: unknown key" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("dims,task", [(2, "classification"), (3, "segmentation")])
def test_pretrain_finetune_evaluate(tmp_path, dims, task):
    raw = tiny_raw(dims, task, pretrain={"epochs": 6, "batch_size": 8, "base_lr": 2e-2},
                   finetune={"epochs": 4, "batch_size": 4, "base_lr": 2e-2})
    config = write_config(tmp_path, raw)

    pre = fedmae("pretrain", "--config", str(config), "--output", "pre", cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr
    records = MetricsLog(tmp_path / "pre/metrics.jsonl").read()
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # the MAE learns
    payload = load_checkpoint(tmp_path / "pre/checkpoint_last.pt", expect_kind="mae")
    assert payload["config"]["model"]["name"] == raw["model"]["name"] and payload["epoch"] == 6

    ft = fedmae("finetune", "--config", str(config), "--encoder", "pre/checkpoint_last.pt", "--output", "ft", cwd=tmp_path)
    assert ft.returncode == 0, ft.stderr
    assert "best checkpoint (selected on validation)" in ft.stdout
    ft_records = MetricsLog(tmp_path / "ft/metrics.jsonl").read()
    assert ft_records[-1]["train_loss"] < ft_records[0]["train_loss"]
    report = json.loads((tmp_path / "ft/test_metrics.json").read_text())
    kind = "auc" if task == "classification" else "dice"
    assert set(report["pooled"]["per_class"][kind]) and set(report["sites"]) == {"site-0", "site-1"}
    assert report["split"] == "test" and report["init"].endswith("checkpoint_last.pt")

    ev = fedmae("evaluate", "--config", str(config), "--checkpoint", "ft/checkpoint_best.pt", "--split", "val", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    evaluation = json.loads((tmp_path / "ft/evaluation_val.json").read_text())
    assert evaluation["pooled"] == report["val"]  # the same model scores the same on validation


@pytest.mark.parametrize("args,words", [
    (["--set", "model.mask_ratio=1.5"], "model.mask_ratio: must be strictly between 0 and 1"),
    (["--set", "pretrain.epochz=3"], "unknown key 'pretrain.epochz'"),
    (["--set", "model.img_size=[30, 32]"], "model.img_size: every side must be a positive multiple"),
])
def test_config_errors_exit_2_with_one_line_and_write_nothing(tmp_path, args, words):
    config = write_config(tmp_path, tiny_raw(2))
    result = fedmae("pretrain", "--config", str(config), "--output", "out", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert words in result.stderr and f"--set {args[1]}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_bad_encoder_checkpoint_is_one_line(tmp_path):
    config = write_config(tmp_path, tiny_raw(2))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    result = fedmae("finetune", "--config", str(config), "--encoder", "junk.pt", "--output", "ft", cwd=tmp_path)
    assert result.returncode == 2 and "junk.pt: not a readable fedmae checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "ft").exists()
