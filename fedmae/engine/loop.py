"""The training step loop shared by pre-training and fine-tuning, and its small helpers."""

from __future__ import annotations

import contextlib
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

from fedmae.engine.optim import lr_at, set_lr


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was asked for but CUDA is not available here; use auto or cpu")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed); plain fp32 on CPU, where it is exact and
    deterministic."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
    loader: Iterable[Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_of_batch: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
    schedule: Schedule,
    step: int,
    device: torch.device,
    clip_grad: float | None,
    desc: str = "train",
) -> tuple[float, int]:
    """One pass over ``loader``; returns (mean loss weighted by batch size, next global step)."""
    model.train()
    total, count = 0.0, 0
    progress = tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for batch in progress:
        set_lr(optimizer, schedule(step))
        with autocast(device):
            loss = loss_of_batch(model, batch)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        size = len(next(iter(batch.values())))
        total += loss.item() * size
        count += size
        step += 1
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(count, 1), step


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

