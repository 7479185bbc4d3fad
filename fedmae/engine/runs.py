"""Run folders: where a training run writes, and the checks that make resuming safe."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one run per folder is then the user's care
    fcntl = None

import torch
import yaml
from torch import nn

from fedmae import __version__
from fedmae.checkpoint import Kind, load_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.engine.loop import MetricsLog
from fedmae.files import atomic_write_json, atomic_write_text
from fedmae.models.state import load_model_state

log = logging.getLogger(__name__)

# Settings that may change between an interrupted run and its resumption without changing the result.
# (A comparison's arms, seeds and figure decide which runs exist, not what one computes.)
# Settings a resumed run may change: they change where and how often things are written, logged
# or kept in memory, never the weights.
_RESUME_FREE_KEYS = {"output_dir", "device", "data.num_workers", "pretrain.checkpoint_every", "finetune.checkpoint_every",
                     "federated.checkpoint_every", "federated.validate_with_training", "federated.live_sites",
                     "compare.arms", "compare.seeds", "compare.reconstructions", "compare.parallel", "compare.paper",
                     "tracking.backend", "tracking.run_name", "tracking.uri"}


@dataclass
class RunResult:
    output_dir: Path
    checkpoint: Path  # what the next stage should use (last MAE; best fine-tune model)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


MARKER = ".fedmae-run.json"  # claims a folder for one run: which command, which experiment
LOCK = ".fedmae-run.lock"  # held (flock) by the one process writing into the folder; says which


class OutputError(ValueError):
    """An output folder that cannot (or must not) be written; one line naming the folder."""


def check_output_dir(output_dir: Path, command: str, cfg: ExperimentConfig, *, holds_run: bool, resume: bool,
                     force: bool, option: str = "--output") -> None:
    """Refuse, before anything is written, an output folder this run must not write into.

    Accepted: a new or empty folder (whose nearest existing parent is a writable folder), or a
    folder this command claimed for the same experiment, when it holds no checkpoint yet or the
    run resumes. ``force`` (``--force``) also takes a folder that is not a fedmae run, a run of
    another command or experiment, or a run that would otherwise need ``--resume``; the caller
    then clears that run's own outputs (:func:`claim_output_dir`). ``option``: what the user set
    the folder with, for the messages (a deployed ServerApp's is the ``output-dir`` run setting).
    """
    if force and resume:
        raise OutputError("--force starts the run in --output over, --resume continues it; pass one of them")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"{option} {output_dir}: is a file, not a folder; choose a folder")
    _check_writable(output_dir, option)
    if not output_dir.exists() or not any(p.name != LOCK for p in output_dir.iterdir()) or force:
        return
    claimed = read_marker(output_dir)
    if claimed is None:
        entries = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK)
        raise OutputError(
            f"{option} {output_dir}: the folder is not a fedmae run and is not empty ({len(entries)} entries, e.g. "
            f"{', '.join(entries[:3])}); choose a new or empty folder, or pass --force to write into it"
        )
    if claimed.get("command") != command or claimed.get("experiment") != cfg.name:
        raise OutputError(
            f"{option} {output_dir}: the folder holds the {claimed.get('command')} run of experiment "
            f"'{claimed.get('experiment')}', not a {command} run of '{cfg.name}'; choose another folder, or pass "
            "--force to start over in it"
        )
    if holds_run and not resume:
        how = "pass --resume to continue it, --force to start it over" if option == "--output" else "set resume=true to continue it"
        raise OutputError(f"{option} {output_dir}: already holds a {command} run; {how}, or choose another {option}")


def _check_writable(output_dir: Path, option: str) -> None:
    """The folder, or the nearest parent that exists, must be a folder one can create files in."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{option} {output_dir}: {existing} is a file, not a folder; choose another path")
    try:  # os.access says yes to root even where nothing can be created (/proc, read-only mounts)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise OutputError(f"{option} {output_dir}: cannot write in {existing} ({err.strerror}); choose another path") from None


class HeldFolder:
    """A run folder locked for this process until :meth:`release` (or the end of a ``with``)."""

    def __init__(self, handle: IO[str] | None):
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file lets go of the lock
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def hold_output_dir(output_dir: Path, option: str = "--output") -> HeldFolder:
    """Lock the folder for this process: one run writes into a folder at a time.

    A second run on the folder (a resume started while the first still runs, as a ServerApp may
    for a while after its SuperLink died) would interleave checkpoints and records, and the first
    one's exit would mark the second's summary failed. The lock is the kernel's
    (``flock``, also honoured over NFS), so a run that dies, even by SIGKILL, never leaves the folder
    locked. Refused in one line naming the process that holds it.
    """
    if fcntl is None:
        return HeldFolder(None)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
    except OSError as err:
        raise OutputError(f"{option} {output_dir}: cannot write ({err.strerror}); choose another path") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputError(f"{option} {output_dir}: another fedmae run is writing into it ({holder}); wait for it to "
                          "end or stop it, or choose another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
    handle.flush()
    return HeldFolder(handle)


def read_marker(output_dir: Path) -> dict[str, Any] | None:
    try:
        claimed = json.loads((output_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return claimed if isinstance(claimed, dict) else None


def claim_output_dir(output_dir: Path, command: str, cfg: ExperimentConfig, *, force: bool = False,
                     previous_outputs: Sequence[str] = ()) -> None:
    """Claim the folder for this run (after every check passed) and record its resolved config.

    ``force``: a run that starts over clears ``previous_outputs`` (names in the folder: the
    previous run's checkpoints, logs, site state), so nothing of it is resumed or mixed in; it
    says what it replaced and leaves every other file where it is.
    """
    if force and output_dir.is_dir() and any(output_dir.iterdir()):
        cleared = [name for name in previous_outputs if (output_dir / name).exists()]
        for name in cleared:
            target = output_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            for digest in output_dir.glob(f"{name}.sha256"):
                digest.unlink()
        claimed = read_marker(output_dir)
        log.warning("--force: writing the %s run into %s (was: %s); removed the previous run's %s; config.yaml "
                    "replaced", command, output_dir,
                    f"the {claimed.get('command')} run of '{claimed.get('experiment')}'" if claimed else "not a fedmae run",
                    ", ".join(cleared) or "nothing")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        previous = read_marker(output_dir)
        marker = _marker(command, cfg, previous)
        if marker != previous:
            atomic_write_json(output_dir / MARKER, marker)
        atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as err:
        raise OutputError(f"--output {output_dir}: cannot write ({err.strerror}); choose another path") from None


def _marker(command: str, cfg: ExperimentConfig, previous: dict[str, Any] | None) -> dict[str, Any]:
    kept = previous if previous and previous.get("command") == command and previous.get("experiment") == cfg.name else {}
    return {"command": command, "experiment": cfg.name,
            "created": kept.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fedmae": __version__}


def open_run(output_dir: Path, command: str, kind: Kind, cfg: ExperimentConfig, last_checkpoint: Path, *, resume: bool,
             force: bool = False, init: str | None = None, previous_outputs: Sequence[str] = ()) -> dict[str, Any] | None:
    """Check the folder and, when resuming, the checkpoint against this config; only then claim
    the folder. Returns the checkpoint payload to resume from, or None for a fresh start."""
    holds_run = last_checkpoint.exists()
    check_output_dir(output_dir, command, cfg, holds_run=holds_run, resume=resume, force=force)
    payload = None
    if resume and holds_run:
        payload = load_checkpoint(last_checkpoint, expect_kind=kind)
        check_resume_config(payload["config"], cfg, last_checkpoint)
        started_from = payload["extra"].get("init")
        if init is not None and started_from != init:
            raise ValueError(
                f"{last_checkpoint}: cannot resume, the run started from {started_from}, not {init}; "
                "pass the same --encoder or start a new --output"
            )
    claim_output_dir(output_dir, command, cfg, force=force, previous_outputs=previous_outputs)
    return payload


def restore_or_start(
    resumed: dict[str, Any] | None,
    last_checkpoint: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics_log: MetricsLog,
) -> dict[str, Any] | None:
    """Continue from the payload :func:`open_run` returned (weights, optimiser, log), else start
    clean. Returns that payload (its ``epoch`` and ``step`` say where), or None."""
    if resumed is None:
        metrics_log.path.unlink(missing_ok=True)
        return None
    load_model_state(model, resumed["model"], str(last_checkpoint))
    optimizer.load_state_dict(resumed["optimizer"])
    metrics_log.truncate_after(resumed["epoch"])
    log.info("resuming %s from %s after epoch %d", resumed["kind"], last_checkpoint, resumed["epoch"])
    return resumed


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
