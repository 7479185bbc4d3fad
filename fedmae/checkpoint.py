"""Self-describing checkpoints, written atomically and read without unpickling objects.

A checkpoint is a dict of tensors and plain values: the weights, the resolved experiment config,
the package versions that wrote it, and where training stood (epoch, step, optimiser state). It is
written to a temporary file in the same folder and renamed over the target, so a crash never leaves
a half-written checkpoint under the real name. Next to it, ``<name>.sha256`` records the file's
SHA-256 in ``sha256sum`` format (``sha256sum -c`` checks it by hand); loading verifies it, so a
corrupted or altered checkpoint is refused instead of trained on. Loading uses
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

FORMAT = "fedmae-checkpoint"
FORMAT_VERSION = 1
Kind = Literal["mae", "finetune", "global", "site"]  # global: a federated round's model; site: a site's local state


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("fedmae", "torch", "timm", "monai", "numpy", "flwr"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def save_checkpoint(
    path: str | Path,
    *,
    kind: Kind,
    model_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    epoch: int,
    step: int,
    optimizer_state: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + fsync + rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": {k: v.detach().cpu() for k, v in model_state.items()},
        "config": dict(config),
        "epoch": int(epoch),
        "step": int(step),
        "optimizer": optimizer_state,
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
        "versions": package_versions(),
    }
    return _atomic_write(path, lambda handle: torch.save(payload, handle), with_digest=True)


def digest_path(path: str | Path) -> Path:
    """Where the SHA-256 manifest of a checkpoint lives."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_checkpoint(path: str | Path) -> None:
    """Delete a checkpoint and its manifest."""
    Path(path).unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


def verify_digest(path: str | Path) -> bool:
    """Compare the file with its recorded SHA-256; raise CheckpointError when they differ.
    Returns False when there is no manifest to compare with."""
    path, manifest = Path(path), digest_path(path)
    if not manifest.is_file():
        return False
    recorded = manifest.read_text().split()
    if not recorded or recorded[0] != sha256_of(path):
        raise CheckpointError(f"{path}: SHA-256 differs from {manifest.name}: the file changed after it was written "
                              "(corrupted, altered, or replaced without its manifest); do not use it")
    return True


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (a result, a report) so that readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _atomic_write(path, lambda handle: handle.write(text.encode()))


def _atomic_write(path: Path, write, with_digest: bool = False) -> Path:
    """Temp file in the same folder + fsync + rename: a crash leaves the old file or the new one.
    ``with_digest``: also record the new file's SHA-256 next to it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        line = f"{sha256_of(tmp)}  {path.name}\n" if with_digest else None
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if line is not None:
        _atomic_write(digest_path(path), lambda handle: handle.write(line.encode()))
    return path


def load_checkpoint(path: str | Path, expect_kind: Kind | None = None) -> dict[str, Any]:
    """Read a fedmae checkpoint onto the CPU; raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    verified = verify_digest(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle with objects, not a torch file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable fedmae checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedmae checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('format_version')} is not supported")
    if expect_kind is not None and payload["kind"] != expect_kind:
        raise CheckpointError(f"{path}: expected a {expect_kind} checkpoint, this one is {payload['kind']}")
    if not verified:  # e.g. copied without its manifest; said only for a file that is otherwise usable
        log.warning("%s has no SHA-256 manifest (%s); its integrity could not be checked", path, digest_path(path).name)
    return payload
