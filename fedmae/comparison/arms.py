"""The pre-training arms of a comparison, each on the same data, splits and budget.

An arm leaves, for every site, the checkpoint whose encoder that site fine-tunes from
(:func:`encoder_checkpoint`; None: random initialisation), and yields its pre-training curve:
validation reconstruction loss per epoch, so arms that exchange weights every few epochs (federated
rounds) and arms that do not line up.

- centralised: `fedmae pretrain` on all sites' training images pooled;
- federated: the fedmae Flower app on Flower's simulation engine (FedAvg of the encoder);
- local: each site pre-trains on its own images alone (its own encoder; one run per site);
- none: no pre-training (no run: its sites fine-tune from a random initialisation).
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
from fedmae.engine.pretrain import LAST, pretrain
from fedmae.federated.run_record import failure, finished_summary
from fedmae.metrics import weighted_mean

Progress = Callable[[str], None]
ARM_TITLES = {"centralised": "centralised", "federated": "federated (FedAvg)", "local": "local only", "none": "no pre-training"}


@dataclasses.dataclass
class Pretrained:
    curve: list[dict[str, float]]  # [{"epoch", "val_loss"}], val loss weighted over the sites' validation cases
    seconds: float = 0.0


def encoder_checkpoint(arm: str, folder: Path, site: str) -> Path | None:
    """Where an arm's pre-training (in ``folder``) leaves the encoder ``site`` fine-tunes from;
    None for no pre-training. Known before the arm runs, so fine-tuning can be planned with it."""
    return {"centralised": folder / "pretrain" / LAST,
            "federated": folder / "flower" / "global" / "pretrain_last.pt",
            "local": folder / "pretrain" / site / LAST}.get(arm)


def single_site(cohort: Cohort, site_name: str) -> Cohort:
    """The cohort as one site sees it when it works alone."""
    return dataclasses.replace(cohort, sites=[s for s in cohort.sites if s.name == site_name])


def centralised(cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: Progress) -> Pretrained:
    epochs = cfg.pretrain.epochs

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            progress(f"pre-training epoch {epoch}/{epochs}: val loss {record['val_loss']:.4f}")

    result = pretrain(cfg, folder / "pretrain", resume=True, cohort=cohort, on_epoch_end=on_epoch, track=True)
    return Pretrained(_curve(folder / "pretrain"), result.seconds)


def local_site(cfg: ExperimentConfig, cohort: Cohort, site_name: str, folder: Path, progress: Progress) -> Pretrained:
    """One site of the local arm: it pre-trains on its own images alone. Its curve is its own."""
    epochs = cfg.pretrain.epochs

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            progress(f"{site_name} pre-training alone, epoch {epoch}/{epochs}: val loss {record['val_loss']:.4f}")

    run = folder / "pretrain" / site_name
    result = pretrain(cfg, run, resume=True, cohort=single_site(cohort, site_name), on_epoch_end=on_epoch, track=True)
    return Pretrained(_curve(run), result.seconds)


def _curve(run: Path) -> list[dict[str, float]]:
    return [{"epoch": r["epoch"], "val_loss": r["val_loss"]} for r in MetricsLog(run / "metrics.jsonl").read() if "val_loss" in r]


def local(cohort: Cohort, parts: dict[str, Pretrained]) -> Pretrained:
    """The local arm from its sites' runs: each site's encoder, and the curve averaged over the
    sites weighted by their validation cases."""
    weights = {site.name: len(site.val) for site in cohort.sites}
    curves = {name: {p["epoch"]: p["val_loss"] for p in part.curve} for name, part in parts.items()}
    evaluated = sorted({epoch for c in curves.values() for epoch in c})
    curve = [{"epoch": epoch, "val_loss": weighted_mean([{"val_loss": c[epoch], "num-examples": weights[name]}
                                                         for name, c in curves.items() if epoch in c])["val_loss"]}
             for epoch in evaluated]
    return Pretrained(curve, sum(part.seconds for part in parts.values()))


def federated(cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: Progress,
              cpus: int | None = None) -> Pretrained:
    """FedAvg pre-training on Flower's simulation engine; Flower's own log goes to ``flower.log``.
    Under the federated fine-tuning protocol the same Flower run fine-tunes afterwards.
    ``cpus``: the cores the simulation may use (default: the machine's)."""
    from fedmae.federated.simulate import simulate

    run = folder / "flower"
    last = encoder_checkpoint("federated", folder, "")
    finetune = "federated" if cfg.compare.finetune == "federated" else "none"
    summary = finished_summary(run)
    if summary is None:
        watcher = _RoundWatcher(run / "rounds.jsonl", cfg, progress)
        folder.mkdir(parents=True, exist_ok=True)
        watcher.start()
        try:
            with (folder / "flower.log").open("ab") as stream:
                run_cfg = dataclasses.replace(cfg, federated=dataclasses.replace(cfg.federated, finetune=finetune))
                status = simulate(run_cfg, len(cohort.sites), run, resume=last.exists(), stream=stream, cpus=cpus)
        finally:
            watcher.stop()
        summary = finished_summary(run)
        if summary is None:  # flwr run exits 0 even when the ServerApp raised: fedmae's record decides
            raise RuntimeError(f"the federated arm's Flower run failed ({failure(run) or f'exit status {status}'}); "
                               f"see {folder / 'flower.log'} and {run / 'superlink.log'}")
    evaluations: dict[int, list[dict[str, float]]] = {}
    for record in MetricsLog(run / "rounds.jsonl").read():
        if record.get("phase") == "pretrain" and "evaluation" in record:
            evaluations.setdefault(int(record["round"]), []).append(record["evaluation"])
    curve = [{"epoch": r * cfg.federated.local_epochs, "val_loss": weighted_mean(sites)["val_loss"]}
             for r, sites in sorted(evaluations.items())]
    seconds = float(summary.get("seconds", 0.0))
    return Pretrained(curve, seconds)


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
        offset, sites, stopping = 0, [], False
        while not stopping:
            # One last look after stop(): the run may end within a second of its last round.
            stopping = self._stop.wait(1.0)
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

