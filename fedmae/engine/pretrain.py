"""Centralised MAE self pre-training: images only, one checkpoint per epoch, resumable.

Each epoch seeds its own randomness (shuffling, crops, flips, masking) from (seed, epoch), so an
interrupted run resumed from its last checkpoint ends with exactly the weights of an uninterrupted
one. Federated sites run the same :func:`pretrain_epoch` on their own images.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fedmae.checkpoint import load_checkpoint, save_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.data.cohort import Cohort, SiteData, load_cohort
from fedmae.data.datasets import ImageSource, epoch_seed, make_loader, pretraining_dataset
from fedmae.engine.loop import MetricsLog, Schedule, autocast, resolve_device, seed_everything, train_one_epoch
from fedmae.engine.optim import build_optimizer
from fedmae.engine.runs import RunResult, Stopwatch, prepare_run_dir, restore_or_start
from fedmae.models.factory import build_mae
from fedmae.models.mae import MaskedAutoencoder

log = logging.getLogger(__name__)

LAST = "checkpoint_last.pt"
EpochCallback = Callable[[int, dict[str, Any]], None]


def mae_loss(model: MaskedAutoencoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    loss, _, _ = model(batch["image"].to(device, non_blocking=True))
    return loss


def pretrain_schedule(cfg: ExperimentConfig, num_images: int) -> Schedule:
    steps_per_epoch = math.ceil(num_images / cfg.pretrain.batch_size)
    p = cfg.pretrain
    return Schedule(cfg.pretrain_lr, p.min_lr, p.warmup_epochs * steps_per_epoch, p.epochs * steps_per_epoch)


def pretrain_epoch(
    model: MaskedAutoencoder,
    dataset: Dataset,
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
    loader = make_loader(dataset, cfg.pretrain.batch_size, epoch_seed(cfg.seed, epoch), True, cfg.data.num_workers)
    return train_one_epoch(model, loader, optimizer, loss_fn, schedule, step, device, cfg.pretrain.clip_grad, desc)


@torch.no_grad()
def reconstruction_loss(model: MaskedAutoencoder, dataset: Dataset, cfg: ExperimentConfig, device: torch.device) -> float:
    """Masked-patch MSE on held-out images with fixed masks, so epochs are comparable."""
    model.eval()
    loader = make_loader(dataset, cfg.pretrain.batch_size, cfg.seed, False, cfg.data.num_workers)
    total, count = 0.0, 0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # leave the training RNG stream untouched
        torch.manual_seed(cfg.seed)
        for batch in loader:
            with autocast(device):
                loss = mae_loss(model, batch)
            total += loss.item() * len(batch["image"])
            count += len(batch["image"])
    return total / max(count, 1)


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
    cohort: Cohort | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> RunResult:
    """Pre-train an MAE on the pooled training images of all sites; returns the last checkpoint.

    ``cohort``: the data, already loaded (else loaded from the config, with its reports written
    to ``output_dir``)."""
    watch = Stopwatch()
    output_dir = Path(output_dir)
    last = output_dir / LAST
    prepare_run_dir(output_dir, cfg, last, resume)
    device = resolve_device(cfg.device)
    cohort = load_cohort(cfg, report_dir=output_dir) if cohort is None else cohort
    train_set = pretraining_dataset(site_images(cohort.sites, "train"), cfg, cohort.prep, train=True)
    val_set = pretraining_dataset(site_images(cohort.sites, "val"), cfg, cohort.prep, train=False)

    seed_everything(cfg.seed)  # the initial weights are part of the run's reproducibility
    model = build_mae(cfg).to(device)
    p = cfg.pretrain
    optimizer = build_optimizer(model, cfg.pretrain_lr, p.weight_decay, p.betas)
    schedule = pretrain_schedule(cfg, len(train_set))
    metrics_log = MetricsLog(output_dir / "metrics.jsonl")
    resumed = restore_or_start(last, "mae", cfg, model, optimizer, metrics_log, resume)
    start_epoch, step = (resumed["epoch"], resumed["step"]) if resumed else (0, 0)
    log.info(
        "pre-training %s on %d images (%d validation), lr %.3g (base %.3g x batch %d / 256), %d epochs",
        cfg.model.name, len(train_set), len(val_set), cfg.pretrain_lr, p.base_lr, p.batch_size, p.epochs,
    )

    record: dict[str, Any] = {}
    for epoch in range(start_epoch, p.epochs):
        epoch_watch = Stopwatch()
        train_loss, step = pretrain_epoch(
            model, train_set, optimizer, schedule, cfg, epoch, step, device, desc=f"pretrain {epoch + 1}/{p.epochs}"
        )
        record = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "val_loss": reconstruction_loss(model, val_set, cfg, device),
            "seconds": round(epoch_watch.seconds, 3),
        }
        metrics_log.write(record)
        save_checkpoint(
            last, kind="mae", model_state=model.state_dict(), config=cfg.to_dict(), epoch=epoch + 1, step=step,
            optimizer_state=optimizer.state_dict(), metrics=record,
        )
        log.info("pretrain epoch %d: train loss %.4f, val loss %.4f", epoch + 1, train_loss, record["val_loss"])
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    if not record:  # resumed a finished run: report what it ended with
        record = load_checkpoint(last, expect_kind="mae")["metrics"]
    return RunResult(output_dir, last, record, watch.seconds)
