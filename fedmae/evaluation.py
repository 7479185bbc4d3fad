"""Task metrics: ROC-AUC / accuracy for classification, Dice (and HD95) for segmentation.

Segmentation is evaluated on whole images with MONAI's sliding-window inference at the model's
input size, so images larger than the training crop are scored in full.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_roc_auc
from monai.networks.utils import one_hot
from torch import nn

from fedmae.data.datasets import TaskSpec
from fedmae.engine.device import autocast, to_device
from fedmae.metrics import Metrics, main_metric


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    task: TaskSpec,
    device: torch.device,
    roi_size: tuple[int, ...],
    overlap: float = 0.5,
    hd95: bool = False,
) -> Metrics:
    """Task metrics of ``model`` over ``loader``."""
    model.eval()
    if task.type == "classification":
        return _classification(model, loader, task, device)
    return _segmentation(model, loader, task, device, roi_size, overlap, hd95)


def _classification(model, loader, task: TaskSpec, device) -> Metrics:
    logits, targets = [], []
    for batch in loader:
        with autocast(device):
            logits.append(model(batch["image"].to(device, non_blocking=True)).float().cpu())
        targets.append(batch["label"])
    y_logit, y = torch.cat(logits), torch.cat(targets)
    main = main_metric(task)
    if task.multi_label:
        with warnings.catch_warnings():  # a class with one label value in a small split has no AUC
            warnings.simplefilter("ignore")
            aucs = np.atleast_1d(compute_roc_auc(torch.sigmoid(y_logit), y, average="none"))
        auc = {name: _number(a) for name, a in zip(task.class_names, aucs)}
        return Metrics(main, {"mean_auc": _nanmean(auc.values())}, {"auc": auc}, len(y))
    predicted = y_logit.argmax(dim=1)
    recall = {
        name: _number(float((predicted[y == c] == c).float().mean()) if (y == c).any() else math.nan)
        for c, name in enumerate(task.class_names)
    }
    return Metrics(main, {"accuracy": float((predicted == y).float().mean())}, {"recall": recall}, len(y))


def _segmentation(model, loader, task: TaskSpec, device, roi_size, overlap, hd95) -> Metrics:
    # Softmax models include background in their outputs; it is left out of the scores.
    include_background = task.multi_label
    dice = DiceMetric(include_background=include_background, reduction="mean_batch", ignore_empty=True)
    distances: list[torch.Tensor] = []
    cases = 0
    for batch in loader:
        batch = to_device(batch, device)
        image, label = batch["image"], batch["label"]
        with autocast(device):
            logits = sliding_window_inference(image, roi_size, 4, model, overlap=overlap, mode="gaussian")
        logits = logits.float()
        if task.multi_label:
            pred, truth = (torch.sigmoid(logits) > 0.5).float(), label.float()
        else:
            pred = one_hot(logits.argmax(dim=1, keepdim=True), task.num_outputs)
            truth = one_hot(label, task.num_outputs)
        dice(pred, truth)
        if hd95:
            with warnings.catch_warnings():  # empty prediction or truth gives inf/nan, reported as such
                warnings.simplefilter("ignore")
                distances.append(
                    compute_hausdorff_distance(pred, truth, include_background=include_background, percentile=95).cpu()
                )
        cases += image.shape[0]
    scored = task.class_names if include_background else task.class_names[1:]
    per_class = {"dice": {name: _number(v) for name, v in zip(scored, dice.aggregate().cpu().tolist())}}
    values = {"mean_dice": _nanmean(per_class["dice"].values())}
    if hd95:
        table = torch.cat(distances)  # (cases, classes)
        finite = torch.where(torch.isfinite(table), table, torch.nan)
        per_class["hd95"] = {name: _number(float(torch.nanmean(finite[:, i]))) for i, name in enumerate(scored)}
        values["mean_hd95"] = _nanmean(per_class["hd95"].values())
    return Metrics(main_metric(task), values, per_class, cases)


def _number(value: float) -> float | None:
    """JSON-safe float: NaN (undefined metric) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def _nanmean(values: Iterable[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None

