"""Reading back what a run tracked, with each backend's own reader: TensorBoard's
EventAccumulator on the event files, MLflow's client on the store."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def curve(accumulator: EventAccumulator, tag: str) -> dict[int, float]:
    """A scalar tag's points by step; a step logged twice fails the test."""
    points = accumulator.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag}: steps logged twice: {steps}"
    return {p.step: p.value for p in points}


def text(accumulator: EventAccumulator, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors(f"{tag}/text_summary")]


def store(folder: Path) -> MlflowClient:
    """The client of the local store fedmae keeps in ``folder`` (a run's or a comparison's mlruns/)."""
    assert (folder / "mlflow.db").is_file(), f"no MLflow store in {folder}"
    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


def runs_by_name(client: MlflowClient, experiment: str) -> dict:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs([found.experiment_id], max_results=1000)
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"runs named twice: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    points = client.get_metric_history(run_id, key)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{key}: steps logged twice: {steps}"
    return {p.step: p.value for p in points}


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of the run under ``path``."""
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return found
