"""The trackers on their own: what each backend writes, where, when, and what a resumed run adds."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fedmae.config import ExperimentConfig, TrackingConfig, load_config  # noqa: E402
from fedmae.tracking import TrackingError, for_nested_run, open_tracker  # noqa: E402
from fedmae.typed_yaml import ConfigError  # noqa: E402
from tests.tiny import tiny_config, tiny_raw  # noqa: E402
from tests.tracking.reading import artifacts, curve, events, history, runs_by_name, store, text  # noqa: E402


def tracked(backend: str, **tracking) -> ExperimentConfig:
    return tiny_config(tracking={"backend": backend, **tracking})


def figure(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(2.0, 1.5))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return path


def test_tensorboard_writes_nothing_before_the_first_log_then_scalars_text_and_figures(tmp_path):
    run = tmp_path / "run"
    tracker = open_tracker(tracked("tensorboard"), run, "pretrain", resume=False)
    assert not run.exists()  # the run has not claimed its folder yet: nothing may be there
    with tracker:
        tracker.log_metrics(1, {"train_loss": 0.5, "val_loss": None, "lr": math.nan}, "pretrain")
        tracker.log_metrics(2, {"train_loss": 0.25}, "pretrain")
        tracker.log_text("compare/table", "| arm | auc |\n|---|---|\n| none | 0.5 |", 3)
        tracker.log_image("compare/curves", figure(tmp_path / "curves.png"), 3)
    logged = events(run / "tensorboard")
    assert curve(logged, "pretrain/train_loss") == {1: 0.5, 2: 0.25}
    assert "pretrain/val_loss" not in logged.Tags()["scalars"] and "pretrain/lr" not in logged.Tags()["scalars"]
    assert text(logged, "compare/table") == ["| arm | auc |\n|---|---|\n| none | 0.5 |"]
    image = logged.Images("compare/curves")[0]
    assert (image.step, image.width, image.height) == (3, 100, 75)
    assert "    pretrain:\n      epochs: 3" in text(logged, "config")[0]  # the resolved config, as code
    assert "tiny2d/pretrain" in text(logged, "run")[0]


def test_a_resumed_tensorboard_run_continues_its_curves_and_a_fresh_one_starts_them_again(tmp_path):
    cfg, run = tracked("tensorboard"), tmp_path / "run"
    with open_tracker(cfg, run, "pretrain", resume=False) as first:
        first.log_metrics(1, {"train_loss": 0.5}, "pretrain")
        first.log_metrics(2, {"train_loss": 0.4}, "pretrain")
    # Resumed from epoch 1's checkpoint: epoch 2 is trained (and logged) again, then epoch 3.
    with open_tracker(cfg, run, "pretrain", resume=True) as resumed:
        resumed.log_metrics(2, {"train_loss": 0.45}, "pretrain")  # kept: the first value (recomputed the same)
        resumed.log_metrics(3, {"train_loss": 0.3}, "pretrain")
    assert curve(events(run / "tensorboard"), "pretrain/train_loss") == pytest.approx({1: 0.5, 2: 0.4, 3: 0.3})
    assert len(text(events(run / "tensorboard"), "config")) == 1
    with open_tracker(cfg, run, "pretrain", resume=False) as fresh:
        fresh.log_metrics(1, {"train_loss": 0.9}, "pretrain")
    assert curve(events(run / "tensorboard"), "pretrain/train_loss") == {1: pytest.approx(0.9)}


def test_mlflow_keeps_a_local_store_in_the_run_folder_with_the_config_and_artifacts_and_no_telemetry(tmp_path):
    run = tmp_path / "run"
    tracker = open_tracker(tracked("mlflow"), run, "finetune", resume=False)
    assert not run.exists()
    with tracker:
        tracker.log_metrics(1, {"train_loss": 0.5, "val_mean_auc": None}, "finetune")
        tracker.log_metrics(2, {"train_loss": 0.25, "val_mean_auc": 0.75}, "finetune")
        tracker.log_text("compare/table", "| a |", 2)
        tracker.log_image("compare/curves", figure(tmp_path / "whatever-name.png"), 2)
    client = store(run / "mlruns")
    logged = runs_by_name(client, "tiny2d")["tiny2d/finetune"]
    assert logged.info.status == "FINISHED"
    assert history(client, logged.info.run_id, "finetune/train_loss") == {1: 0.5, 2: 0.25}
    assert history(client, logged.info.run_id, "finetune/val_mean_auc") == {2: 0.75}
    assert logged.data.params["pretrain.epochs"] == "3" and logged.data.params["tracking.backend"] == "mlflow"
    assert logged.data.tags["fedmae.run_dir"] == str(run.absolute())
    assert artifacts(client, logged.info.run_id) == {"config.yaml", "compare/table.md", "compare/curves.png"}
    # The artifacts are files in the run's folder too: nothing outside it was written.
    assert (run / "mlruns" / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()
    # Offline: MLflow's usage telemetry is off.
    from mlflow.telemetry.utils import is_telemetry_disabled

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and is_telemetry_disabled()


def test_a_resumed_mlflow_run_continues_the_same_run_and_a_failed_one_says_so(tmp_path):
    cfg, run = tracked("mlflow"), tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with open_tracker(cfg, run, "pretrain", resume=False) as first:
            first.log_metrics(1, {"train_loss": 0.5}, "pretrain")
            first.log_metrics(2, {"train_loss": 0.4}, "pretrain")
            raise KeyboardInterrupt
    client = store(run / "mlruns")
    assert runs_by_name(client, "tiny2d")["tiny2d/pretrain"].info.status == "FAILED"
    with open_tracker(cfg, run, "pretrain", resume=True) as resumed:
        resumed.log_metrics(2, {"train_loss": 0.4}, "pretrain")
        resumed.log_metrics(3, {"train_loss": 0.3}, "pretrain")
    (logged,) = runs_by_name(client, "tiny2d").values()
    assert logged.info.status == "FINISHED"
    assert history(client, logged.info.run_id, "pretrain/train_loss") == {1: 0.5, 2: 0.4, 3: 0.3}
    # A run started afresh in the folder is a new MLflow run, beside the old one.
    with open_tracker(cfg, run, "pretrain", resume=False) as fresh:
        fresh.log_metrics(1, {"train_loss": 1.0}, "pretrain")
    experiment = client.get_experiment_by_name("tiny2d").experiment_id
    newest, oldest = client.search_runs([experiment], order_by=["attributes.start_time DESC"])
    assert oldest.info.run_id == logged.info.run_id
    assert history(client, newest.info.run_id, "pretrain/train_loss") == {1: 1.0}


@pytest.mark.parametrize("backend,module", [("tensorboard", "torch.utils.tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(TrackingError) as refused:
        open_tracker(tracked(backend), tmp_path / "run", "pretrain", resume=False)
    assert str(refused.value) == (f"tracking.backend: {backend} needs the {backend} package, which is not installed; "
                                  "pip install fedmae[tracking]")
    assert not (tmp_path / "run").exists()


def test_an_mlflow_store_that_cannot_be_opened_is_refused_before_training(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(TrackingError, match=r"^tracking\.uri: cannot open the MLflow store sqlite:///.*a-file/x/mlflow\.db"):
        open_tracker(tracked("mlflow", uri=f"sqlite:///{blocked}/x/mlflow.db"), tmp_path / "run", "pretrain",
                     resume=False)


def test_tracking_settings_are_checked_and_a_store_folder_made_absolute(tmp_path, monkeypatch):
    import yaml

    def load(**tracking) -> ExperimentConfig:
        path = tmp_path / "experiment.yaml"
        path.write_text(yaml.safe_dump(tiny_raw(2, tracking=tracking)))
        return load_config(path)

    with pytest.raises(ConfigError, match=r"tracking\.uri: is read by the mlflow backend only"):
        load(backend="tensorboard", uri="stores")
    with pytest.raises(ConfigError, match=r"tracking\.run_name: must not be empty"):
        load(backend="mlflow", run_name=" ")
    monkeypatch.chdir(tmp_path)
    assert load(backend="mlflow", uri="stores/shared").tracking.uri == str(tmp_path / "stores" / "shared")
    assert load(backend="mlflow", uri="http://127.0.0.1:5000").tracking.uri == "http://127.0.0.1:5000"
    assert ExperimentConfig().tracking == TrackingConfig(backend="none", run_name=None, uri=None)


def test_nested_runs_are_named_under_the_comparison_and_share_its_mlflow_store(tmp_path):
    seed = for_nested_run(tracked("mlflow"), "seed-0", root=tmp_path / "cmp")
    arm = for_nested_run(seed, "centralised/pretrain")
    assert arm.tracking.run_name == "tiny2d/seed-0/centralised/pretrain"
    assert arm.tracking.uri == str(tmp_path / "cmp" / "mlruns")
    board = for_nested_run(tracked("tensorboard", run_name="lr-1e-2"), "seed-0", root=tmp_path / "cmp")
    assert (board.tracking.run_name, board.tracking.uri) == ("lr-1e-2/seed-0", None)
    untracked = tiny_config()
    assert for_nested_run(untracked, "seed-0", root=tmp_path) is untracked
