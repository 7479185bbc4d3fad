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

import functools
import hashlib
import logging
import os
import pickle
import platform
import re
import shutil
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

from fedmae.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "fedmae-checkpoint"
FORMAT_VERSION = 1
Kind = Literal["mae", "finetune", "global", "site"]  # global: a federated round's model; site: a site's local state


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


@functools.cache  # read from the installed packages' metadata files: once per process, not per checkpoint
def _installed_versions() -> tuple[tuple[str, str], ...]:
    versions = {"python": platform.python_version()}
    for package in ("fedmae", "torch", "timm", "monai", "numpy", "flwr"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return tuple(versions.items())


def package_versions() -> dict[str, str]:
    return dict(_installed_versions())


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
    return _write_with_digest(path, lambda handle: torch.save(payload, handle))


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


class _HashingWriter:
    """A binary file that hashes what goes through it: the digest of a checkpoint comes with
    writing it, instead of reading the file back (torch.save writes its archive front to back)."""

    def __init__(self, handle):
        self.handle, self.digest, self.written = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.written += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def tell(self) -> int:
        return self.written


def _write_with_digest(path: Path, write) -> Path:
    """Write ``path`` atomically, then record its SHA-256 next to it (also atomically)."""
    hashed: list[_HashingWriter] = []

    def write_hashed(handle) -> None:
        hashed.append(_HashingWriter(handle))
        write(hashed[-1])

    atomic_write(path, write_hashed)
    atomic_write_text(digest_path(path), f"{hashed[-1].digest.hexdigest()}  {path.name}\n")
    return path


def link_checkpoint(source: str | Path, target: str | Path) -> Path:
    """``target`` becomes the same checkpoint as ``source`` (with its manifest), atomically, without
    writing the weights again: a hard link where the file system has them, else a copy."""
    source, target = Path(source), Path(target)
    recorded = digest_path(source).read_text().split()[0]
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network or FAT file systems): copy
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    atomic_write_text(digest_path(target), f"{recorded}  {target.name}\n")
    return target


def load_checkpoint(path: str | Path, expect_kind: Kind | None = None) -> dict[str, Any]:
    """Read a fedmae checkpoint onto the CPU; raises CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    verified = verify_digest(path)
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4 ... please file an issue": ours says what is wrong
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle with objects, not a torch file
        raise CheckpointError(f"{path}: not a readable fedmae checkpoint ({_unreadable_reason(path, err)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fedmae checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('format_version')} is not supported")
    if expect_kind is not None and payload["kind"] != expect_kind:
        raise CheckpointError(f"{path}: expected a {expect_kind} checkpoint, this one is {payload['kind']}")
    if not verified:  # e.g. copied without its manifest; said only for a file that is otherwise usable
        log.warning("%s has no SHA-256 manifest (%s); its integrity could not be checked", path, digest_path(path).name)
    return payload


def _unreadable_reason(path: Path, err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in our words. PyTorch's own message advises
    loading with ``weights_only=False`` (or allow-listing the classes), which would run code from
    the file; fedmae never does that, so the advice is not repeated."""
    text = str(err)
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(err, EOFError):
        return "the file ends early: truncated or not a PyTorch file"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "a truncated or damaged PyTorch archive"
    if "inline_container" in text:  # a zip that torch did not write (e.g. a NumPy .npz)
        return "a zip archive that is not a PyTorch checkpoint (a NumPy .npz?)"
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"it holds a pickled Python object ({found.group(1)}); fedmae checkpoints hold only tensors and "
                "plain values, and other objects are never unpickled, since that can run code from the file")
    if "Weights only load failed" in text or isinstance(err, pickle.UnpicklingError):
        return "not a PyTorch file, or one holding something other than tensors and plain values"
    first = text.strip().splitlines()[0] if text.strip() else ""
    if not first or "weights_only" in first or "pickle" in first.lower():
        return type(err).__name__
    return first[:200]


ENCODER_KINDS = ("mae", "global", "finetune")  # checkpoints whose encoder a fine-tuning run may start from


def load_encoder_checkpoint(path: str | Path, announce: bool = True) -> dict[str, Any]:
    """Read a checkpoint to start fine-tuning from (``fedmae finetune --encoder``); only its encoder
    is taken (keys ``encoder.*`` of ``payload["model"]``).

    Accepted: a pre-training checkpoint (``mae``: ``fedmae pretrain``'s; ``global``: a federated
    run's), or a fine-tuned model (``finetune``, or ``global`` of a fine-tuning phase), whose
    encoder can carry on to another task. ``announce``: log one line saying which kind it is and
    that only the encoder is used. Refused in one line: a site's local state and any other kind.
    """
    from fedmae.models.state import encoder_state

    path = Path(path)
    payload = load_checkpoint(path)
    kind, extra = payload.get("kind"), payload.get("extra") or {}
    wanted = "pass a pre-training checkpoint (fedmae pretrain's checkpoint_last.pt, or global/pretrain_last.pt of a " \
             "federated run) or a fine-tuned one"
    if kind == "site":
        raise CheckpointError(f"{path}: a site's own state between rounds (site {extra.get('site', '?')}, "
                              f"{extra.get('phase', '?')}), not an encoder to start from; {wanted}")
    if kind not in ENCODER_KINDS:
        raise CheckpointError(f"{path}: a {kind!r} checkpoint, not one with an encoder to start from; {wanted}")
    if not encoder_state(payload["model"]):
        raise CheckpointError(f"{path}: holds no encoder weights")
    if announce:
        log.info("using only the encoder of %s: %s", path, _describe_checkpoint(payload))
    return payload


def _describe_checkpoint(payload: Mapping[str, Any]) -> str:
    kind, extra = payload["kind"], payload.get("extra") or {}
    if kind == "mae":
        return f"an MAE pre-training checkpoint (epoch {payload.get('epoch')}); its decoder is not used"
    if kind == "global":
        phase = extra.get("phase", "pretrain")
        what = "pre-trained" if phase == "pretrain" else "fine-tuned"
        rest = "decoder" if phase == "pretrain" else "task head"
        return f"a federated {what} global model (round {extra.get('round', '?')}); its {rest} is not used"
    task = extra.get("task") or {}
    classes = ", ".join(map(str, task.get("class_names") or []))
    about = f"task {task.get('type', '?')}" + (f": {classes}" if classes else "")
    return f"a fine-tuned model ({about}, epoch {payload.get('epoch')}); its task head is not used"
