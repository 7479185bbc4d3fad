"""A federated run's folder and its own record of how the run went.

``flwr run`` exits 0 even when the ServerApp raised (Flower 1.42), so fedmae keeps its own record:
``summary.json`` says ``"status": "running"`` from the start, ``"failed"`` (with the error) when
the ServerApp stopped on an error, ``"done"`` when every phase finished. ``fedmae simulate`` and
``fedmae compare`` read that status, never the mere presence of the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmae.checkpoint import load_checkpoint
from fedmae.config import ExperimentConfig
from fedmae.engine.runs import HeldFolder, check_output_dir, check_resume_config, claim_output_dir, hold_output_dir
from fedmae.files import atomic_write_json
from fedmae.metrics import finite_or_null

SUMMARY = "summary.json"
# What a federated run writes into its folder (simulated sites keep their state in sites/);
# --force clears it before starting over.
RUN_OUTPUTS = ("global", "sites", "rounds.jsonl", SUMMARY)
PHASES = ("pretrain", "finetune")


def open_federated_run(out: Path, cfg: ExperimentConfig, *, resume: bool, force: bool = False,
                       option: str = "--output") -> HeldFolder:
    """Check the folder (:func:`check_federated_run`), lock it for this process, then claim it.
    The run writes into it until it releases the returned lock."""
    check_federated_run(out, cfg, resume=resume, force=force, option=option)
    held = hold_output_dir(out, option)
    try:
        claim_output_dir(out, "federated", cfg, force=force, previous_outputs=RUN_OUTPUTS)
    except BaseException:
        held.release()
        raise
    return held


def check_federated_run(out: Path, cfg: ExperimentConfig, *, resume: bool, force: bool = False,
                        option: str = "--output") -> None:
    """The folder may take this run (see :func:`fedmae.engine.runs.check_output_dir`) and, when
    resuming, its global checkpoints were written under this config. Writes nothing."""
    last = [path for phase in PHASES if (path := out / "global" / f"{phase}_last.pt").is_file()]
    check_output_dir(out, "federated", cfg, holds_run=bool(last), resume=resume, force=force, option=option)
    if resume:
        for path in last:
            check_resume_config(load_checkpoint(path, expect_kind="global")["config"], cfg, path)


def write_summary(out: Path, summary: dict[str, Any], status: str, error: str | None = None) -> Path:
    record = {"status": status, **({"error": error} if error else {}), **summary}
    return atomic_write_json(out / SUMMARY, finite_or_null(record))


def _recorded(out: Path) -> dict[str, Any] | None:
    """The run's summary as last written, or None (not written yet, or unreadable)."""
    try:
        return json.loads((Path(out) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def recorded_status(out: Path) -> str | None:
    """running, done or failed; None without a summary. A summary without a status was written by
    an earlier fedmae only when the run finished."""
    summary = _recorded(out)
    return None if summary is None else summary.get("status", "done")


def finished_summary(out: Path) -> dict[str, Any] | None:
    """The summary of a run that finished, else None (still running, failed, or never started)."""
    return _recorded(out) if recorded_status(out) == "done" else None


def failure(out: Path) -> str | None:
    """The error a failed run recorded, if it recorded one."""
    summary = _recorded(out)
    return summary.get("error") if summary is not None and recorded_status(out) == "failed" else None
