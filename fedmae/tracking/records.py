"""What a run tracks, taken from the records it writes anyway (never computed a second time):
each epoch's ``metrics.jsonl`` record, each line of a federated run's ``rounds.jsonl`` as the server
writes it, the selected model's test metrics, and a comparison's summary, table and figures.

The names, the same in TensorBoard and MLflow (``<phase>`` is ``pretrain`` or ``finetune``)::

    <phase>/<figure>                the run's curve, one point per epoch: train_loss, lr, val_loss or
                                    val_<metric>, seconds, images_per_s (training images / the
                                    epoch's seconds). A federated round is a point at the epochs
                                    trained so far (round x local epochs), so centralised and
                                    federated curves line up; it adds sampled, usable,
                                    kept_previous_model, bytes (the weights its messages carried),
                                    epsilon and delta (differential privacy), clipping_norm
    <phase>-sites/<site>/<figure>   one federated site's round: ok (0: failed, rejected or silent),
                                    train_loss, update_norm, seconds, images_per_s, num-examples,
                                    val_loss or val_<metric> (its validation of the global model)
    <phase>-sites/<site>/status     text: why a site's update or validation was left out
    test/<pooled or site>/<metric>  the selected model's test metrics, at the last fine-tuning epoch
    compare/...                     a comparison: see :func:`log_comparison`
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmae.config import ExperimentConfig
from fedmae.engine.loop import MetricsLog
from fedmae.federated.updates import nbytes, to_wire
from fedmae.metrics import WEIGHT, Metrics
from fedmae.tracking.trackers import NoTracker, Tracker

PHASES = ("pretrain", "finetune")
_NOT_FIGURES = ("phase", "round", "site", "status", "reason", "epoch", "step")


def epoch_metrics(record: Mapping[str, Any], train_images: int) -> dict[str, float]:
    """An epoch's record as tracked: its figures (epoch and step are the x-axis) and images/s."""
    metrics = _numbers(record)
    if record.get("seconds"):
        metrics["images_per_s"] = train_images / float(record["seconds"])
    return metrics


def validation_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """A validation's figures as tracked: ``val_loss`` as it is, task metrics as ``val_<metric>``
    (the names a centralised fine-tuning record uses); not the weight or the duplicate "main"."""
    return {(key if key.startswith("val_") else f"val_{key}"): value for key, value in _numbers(evaluation).items()
            if key not in ("main", WEIGHT)}


def report_metrics(report: Mapping[str, Any]) -> dict[str, float | None]:
    """Test metrics as ``{"pooled/mean_auc": ..., "site-0/auc/lesion": ...}``, from a fine-tuning
    run's test_metrics.json (each site as :meth:`Metrics.to_json`) or a federated run's summary
    (each site flat)."""
    pooled = report.get("pooled", report.get("pooled (example-weighted mean)"))
    parts = {"pooled": pooled, **report.get("sites", {})} if pooled is not None else dict(report.get("sites", {}))
    return {f"{part}/{name}": value for part, metrics in parts.items() for name, value in _figures(metrics).items()}


def _figures(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """One site's (or the pool's) metrics by the flat form's names: ``<metric>``, ``<kind>/<class>``."""
    if isinstance(metrics.get("main"), str):  # Metrics.to_json()
        parsed = Metrics.from_json(metrics)
        per_class = {f"{kind}/{name}": value for kind, scores in parsed.per_class.items()
                     for name, value in scores.items()}
        return {**parsed.values, **per_class}
    return {key: value for key, value in metrics.items() if key not in ("main", WEIGHT)}


class TrackedRounds(MetricsLog):
    """A federated run's ``rounds.jsonl`` that also tracks every line as it is written: at the
    server, by the strategy's checks and the run (sites never track). Lines per round: one per
    site (status, its figures), the round's own (its means, sampled, usable, seconds), the sites'
    validations, the privacy spent."""

    def __init__(self, path: str | Path, tracker: Tracker, cfg: ExperimentConfig):
        super().__init__(path)
        self.tracker, self.cfg = tracker, cfg
        fed = cfg.federated
        self.epochs_per_round = {"pretrain": fed.local_epochs, "finetune": fed.finetune_local_epochs}
        self.message_bytes: dict[str, int] = {}  # phase -> bytes of the weights one message carries
        self._round: dict[tuple[str, int], list[float]] = {}  # (phase, round) -> [images trained, updates received]

    def start_phase(self, phase: str, weights: Mapping[str, Any]) -> None:
        """The weights the phase's messages carry (the same size every round), in the wire precision."""
        if not isinstance(self.tracker, NoTracker):  # quantising a model only to count its bytes is wasted otherwise
            self.message_bytes[phase] = nbytes(to_wire(dict(weights), self.cfg.federated.transport))

    def write(self, record: Mapping[str, Any]) -> None:
        super().write(record)
        phase, run_round = record.get("phase"), record.get("round")
        if phase not in PHASES or not isinstance(run_round, int):  # e.g. the line a resumed run starts with
            return
        step = run_round * self.epochs_per_round[phase]
        if "site" in record:
            self._site_line(phase, run_round, step, record)
        elif "usable" in record:
            self._round_line(phase, run_round, step, record)
        elif "epsilon" in record:
            self.tracker.log_metrics(step, _numbers(record), phase)

    def validation(self, phase: str, run_round: int, evaluation: Mapping[str, Any]) -> None:
        """The sites' validation of a round's model, their example-weighted mean as the run took it."""
        self.tracker.log_metrics(run_round * self.epochs_per_round[phase], validation_metrics(evaluation), phase)

    def _site_line(self, phase: str, run_round: int, step: int, record: Mapping[str, Any]) -> None:
        where = f"{phase}-sites/{record['site']}"
        if "evaluation" in record:
            self.tracker.log_metrics(step, validation_metrics(record["evaluation"]), where)
            return
        status = str(record.get("status"))
        if status == "evaluation failed":
            self.tracker.log_text(f"{where}/evaluation_status", f"{status}: {record.get('reason', '')}", step)
            return
        trained = self._round.setdefault((phase, run_round), [0.0, 0.0])
        metrics = _numbers(record)
        if status in ("ok", "rejected"):  # an update came back
            trained[1] += 1
        if status == "ok" and metrics.get(WEIGHT) and metrics.get("seconds"):
            images = metrics[WEIGHT] * self.epochs_per_round[phase]
            trained[0] += images
            metrics["images_per_s"] = images / metrics["seconds"]
        metrics["ok"] = float(status == "ok")
        self.tracker.log_metrics(step, metrics, where)
        if status != "ok":
            self.tracker.log_text(f"{where}/status", f"{status}: {record.get('reason', '')}", step)

    def _round_line(self, phase: str, run_round: int, step: int, record: Mapping[str, Any]) -> None:
        images, received = self._round.pop((phase, run_round), [0.0, 0.0])
        metrics = {key: value for key, value in _numbers(record).items() if key != WEIGHT}
        if phase in self.message_bytes:  # the weights went to every sampled site and came back from those that answered
            metrics["bytes"] = self.message_bytes[phase] * (float(record.get("sampled", 0)) + received)
        if images and record.get("seconds"):
            metrics["images_per_s"] = images / float(record["seconds"])
        self.tracker.log_metrics(step, metrics, phase)


def log_comparison(tracker: Tracker, summary: Mapping[str, Any], table: str, figures: Mapping[str, Path]) -> None:
    """A comparison's outcome, at step = the runs it summarises (seeds x arms, so a rerun with
    more seeds adds points): ``compare/<arm>/test_<main>`` (pooled; ``_std`` over seeds) and
    ``compare/<arm>/<site>/test_<main>``, ``final_val_loss``, ``pretrain_seconds``,
    ``compare/paired/<a>-<b>`` (the mean paired difference), the table as text ``compare/table``
    and each figure as an image ``compare/<file name>``."""
    main = summary["main"]
    step = sum(len(entry["seeds"]) for entry in summary["arms"].values())
    metrics: dict[str, float | None] = {}
    for arm, entry in summary["arms"].items():
        metrics[f"{arm}/test_{main}"] = entry["pooled"][main]["mean"]
        if entry["pooled"][main]["n"] > 1:
            metrics[f"{arm}/test_{main}_std"] = entry["pooled"][main]["std"]
        for site, values in entry["sites"].items():
            metrics[f"{arm}/{site}/test_{main}"] = values[main]["mean"]
        for figure in ("final_val_loss", "pretrain_seconds"):
            metrics[f"{arm}/{figure}"] = entry[figure]["mean"]
    for pair, difference in summary["paired"].items():
        metrics[f"paired/{pair}"] = difference["mean"]
    tracker.log_metrics(step, metrics, "compare")
    tracker.log_text("compare/table", table, step)
    for path in figures.values():
        tracker.log_image(f"compare/{Path(path).stem}", Path(path), step)


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numeric figures (booleans as 0 / 1), without what names its place."""
    return {key: float(value) for key, value in record.items()
            if isinstance(value, (int, float)) and key not in _NOT_FIGURES}
