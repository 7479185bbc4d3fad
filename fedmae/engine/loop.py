"""The training step loop shared by pre-training and fine-tuning, and its small helpers."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fedmae.engine.device import autocast
from fedmae.engine.optim import lr_at, set_lr


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    """Seed every RNG a training epoch draws from (masking noise, drop path, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Schedule:
    """Per-iteration learning-rate schedule of one training run."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_of_batch: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
    schedule: Schedule,
    step: int,
    device: torch.device,
    clip_grad: float | None,
    desc: str = "train",
) -> tuple[float, int]:
    """One pass over ``batches``; returns (mean loss weighted by batch size, next global step).

    The loss is summed on the device, so a GPU step does not wait for the host: the sum is read
    (and checked to be finite) every ``check_every`` steps and at the end. On the CPU reading it
    costs nothing, so every step is checked and a divergence names its exact step.
    """
    model.train()
    check_every = 1 if device.type == "cpu" else 50
    total = torch.zeros((), dtype=torch.float64, device=device)  # float64: the sum Python floats gave
    count, checked = 0, step
    progress = tqdm(batches, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for batch in progress:
        set_lr(optimizer, schedule(step))
        with autocast(device):
            loss = loss_of_batch(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        size = len(next(iter(batch.values())))
        total += loss.detach().double() * size
        count += size
        step += 1
        if step - checked >= check_every:
            _check_finite(total, desc, checked, step)
            checked = step
            progress.set_postfix(loss=f"{float(total) / count:.4f}")
    _check_finite(total, desc, checked, step)
    return float(total) / max(count, 1), step


def _check_finite(total: torch.Tensor, desc: str, first: int, end: int) -> None:
    """One host sync: the summed loss is finite unless a step from ``first`` to ``end - 1`` diverged."""
    if end > first and not math.isfinite(float(total)):
        where = f"step {first}" if end == first + 1 else f"one of steps {first}..{end - 1}"
        raise NonFiniteLossError(f"{desc}: loss became {float(total)} at {where}; lower the learning rate")


def due(epoch: int, every: int, last: int) -> bool:
    """Whether 1-based ``epoch`` is one of every ``every``-th, or the ``last``."""
    return epoch % every == 0 or epoch == last


class MetricsLog:
    """Append-only JSON-lines log: one record per epoch (or round), flushed as written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, sort_keys=False) + "\n")

    def truncate_after(self, epoch: int) -> None:
        """On resume, drop records of epochs after the checkpoint (they will be redone)."""
        if self.path.exists():
            kept = [line for line in self.read() if line.get("epoch", 0) <= epoch]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

