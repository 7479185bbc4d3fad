"""Where training runs and how fast it may do its arithmetic there.

On CUDA: bf16 autocast (no loss scaling needed), TF32 for the matmuls and convolutions left in
fp32, fused AdamW, pinned batches copied without blocking, and an optional ``torch.compile``. On
the CPU every default stays as it is: fp32, eager, deterministic.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device, refusing CUDA where there is none;
    on CUDA also allows TF32 (see :func:`allow_tf32`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} was asked for but CUDA is not available here; use auto or cpu")
    device = torch.device(name)
    if device.type == "cuda":
        allow_tf32()
    return device


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa, fp32 range): what remains in
    fp32 under bf16 autocast (the loss, norms) needs no more. CUDA-only switches: CPU maths is untouched."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU, where it is exact and deterministic."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on ``device``; from pinned memory (see EpochLoader) the copy does not block."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when ``enabled`` (config ``compile``), else the model itself.

    The compiled module shares the model's parameters; checkpoints keep using the model's own
    state dict, so their keys do not change. Compilation takes tens of seconds per process and
    shape, and on the CPU pays for itself only in long runs (benchmarks/bench_mae_step.py --compile).
    """
    if not enabled:
        return model
    log.info("compiling %s with torch.compile (the first steps take longer)", type(model).__name__)
    return torch.compile(model)
