"""The pre-training arms of a comparison, each on the same data, splits and budget.

An arm yields, for every site, the checkpoint whose encoder that site fine-tunes from (None: random
initialisation), and its pre-training curve: validation reconstruction loss per epoch, so arms
that exchange weights every few epochs (federated rounds) and arms that do not line up.

- centralised: `fedmae pretrain` on all sites' training images pooled;
- federated: the fedmae Flower app on Flower's simulation engine (FedAvg of the encoder);
- local: each site pre-trains on its own images alone (its own encoder);
- none: no pre-training.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmae.config import ExperimentConfig
from fedmae.data.cohort import Cohort
from fedmae.engine.loop import MetricsLog
from fedmae.engine.pretrain import pretrain
from fedmae.evaluation import weighted_mean

Progress = Callable[[str], None]
ARM_TITLES = {"centralised": "centralised", "federated": "federated (FedAvg)", "local": "local only", "none": "no pre-training"}


@dataclasses.dataclass
class Pretrained:
    encoders: dict[str, Path | None]  # site -> checkpoint to fine-tune from
    curve: list[dict[str, float]]  # [{"epoch", "val_loss"}], val loss weighted over the sites' validation cases
    seconds: float = 0.0


def single_site(cohort: Cohort, site_name: str) -> Cohort:
    """The cohort as one site sees it when it works alone."""
    return dataclasses.replace(cohort, sites=[s for s in cohort.sites if s.name == site_name])


def centralised(cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: Progress) -> Pretrained:
    epochs = cfg.pretrain.epochs

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        progress(f"pre-training epoch {epoch}/{epochs}: val loss {record['val_loss']:.4f}")

    result = pretrain(cfg, folder / "pretrain", resume=True, cohort=cohort, on_epoch_end=on_epoch)
    curve = [{"epoch": r["epoch"], "val_loss": r["val_loss"]} for r in MetricsLog(folder / "pretrain" / "metrics.jsonl").read()]
    return Pretrained({site.name: result.checkpoint for site in cohort.sites}, curve, result.seconds)


def local(cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: Progress) -> Pretrained:
    encoders, curves, seconds = {}, {}, 0.0
    epochs = cfg.pretrain.epochs
    for site in cohort.sites:
        def on_epoch(epoch: int, record: dict[str, Any], name: str = site.name) -> None:
            progress(f"{name} pre-training alone, epoch {epoch}/{epochs}: val loss {record['val_loss']:.4f}")

        run = folder / "pretrain" / site.name
        result = pretrain(cfg, run, resume=True, cohort=single_site(cohort, site.name), on_epoch_end=on_epoch)
        encoders[site.name], seconds = result.checkpoint, seconds + result.seconds
        curves[site.name] = {r["epoch"]: r["val_loss"] for r in MetricsLog(run / "metrics.jsonl").read()}
    weights = {site.name: len(site.val) for site in cohort.sites}
    curve = [{"epoch": epoch, "val_loss": weighted_mean([{"val_loss": c[epoch], "num-examples": weights[name]}
                                                         for name, c in curves.items() if epoch in c])["val_loss"]}
             for epoch in range(1, epochs + 1)]
    return Pretrained(encoders, curve, seconds)


def none(cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: Progress) -> Pretrained:
    return Pretrained({site.name: None for site in cohort.sites}, [])


def federated(cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: Progress,
              config_path: Path, overrides: list[str]) -> Pretrained:
    """FedAvg pre-training on Flower's simulation engine; Flower's own log goes to ``flower.log``.
    Under the federated fine-tuning protocol the same Flower run fine-tunes afterwards."""
    from fedmae.federated.simulate import simulate

    run = folder / "flower"
    last = run / "global" / "pretrain_last.pt"
    summary = run / "summary.json"
    finetune = "federated" if cfg.compare.finetune == "federated" else "none"
    if not summary.is_file():
        watcher = _RoundWatcher(run / "rounds.jsonl", cfg, progress)
        folder.mkdir(parents=True, exist_ok=True)
        watcher.start()
        try:
            with (folder / "flower.log").open("ab") as stream:
                status = simulate(config_path, [*overrides, f"seed={cfg.seed}", f"federated.finetune={finetune}"], cfg,
                                  len(cohort.sites), run, resume=last.exists(), stream=stream)
        finally:
            watcher.stop()
        if status != 0 or not summary.is_file():
            raise RuntimeError(f"the federated arm's Flower run failed (exit status {status}); see {folder / 'flower.log'} "
                               f"and {run / 'superlink.log'}")
    evaluations: dict[int, list[dict[str, float]]] = {}
    for record in MetricsLog(run / "rounds.jsonl").read():
        if record.get("phase") == "pretrain" and "evaluation" in record:
            evaluations.setdefault(int(record["round"]), []).append(record["evaluation"])
    curve = [{"epoch": r * cfg.federated.local_epochs, "val_loss": weighted_mean(sites)["val_loss"]}
             for r, sites in sorted(evaluations.items())]
    seconds = float(json.loads(summary.read_text()).get("seconds", 0.0))
    return Pretrained({site.name: last for site in cohort.sites}, curve, seconds)


class _RoundWatcher:
    """Reports each finished federated round (and the sites in it) while Flower runs elsewhere."""

    def __init__(self, path: Path, cfg: ExperimentConfig, progress: Progress):
        self.path, self.progress = path, progress
        self.phases = {"pretrain": ("pre-training", cfg.pretrain_rounds, cfg.federated.local_epochs),
                       "finetune": ("fine-tuning", cfg.finetune_rounds, cfg.federated.finetune_local_epochs)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        offset, sites = 0, []
        while not self._stop.wait(1.0):
            if not self.path.is_file():
                continue
            with self.path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next look
            offset += len(complete)
            for line in complete.decode().splitlines():
                record = json.loads(line)
                if record.get("phase") not in self.phases:
                    continue
                if "site" in record and "status" in record:
                    sites.append(f"{record['site']} {record['status']}")
                elif "usable" in record:
                    what, rounds, epochs = self.phases[record["phase"]]
                    self.progress(f"{what} round {record['round']}/{rounds} ({epochs} local epoch(s) each): "
                                  f"{', '.join(sites)}; train loss {record.get('train_loss', float('nan')):.4f}")
                    sites = []

