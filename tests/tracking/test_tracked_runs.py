"""Real runs with tracking on, read back with TensorBoard's and MLflow's own readers: the commands'
epochs, a federated run's rounds (tracked at the server only), and a comparison. A comparison
with a Flower arm tracked in MLflow is checked in tests/test_compare.py, in its Flower comparison."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from flwr.app import Message

from fedmae.config import load_config
from fedmae.data.cohort import load_cohort
from fedmae.engine.pretrain import pretrain, site_images
from fedmae.federated.updates import nbytes
from tests.command_line import fedmae, write_config
from tests.federated.in_process import rounds_log, run, setup_run
from tests.tiny import tiny_raw
from tests.tracking.reading import artifacts, curve, events, history, runs_by_name, store, text


def metrics_log(folder: Path) -> dict[int, dict]:
    return {r["epoch"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}


def defined(points: dict[int, float | None], rel: float = 1e-6) -> dict:
    """The points a tracker keeps: an undefined metric (None, NaN: an AUC without positives) is left out."""
    return {step: pytest.approx(value, rel=rel) for step, value in points.items() if value is not None and value == value}


class Stop(Exception):
    pass


def test_pretrain_tracks_each_epochs_record_and_a_resumed_run_continues_the_curves(tmp_path):
    raw = tiny_raw(2, pretrain={"epochs": 4, "warmup_epochs": 1, "checkpoint_every": 2},
                   tracking={"backend": "tensorboard"})
    config = write_config(tmp_path, raw)
    out = tmp_path / "pre"

    def stop_after_epoch_3(epoch: int, record: dict) -> None:
        if epoch == 3:  # logged, not checkpointed (every 2): the resumed run trains it again
            raise Stop

    with pytest.raises(Stop):
        pretrain(load_config(config), out, track=True, on_epoch_end=stop_after_epoch_3)
    result = fedmae("pretrain", "--config", str(config), "--output", str(out), "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    logged, records = events(out / "tensorboard"), metrics_log(out)
    assert curve(logged, "pretrain/train_loss") == {e: pytest.approx(r["train_loss"], rel=1e-6) for e, r in records.items()}
    assert curve(logged, "pretrain/val_loss") == {e: pytest.approx(r["val_loss"], rel=1e-6) for e, r in records.items()}
    assert curve(logged, "pretrain/lr") == {e: pytest.approx(r["lr"], rel=1e-6) for e, r in records.items()}
    # Images/s: the training images (unlabelled ones too) over the epoch's seconds, as metrics.jsonl
    # has them (epoch 3's point is the first attempt's, whose seconds the resumed run replaced).
    images = len(site_images(load_cohort(load_config(config)).sites, "train"))
    speeds = curve(logged, "pretrain/images_per_s")
    assert sorted(speeds) == [1, 2, 3, 4]
    for epoch in (1, 2, 4):
        assert speeds[epoch] == pytest.approx(images / records[epoch]["seconds"], rel=1e-5)
    assert "tiny2d/pretrain" in text(logged, "run")[0] and len(text(logged, "config")) == 1


@pytest.mark.slow  # creating an MLflow store (its schema migrations) takes seconds
def test_finetune_tracks_its_epochs_and_test_metrics_in_an_mlflow_store_in_its_folder(tmp_path):
    config = write_config(tmp_path, tiny_raw(2, tracking={"backend": "mlflow"}))
    result = fedmae("finetune", "--config", str(config), "--output", "ft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "ft"
    client = store(out / "mlruns")
    logged = runs_by_name(client, "tiny2d")["tiny2d/finetune"]
    run_id, records = logged.info.run_id, metrics_log(out)
    assert logged.info.status == "FINISHED"
    assert history(client, run_id, "finetune/train_loss") == {e: pytest.approx(r["train_loss"]) for e, r in records.items()}
    assert history(client, run_id, "finetune/val_mean_auc") == defined({e: r["val_mean_auc"] for e, r in records.items()})
    assert set(history(client, run_id, "finetune/images_per_s")) == {1, 2, 3}
    report = json.loads((out / "test_metrics.json").read_text())
    for part, metrics in {"pooled": report["pooled"], **report["sites"]}.items():
        assert history(client, run_id, f"test/{part}/mean_auc") == defined({3: metrics["mean_auc"]})
    assert "config.yaml" in artifacts(client, run_id)
    stored = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(stored.read_text()) == load_config(config).to_dict()


@pytest.mark.parametrize("command", ["pretrain", "simulate"])
def test_a_missing_package_stops_the_command_in_one_line_before_anything_is_written(tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    config = write_config(tmp_path, tiny_raw(2, tracking={"backend": "mlflow"}))
    result = fedmae(command, "--config", str(config), "--output", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("fedmae: error: tracking.backend: mlflow needs the mlflow package, "
                                                      "which is not installed; pip install fedmae[tracking]")
    assert not (tmp_path / "out").exists()


def test_a_federated_run_tracks_every_round_line_at_the_server_and_no_site_tracks(tmp_path):
    grid, run_config = setup_run(tmp_path, federated={"finetune": "federated"}, tracking={"backend": "tensorboard"})

    def crash_in_pretraining_round_2(request: Message) -> str | None:
        config = request.content["config"]
        crashes = request.metadata.message_type == "train" and config["phase"] == "pretrain" and int(config["round"]) == 2
        return "out of memory at site-1" if crashes else None

    grid.crashes = {101: crash_in_pretraining_round_2}
    summary = run(grid, run_config)
    out = Path(run_config["output-dir"])
    logged, lines = events(out / "tensorboard"), rounds_log(run_config)
    site_lines = {(r["phase"], r["round"], r["site"]): r for r in lines if r.get("status") == "ok"}
    for (phase, round_, site), line in site_lines.items():
        for figure in ("train_loss", "update_norm", "seconds"):
            assert curve(logged, f"{phase}-sites/{site}/{figure}")[round_] == pytest.approx(line[figure], rel=1e-6)
    assert curve(logged, "pretrain-sites/site-1/ok") == {1: 1.0, 2: 0.0}
    assert "failed: RuntimeError: out of memory at site-1" in text(logged, "pretrain-sites/site-1/status")[0]
    # Round 1's validation rode on round 2's training message, which site-1 never answered.
    assert "evaluation failed" in text(logged, "pretrain-sites/site-1/evaluation_status")[0]
    assert curve(logged, "pretrain/usable") == {1: 2.0, 2: 1.0}
    # Bytes: the weights of one message, to each sampled site and back from each that answered.
    sent = next(m for m in grid.sent if m.metadata.message_type == "train" and m.content["config"]["phase"] == "pretrain")
    size = nbytes(sent.content["arrays"].to_torch_state_dict())
    assert curve(logged, "pretrain/bytes") == {1: 4.0 * size, 2: 3.0 * size}
    means = {(r["round"]): r for r in lines if r.get("phase") == "pretrain" and "usable" in r}
    assert curve(logged, "pretrain/train_loss") == {n: pytest.approx(r["train_loss"], rel=1e-6) for n, r in means.items()}
    assert set(curve(logged, "pretrain/val_loss")) == {1, 2} and set(curve(logged, "pretrain-sites/site-0/val_loss")) == {1, 2}
    assert set(curve(logged, "finetune/train_loss")) == set(curve(logged, "finetune/usable")) == {1, 2}
    pooled = summary["finetune"]["test"]["pooled (example-weighted mean)"]["mean_auc"]
    assert curve(logged, "test/pooled/mean_auc") == defined({2: pooled}, rel=1e-6)
    # Only the server tracked: the sites' state folders hold no tracking files.
    assert [p.relative_to(out) for p in out.rglob("*") if p.name in ("tensorboard", "mlruns")] == [Path("tensorboard")]


@pytest.mark.slow
def test_a_federated_run_with_differential_privacy_tracks_the_privacy_spent_in_mlflow(tmp_path):
    grid, run_config = setup_run(tmp_path, federated={"min_sites": 2, "privacy": {"dp": "server", "noise_multiplier": 1.0,
                                                                                  "clipping_norm": 1.0}},
                                 tracking={"backend": "mlflow", "run_name": "dp-trial"})
    run(grid, run_config)
    client = store(Path(run_config["output-dir"]) / "mlruns")
    logged = runs_by_name(client, "tiny2d")["dp-trial"]
    spent = {r["round"]: r["epsilon"] for r in rounds_log(run_config) if "epsilon" in r}
    assert history(client, logged.info.run_id, "pretrain/epsilon") == {n: pytest.approx(e) for n, e in spent.items()}
    assert set(history(client, logged.info.run_id, "pretrain/clipping_norm")) == {1, 2}
    assert logged.data.tags["fedmae.command"] == "federated" and logged.info.status == "FINISHED"


@pytest.mark.slow
def test_a_comparison_in_tensorboard_keeps_each_runs_curves_in_its_folder_and_the_outcome_at_the_top(tmp_path):
    raw = tiny_raw(2, data={"num_sites": 2, "cases_per_site": 10}, pretrain={"epochs": 2, "warmup_epochs": 1},
                   finetune={"epochs": 2, "warmup_epochs": 1},
                   compare={"arms": ["centralised", "none"], "reconstructions": 2, "parallel": 1},
                   tracking={"backend": "tensorboard"})
    result = fedmae("compare", "--config", str(write_config(tmp_path, raw)), "--output", "cmp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "cmp"
    outcome = events(out / "tensorboard")
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert curve(outcome, "compare/centralised/test_mean_auc") == {
        2: pytest.approx(summary["arms"]["centralised"]["pooled"]["mean_auc"]["mean"], rel=1e-6)}
    assert "| centralised |" in text(outcome, "compare/table")[0]
    assert {"compare/reconstructions", "compare/pretrain_loss", "compare/downstream"} <= set(outcome.Tags()["images"])
    pretraining = events(out / "seed-0" / "centralised" / "pretrain" / "tensorboard")
    assert set(curve(pretraining, "pretrain/train_loss")) == {1, 2}
    finetuning = events(out / "seed-0" / "none" / "finetune" / "site-1" / "tensorboard")
    assert set(curve(finetuning, "finetune/train_loss")) == {1, 2} and set(curve(finetuning, "test/pooled/mean_auc")) == {2}
    assert "tiny2d/seed-0/none/finetune/site-1" in text(finetuning, "run")[0]
    # A rerun of the finished comparison logs nothing twice.
    assert fedmae("compare", "--config", str(tmp_path / "experiment.yaml"), "--output", "cmp", cwd=tmp_path).returncode == 0
    assert len(text(events(out / "tensorboard"), "compare/table")) == 1
