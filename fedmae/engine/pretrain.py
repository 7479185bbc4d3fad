"""Centralised MAE self pre-training: images only, resumable.

Each epoch seeds its own randomness (shuffling, crops, flips, masking) from (seed, epoch), so an
interrupted run resumed from its last checkpoint (written every ``pretrain.checkpoint_every``
epochs) ends with exactly the weights of an uninterrupted one. Federated sites run the same
:func:`pretrain_epoch` on their own images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedmae.checkpoint import load_checkpoint, save_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.data.badfiles import BAD_CASES, BadFiles
from fedmae.data.cohort import Cohort, load_cohort
from fedmae.data.datasets import ImageSource, pretraining_dataset
from fedmae.data.loader import EpochLoader, epoch_seed
from fedmae.data.splits import SiteData
from fedmae.engine.device import autocast, compiled, resolve_device, to_device
from fedmae.engine.loop import MetricsLog, Schedule, due, seed_everything, train_one_epoch
from fedmae.engine.optim import build_optimizer
from fedmae.engine.runs import RunResult, Stopwatch, open_run, restore_or_start
from fedmae.models.factory import build_mae
from fedmae.models.mae import MaskedAutoencoder
from fedmae.tracking import NoTracker, check_tracking, epoch_metrics, open_tracker

log = logging.getLogger(__name__)

LAST = "checkpoint_last.pt"
RUN_OUTPUTS = (LAST, "metrics.jsonl", "splits.json", "data_summary.json", "bad_cases.csv",  # cleared by --force
               "tensorboard", "mlruns")
EpochCallback = Callable[[int, dict[str, Any]], None]


def mae_loss(model: MaskedAutoencoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    loss, _, _ = model(to_device(batch, device)["image"])
    return loss


def pretrain_schedule(cfg: ExperimentConfig, num_images: int) -> Schedule:
    """Warm-up and cosine over steps; a step is ``batch_size`` images (each giving
    ``data.samples_per_volume`` crops), so an epoch is ceil(images / batch_size) steps."""
    steps_per_epoch = math.ceil(num_images / cfg.pretrain.batch_size)
    p = cfg.pretrain
    return Schedule(cfg.pretrain_lr, p.min_lr, p.warmup_epochs * steps_per_epoch, p.epochs * steps_per_epoch)


def pretraining_loaders(images: dict[str, Sequence[ImageSource]], cfg: ExperimentConfig, prep, device: torch.device,
                        bad_files: BadFiles | None = None) -> tuple[EpochLoader, EpochLoader]:
    """(training, validation) loaders over the images of the ``train`` and ``val`` splits.

    ``bad_files``: the run's record of files that fail to load (default: data.skip_bad_cases, log only)."""
    p, workers = cfg.pretrain, cfg.data.num_workers
    bad_files = bad_files or BadFiles(cfg.data.skip_bad_cases)
    train = EpochLoader(pretraining_dataset(images["train"], cfg, prep, train=True), p.batch_size, True, workers, device,
                        bad_files)
    val = EpochLoader(pretraining_dataset(images["val"], cfg, prep, train=False), p.batch_size, False, workers, device,
                      bad_files)
    return train, val


def pretrain_epoch(
    model: MaskedAutoencoder,
    loader: EpochLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    cfg: ExperimentConfig,
    epoch: int,
    step: int,
    device: torch.device,
    desc: str = "pretrain",
    loss_fn: Callable[[MaskedAutoencoder, dict[str, torch.Tensor]], torch.Tensor] = mae_loss,
) -> tuple[float, int]:
    """One reproducible epoch of MAE training (0-based ``epoch``); returns (mean loss, next step).

    ``loss_fn``: the batch loss; federated sites add a proximal term to :func:`mae_loss` (FedProx).
    """
    seed_everything(epoch_seed(cfg.seed, epoch, stream=1))
    batches = loader.epoch(epoch_seed(cfg.seed, epoch))
    return train_one_epoch(model, batches, optimizer, loss_fn, schedule, step, device, cfg.pretrain.clip_grad, desc)


@torch.no_grad()
def reconstruction_loss(model: MaskedAutoencoder, loader: EpochLoader, cfg: ExperimentConfig, device: torch.device) -> float:
    """Masked-patch MSE on held-out images with fixed masks, so epochs are comparable."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # leave the training RNG stream untouched
        torch.manual_seed(cfg.seed)
        for batch in loader.epoch(cfg.seed):
            with autocast(device):
                loss = mae_loss(model, batch)
            total += loss.double() * len(batch["image"])
            count += len(batch["image"])
    return float(total) / max(count, 1)


def site_images(sites: Sequence[SiteData], split: str) -> list[ImageSource]:
    """The images of one split of every site: the only thing pre-training reads. Training also
    uses the images that have no labels."""
    extra = "unlabelled" if split == "train" else None
    return [case.image for site in sites for name in (split, extra) if name for case in site.split(name)]


def pretrain(
    cfg: ExperimentConfig,
    output_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    cohort: Cohort | None = None,
    on_epoch_end: EpochCallback | None = None,
    track: bool = False,
) -> RunResult:
    """Pre-train an MAE on the pooled training images of all sites; returns the last checkpoint.

    ``cohort``: the data, already loaded (else loaded from the config, with its reports written
    to ``output_dir``). ``force``: start over in an output folder that holds something else
    (see :func:`fedmae.engine.runs.check_output_dir`). ``track``: also send each epoch's record
    to the tracker ``cfg.tracking`` names (the user's runs; a federated site never tracks)."""
    if track:
        check_tracking(cfg)  # a missing package is refused before the folder is touched
    watch = Stopwatch()
    output_dir = Path(output_dir)
    last = output_dir / LAST
    device = resolve_device(cfg.device)
    resumed = open_run(output_dir, "pretrain", "mae", cfg, last, resume=resume, force=force,
                       previous_outputs=RUN_OUTPUTS)
    cohort = load_cohort(cfg, report_dir=output_dir) if cohort is None else cohort
    images = {split: site_images(cohort.sites, split) for split in ("train", "val")}
    bad_files = BadFiles(cfg.data.skip_bad_cases, output_dir / BAD_CASES, cohort.catalog.cases, fresh=not resume)
    train_loader, val_loader = pretraining_loaders(images, cfg, cohort.prep, device, bad_files)

    seed_everything(cfg.seed)  # the initial weights are part of the run's reproducibility
    model = build_mae(cfg).to(device)
    p = cfg.pretrain
    optimizer = build_optimizer(model, cfg.pretrain_lr, p.weight_decay, p.betas)
    schedule = pretrain_schedule(cfg, len(images["train"]))
    metrics_log = MetricsLog(output_dir / "metrics.jsonl")
    resumed = restore_or_start(resumed, last, model, optimizer, metrics_log)
    start_epoch, step = (resumed["epoch"], resumed["step"]) if resumed else (0, 0)
    log.info(
        "pre-training %s on %d images (%d validation), lr %.3g (base %.3g x %d crops per step / 256: %d images x %d "
        "crops), %d epochs of %d steps",
        cfg.model.name, len(images["train"]), len(images["val"]), cfg.pretrain_lr, p.base_lr,
        cfg.pretrain_crops_per_step, p.batch_size, cfg.data.samples_per_volume, p.epochs,
        math.ceil(len(images["train"]) / p.batch_size),
    )
    net = compiled(model, cfg.compile)
    tracker = open_tracker(cfg, output_dir, "pretrain", resume=resumed is not None) if track else NoTracker()

    record: dict[str, Any] = {}
    with tracker:
        for epoch in range(start_epoch, p.epochs):
            epoch_watch = Stopwatch()
            train_loss, step = pretrain_epoch(net, train_loader, optimizer, schedule, cfg, epoch, step, device,
                                              desc=f"pretrain {epoch + 1}/{p.epochs}")
            record = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss}
            if due(epoch + 1, p.eval_every, p.epochs):
                record["val_loss"] = reconstruction_loss(net, val_loader, cfg, device)
            record["seconds"] = round(epoch_watch.seconds, 3)
            metrics_log.write(record)
            tracker.log_metrics(epoch + 1, epoch_metrics(record, len(images["train"])), "pretrain")
            if due(epoch + 1, p.checkpoint_every, p.epochs):
                save_checkpoint(
                    last, kind="mae", model_state=model.state_dict(), config=cfg.to_dict(), epoch=epoch + 1, step=step,
                    optimizer_state=optimizer.state_dict(), metrics=record,
                )
            log.info("pretrain epoch %d: train loss %.4f%s", epoch + 1, train_loss,
                     f", val loss {record['val_loss']:.4f}" if "val_loss" in record else "")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    if not record:  # resumed a finished run: report what it ended with
        record = load_checkpoint(last, expect_kind="mae")["metrics"]
    return RunResult(output_dir, last, record, watch.seconds)
