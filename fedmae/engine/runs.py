"""Run folders: where a training run writes, and the checks that make resuming safe."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from fedmae.checkpoint import Kind, load_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.engine.loop import MetricsLog
from fedmae.models.state import load_model_state

log = logging.getLogger(__name__)

# Settings that may change between an interrupted run and its resumption without changing the result.
# (A comparison's arms, seeds and figure decide which runs exist, not what one computes.)
_RESUME_FREE_KEYS = {"output_dir", "device", "data.num_workers", "pretrain.checkpoint_every", "finetune.checkpoint_every",
                     "compare.arms", "compare.seeds", "compare.reconstructions", "compare.parallel"}


@dataclass
class RunResult:
    output_dir: Path
    checkpoint: Path  # what the next stage should use (last MAE; best fine-tune model)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def prepare_run_dir(output_dir: Path, cfg: ExperimentConfig, last_checkpoint: Path, resume: bool) -> None:
    """Create the folder and record the resolved config; refuse to silently mix two runs."""
    if last_checkpoint.exists() and not resume:
        raise FileExistsError(
            f"{output_dir} already holds a run ({last_checkpoint.name}); pass --resume to continue it "
            "or choose another --output"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def restore_or_start(
    last_checkpoint: Path,
    kind: Kind,
    cfg: ExperimentConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics_log: MetricsLog,
    resume: bool,
    init: str | None = None,
) -> dict[str, Any] | None:
    """Continue from ``last_checkpoint`` when resuming (weights, optimiser, log), else start clean.

    ``init`` (fine-tuning: the encoder checkpoint or "random") must be what the run started from.
    Returns the checkpoint payload it resumed from (its ``epoch`` and ``step`` say where), or None.
    """
    if not (resume and last_checkpoint.exists()):
        metrics_log.path.unlink(missing_ok=True)
        return None
    payload = load_checkpoint(last_checkpoint, expect_kind=kind)
    check_resume_config(payload["config"], cfg, last_checkpoint)
    started_from = payload["extra"].get("init")
    if init is not None and started_from != init:
        raise ValueError(
            f"{last_checkpoint}: cannot resume, the run started from {started_from}, not {init}; "
            "pass the same --encoder or start a new --output"
        )
    load_model_state(model, payload["model"], str(last_checkpoint))
    optimizer.load_state_dict(payload["optimizer"])
    metrics_log.truncate_after(payload["epoch"])
    log.info("resuming %s from %s after epoch %d", kind, last_checkpoint, payload["epoch"])
    return payload


def check_resume_config(stored: dict[str, Any], cfg: ExperimentConfig, checkpoint: Path) -> None:
    """A run may only resume under the config it started with (else the schedule would change)."""
    differing = [k for k in _differences(stored, cfg.to_dict()) if k not in _RESUME_FREE_KEYS]
    if differing:
        raise ValueError(
            f"{checkpoint}: cannot resume, the config differs from the one the run started with at "
            f"{', '.join(differing[:5])}; restore those values or start a new --output"
        )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
