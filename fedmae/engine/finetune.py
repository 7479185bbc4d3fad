"""Fine-tuning a (pre-trained or random) encoder for classification or segmentation.

The model is selected on the validation cases (best main metric, every ``finetune.eval_every``
epochs) and reported on the test cases, pooled and per site. Like pre-training, every epoch is
seeded from (seed, epoch) and the run resumes from its last checkpoint. A federated site trains
its rounds with the same :func:`finetune_epoch`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn

from fedmae.checkpoint import load_checkpoint, load_encoder_checkpoint, save_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.data.badfiles import BAD_CASES, BadFiles
from fedmae.data.catalog import Case
from fedmae.data.cohort import Cohort, load_cohort
from fedmae.data.datasets import finetuning_dataset, label_subset
from fedmae.data.loader import EpochLoader, SeededDataset, epoch_seed
from fedmae.data.preprocess import Preprocessing, check_encoder_input
from fedmae.data.tasks import TaskSpec
from fedmae.engine.device import compiled, resolve_device, to_device
from fedmae.engine.loop import MetricsLog, Schedule, due, seed_everything, train_one_epoch
from fedmae.engine.optim import build_optimizer
from fedmae.engine.pretrain import EpochCallback
from fedmae.engine.runs import RunResult, Stopwatch, open_run, restore_or_start
from fedmae.evaluation import evaluate
from fedmae.files import atomic_write_json
from fedmae.metrics import Metrics
from fedmae.models.factory import build_finetune_model
from fedmae.models.state import encoder_state, load_encoder, load_model_state
from fedmae.tracking import NoTracker, check_tracking, epoch_metrics, open_tracker, report_metrics

log = logging.getLogger(__name__)

LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
# What a fine-tuning run writes; --force clears it before starting over.
RUN_OUTPUTS = (LAST, BEST, "metrics.jsonl", "test_metrics.json", "splits.json", "data_summary.json", "bad_cases.csv",
               "tensorboard", "mlruns")


def task_loss(task: TaskSpec) -> nn.Module:
    """BCE for multi-label, CE for multi-class, Dice + CE for segmentation (sigmoid or softmax)."""
    if task.type == "classification":
        return nn.BCEWithLogitsLoss() if task.multi_label else nn.CrossEntropyLoss()
    if task.multi_label:
        return DiceCELoss(sigmoid=True)
    return DiceCELoss(to_onehot_y=True, softmax=True)


def pretrained_encoder(checkpoint: str | Path, cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    """The encoder weights (names without ``encoder.``) of a pre-training (or fine-tuning)
    checkpoint; refused in one line when it was trained on inputs other than this run's crops.
    A foreign encoder (timm, MAE, MONAI, SelfMedMAE, safetensors) comes fitted to the model by
    :mod:`fedmae.interop`, which logs what it dropped and changed."""
    from fedmae.interop import import_encoder_for, is_fedmae_checkpoint

    if not is_fedmae_checkpoint(checkpoint):
        return import_encoder_for(checkpoint, cfg).weights
    payload = load_encoder_checkpoint(checkpoint)
    trained_on = ((payload.get("config") or {}).get("model") or {}).get("img_size")
    check_encoder_input(trained_on, cfg, str(checkpoint))
    return encoder_state(payload["model"])


def finetune_schedule(cfg: ExperimentConfig, num_cases: int) -> Schedule:
    """Warm-up and cosine over steps of ``batch_size`` cases (each giving ``data.samples_per_volume`` crops)."""
    f = cfg.finetune
    steps_per_epoch = max(1, math.ceil(num_cases / f.batch_size))
    return Schedule(cfg.finetune_lr, f.min_lr, f.warmup_epochs * steps_per_epoch, f.epochs * steps_per_epoch)


def finetuning_loader(cases: list[Case], task: TaskSpec, cfg: ExperimentConfig, prep: Preprocessing,
                      device: torch.device, bad_files: BadFiles | None = None) -> EpochLoader:
    """Shuffled, augmented batches of the labelled training ``cases`` (``bad_files``: see
    :func:`fedmae.engine.pretrain.pretraining_loaders`)."""
    dataset = finetuning_dataset(cases, task, cfg, prep, train=True)
    return EpochLoader(dataset, cfg.finetune.batch_size, True, cfg.data.num_workers, device,
                       bad_files or BadFiles(cfg.data.skip_bad_cases))


def finetune_epoch(
    model: nn.Module,
    loader: EpochLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    criterion: nn.Module,
    cfg: ExperimentConfig,
    epoch: int,
    step: int,
    device: torch.device,
    desc: str = "finetune",
) -> tuple[float, int]:
    """One reproducible epoch of supervised training (0-based ``epoch``); returns (mean loss, next step)."""

    def loss_of_batch(net: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, device)
        return criterion(net(batch["image"]).float(), batch["label"])

    seed_everything(epoch_seed(cfg.seed, epoch, stream=3))
    batches = loader.epoch(epoch_seed(cfg.seed, epoch, stream=2))
    return train_one_epoch(model, batches, optimizer, loss_of_batch, schedule, step, device, cfg.finetune.clip_grad, desc)


def finetune(
    cfg: ExperimentConfig,
    output_dir: str | Path,
    *,
    encoder: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    cohort: Cohort | None = None,
    on_epoch_end: EpochCallback | None = None,
    track: bool = False,
) -> RunResult:
    """Fine-tune on the labelled training cases of all sites (``finetune.label_fraction`` of them).

    ``encoder``: a checkpoint whose encoder initialises the model; None trains from scratch.
    ``track``: also send each epoch's record and the test metrics to the tracker ``cfg.tracking``
    names (the user's runs; a federated site fine-tuning alone never tracks).
    Returns the best-on-validation checkpoint and its test metrics (pooled and per site).
    """
    if track:
        check_tracking(cfg)  # a missing package is refused before the folder is touched
    watch = Stopwatch()
    output_dir = Path(output_dir)
    last, best = output_dir / LAST, output_dir / BEST
    device = resolve_device(cfg.device)
    init = "random" if encoder is None else str(encoder)
    # The encoder is read and checked before the run's folder is touched: a refused one leaves nothing behind.
    start = None if encoder is None else pretrained_encoder(encoder, cfg)
    resumed = open_run(output_dir, "finetune", "finetune", cfg, last, resume=resume, force=force, init=init,
                       previous_outputs=RUN_OUTPUTS)
    cohort = load_cohort(cfg, report_dir=output_dir) if cohort is None else cohort
    task = cohort.task
    f = cfg.finetune

    labelled: list[Case] = [
        case for site in cohort.sites for case in label_subset(site.train, f.label_fraction, cfg.seed, site.name)
    ]
    if not labelled:
        raise ValueError(f"{cohort.catalog.root}: no labelled training cases to fine-tune on")
    bad_files = BadFiles(cfg.data.skip_bad_cases, output_dir / BAD_CASES, cohort.catalog.cases, fresh=not resume)
    train_loader = finetuning_loader(labelled, task, cfg, cohort.prep, device, bad_files)
    val_loader = evaluation_loader(finetuning_dataset(cohort.cases("val"), task, cfg, cohort.prep, train=False), task,
                                   cfg, device, bad_files)
    seed_everything(cfg.seed)  # same head/decoder initialisation for every arm of a comparison
    model = build_finetune_model(cfg, task.num_outputs)
    if start is not None:
        load_encoder(model, start)
    model.to(device)
    optimizer = build_optimizer(model, cfg.finetune_lr, f.weight_decay, f.betas, f.layer_decay)
    schedule = finetune_schedule(cfg, len(labelled))
    criterion = task_loss(task)
    extra = {"task": {"type": task.type, "multi_label": task.multi_label, "class_names": list(task.class_names)}, "init": init}

    metrics_log = MetricsLog(output_dir / "metrics.jsonl")
    resumed = restore_or_start(resumed, last, model, optimizer, metrics_log)
    start_epoch, step = (resumed["epoch"], resumed["step"]) if resumed else (0, 0)
    best_score = resumed["extra"].get("best_score", -math.inf) if resumed else -math.inf
    val: dict[str, Any] = resumed["metrics"].get("val", {}) if resumed else {}
    log.info(
        "fine-tuning (%s, init %s) on %d labelled cases, lr %.3g (base %.3g x %d crops per step / 256), %d epochs",
        task.type, init, len(labelled), cfg.finetune_lr, f.base_lr, cfg.finetune_crops_per_step, f.epochs,
    )
    net = compiled(model, cfg.compile)
    unsaved_best: dict[str, Any] | None = None  # the best epoch since the last checkpoint, kept in memory

    tracker = open_tracker(cfg, output_dir, "finetune", resume=resumed is not None) if track else NoTracker()
    with tracker:
        for epoch in range(start_epoch, f.epochs):
            epoch_watch = Stopwatch()
            train_loss, step = finetune_epoch(net, train_loader, optimizer, schedule, criterion, cfg, epoch, step,
                                              device, f"finetune {epoch + 1}/{f.epochs}")
            record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[-1]["lr"],
                                      "train_loss": train_loss}
            evaluated = due(epoch + 1, f.eval_every, f.epochs)
            if evaluated:
                scored = loader_metrics(net, val_loader, task, cfg, device)
                val = scored.to_json()  # as checkpoints hold it
                score = scored.main_value if scored.main_value is not None else -math.inf
                record[f"val_{scored.main}"] = scored.main_value
                # Ties go to the later epoch: a validation metric that saturates on a small set (AUC 1.0)
                # must not freeze the choice at the first, least-trained epoch that reached it.
                if score >= best_score or not (best.exists() or unsaved_best is not None):
                    best_score = max(score, best_score)
                    unsaved_best = {"epoch": epoch + 1, "step": step, "val": val,
                                    "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            record["seconds"] = round(epoch_watch.seconds, 3)
            metrics_log.write(record)
            tracker.log_metrics(epoch + 1, epoch_metrics(record, len(labelled)), "finetune")
            if due(epoch + 1, f.checkpoint_every, f.epochs):
                if unsaved_best is not None:
                    save_checkpoint(best, kind="finetune", model_state=unsaved_best["model"], config=cfg.to_dict(),
                                    epoch=unsaved_best["epoch"], step=unsaved_best["step"],
                                    metrics={"val": unsaved_best["val"]}, extra=extra)
                    unsaved_best = None
                save_checkpoint(
                    last, kind="finetune", model_state=model.state_dict(), config=cfg.to_dict(), epoch=epoch + 1,
                    step=step, optimizer_state=optimizer.state_dict(), metrics={"val": val},
                    extra={**extra, "best_score": best_score},
                )
            log.info("finetune epoch %d: train loss %.4f%s", epoch + 1, train_loss,
                     f", val {scored.main} {scored.main_value}" if evaluated else "")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)

        payload = load_checkpoint(best, expect_kind="finetune")
        load_model_state(model, payload["model"], str(best))
        report = evaluate_sites(model, cohort, cfg, device, split="test", bad_files=bad_files)
        report.update(selected_epoch=payload["epoch"], val=payload["metrics"]["val"], init=init)
        tracker.log_metrics(f.epochs, report_metrics(report), "test")
        atomic_write_json(output_dir / "test_metrics.json", report)
    return RunResult(output_dir, best, report, watch.seconds)


def evaluate_sites(model: nn.Module, cohort: Cohort, cfg: ExperimentConfig, device: torch.device, split: str,
                   bad_files: BadFiles | None = None) -> dict[str, Any]:
    """Metrics on one split, pooled over all sites and per site (each in :meth:`Metrics.to_json` form)."""
    task, prep = cohort.task, cohort.prep
    bad_files = bad_files or BadFiles(cfg.data.skip_bad_cases, cases=cohort.catalog.cases)
    pooled = evaluate_dataset(model, finetuning_dataset(cohort.cases(split), task, cfg, prep, False), task, cfg, device,
                              bad_files).to_json()
    if len(cohort.sites) == 1:  # one site (a site fine-tuning alone): its metrics are the pooled ones
        return {"split": split, "pooled": pooled, "sites": {cohort.sites[0].name: pooled} if cohort.sites[0].split(split) else {}}
    per_site = {
        site.name: evaluate_dataset(model, finetuning_dataset(site.split(split), task, cfg, prep, False), task, cfg, device,
                                    bad_files).to_json()
        for site in cohort.sites
        if site.split(split)
    }
    return {"split": split, "pooled": pooled, "sites": per_site}


def evaluation_loader(dataset: SeededDataset, task: TaskSpec, cfg: ExperimentConfig, device: torch.device,
                      bad_files: BadFiles | None = None) -> EpochLoader:
    # Whole images for segmentation (sliding window); batch 1 lets images differ in size.
    batch = 1 if task.type == "segmentation" else cfg.finetune.batch_size
    return EpochLoader(dataset, batch, False, cfg.data.num_workers, device, bad_files or BadFiles(cfg.data.skip_bad_cases))


def loader_metrics(model: nn.Module, loader: EpochLoader, task: TaskSpec, cfg: ExperimentConfig,
                   device: torch.device) -> Metrics:
    """Task metrics of ``model`` on the cases of ``loader``, with the run's evaluation settings."""
    return evaluate(model, loader.epoch(cfg.seed), task, device, cfg.model.img_size, cfg.finetune.sw_overlap, cfg.task.hd95)


def evaluate_dataset(model: nn.Module, dataset: SeededDataset, task: TaskSpec, cfg: ExperimentConfig,
                     device: torch.device, bad_files: BadFiles | None = None) -> Metrics:
    return loader_metrics(model, evaluation_loader(dataset, task, cfg, device, bad_files), task, cfg, device)
