"""Files that fail to load during training although they passed the checks, and bad_cases.csv.

``data.check: quick`` reads headers only, and a file can break after the checks ran (a copy still
in progress, a failing disk). When the loader's deterministic preprocessing (MONAI) fails on a
file, wherever that happens (in the training process or a loader worker, deep in a transform
chain), the failure becomes one :class:`UnloadableFile` that names the file and what failed:
the file is read again with the checks' own readers (:func:`fedmae.data.checks.read_problem`),
whose messages say what is wrong with it. A loader worker never raises it: it hands back the
batch without that sample plus the failure, and the training process decides (:class:`BadFiles`):

- ``data.skip_bad_cases: false``: the run stops with that one line (a :class:`DataError`, so the
  CLI prints it and exits 2); the last checkpoint is untouched and the run resumes from it once
  the file is good again;
- ``true``: the sample is dropped from its batch (a batch left empty is skipped), that loader
  leaves the file out for the rest of the run, one warning is logged and the case is added to
  the run's ``bad_cases.csv`` (same columns as the cases the checks leave out).

Resuming: which samples a batch holds depends only on the epoch's seed and on which files fail
to load, not on when a failure was first seen (a dropped sample leaves the order and the other
samples' augmentations as they were). So a run resumed while the file is still bad drops the same
samples from the same batches as the uninterrupted run, and ends with the same weights.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.transforms import Transform

from fedmae.data.catalog import Case, DataError, Problem
from fedmae.data.checks import read_problem
from fedmae.files import atomic_write_text

log = logging.getLogger(__name__)

BAD_CASES = "bad_cases.csv"
DURING_TRAINING = " (while loading it for training)"  # ends the problems found during training
CSV_HEADER = ["case_id", "file", "problem"]


class UnloadableFile(DataError):
    """A file whose preprocessing failed during training: the file and what failed, one line."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"{path}: {reason}{DURING_TRAINING[:-1]}; replace the file and rerun with --resume, "
            "or start a new run with data.skip_bad_cases: true to leave such files out)"
        )

    def __reduce__(self):  # picklable from loader workers and across MONAI's caches
        return type(self), (self.path, self.reason)


class GuardedLoad(Transform):
    """The deterministic stage of a file-backed dataset; a failure becomes :class:`UnloadableFile`.

    ``mark``: hand the error back as the item (kept in an in-memory cache, raised when the item
    is fetched) instead of raising it; a disk cache must raise, or it would keep the failure.
    A MONAI Transform that draws nothing, so MONAI's caches store its result.
    """

    def __init__(self, stage: Any, spatial_dims: int, mark: bool):
        self.stage, self.spatial_dims, self.mark = stage, spatial_dims, mark

    def __call__(self, item: dict[str, Any]) -> Any:
        try:
            return self.stage(item)
        except Exception as err:  # noqa: BLE001 - any failure on a file is that file's
            error = diagnose(item, err, self.spatial_dims)
            if self.mark:
                return error
            raise error from None


def diagnose(item: Mapping[str, Any], err: BaseException, spatial_dims: int) -> UnloadableFile:
    """Which of the item's files failed, and why: the checks' full read of each file says, else
    the innermost exception (named after the file it mentions, else the image)."""
    files = [path for key in ("image", "label") for path in _paths(item.get(key))]
    for path in files:
        reason = read_problem(path, spatial_dims)
        if reason is not None:
            return UnloadableFile(path, reason)
    chain = _chain(err)
    # The files read fine on their own: the failure is in the preprocessing of this item (or a bug).
    log.debug("preprocessing of %s failed", files, exc_info=err)
    text = " ".join(str(e) for e in chain)
    named = next((path for path in files if path in text), None) or next(
        (path for path in files if os.path.basename(path) in text), files[0] if files else "<item>")
    root = chain[-1]
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    first = first if len(first) <= 120 else first[:117] + "..."
    return UnloadableFile(named, f"failed to load ({type(root).__name__}{': ' + first if first else ''})")


def find_unloadable(err: BaseException) -> UnloadableFile | None:
    """The :class:`UnloadableFile` behind ``err`` (MONAI wraps errors in RuntimeErrors), if any."""
    return next((e for e in _chain(err) if isinstance(e, UnloadableFile)), None)


def _chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _paths(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return list(value)
    return []


class BadFiles:
    """A run's policy for files that fail to load during training, and its record of them.

    ``skip`` (``data.skip_bad_cases``): leave such files out instead of stopping. ``csv``: the
    run's bad_cases.csv, appended to (None: log only). ``cases``: the run's cases, to name a bad
    file's case. ``fresh``: a run that starts over forgets the failures a previous attempt in its
    folder recorded (the checks' rows are rewritten by :func:`fedmae.data.report.write_reports`).
    """

    def __init__(self, skip: bool, csv: str | Path | None = None, cases: Iterable[Case] = (), fresh: bool = False):
        self.skip = skip
        self.csv = None if csv is None else Path(csv)
        self.case_of = {path: case.case_id for case in cases for path in case.files}
        self.seen: set[str] = set()
        if fresh and self.csv is not None and self.csv.is_file():
            kept = [p for p in read_problems(self.csv) if not p.message.endswith(DURING_TRAINING)]
            write_problems(self.csv, kept) if kept else self.csv.unlink()

    def found(self, path: str, reason: str) -> None:
        """A file failed to load: raise :class:`UnloadableFile`, or (skipping) record it once."""
        if not self.skip:
            raise UnloadableFile(path, reason)
        if path in self.seen:
            return
        self.seen.add(path)
        case_id = self.case_of.get(path, "")
        if self.csv is not None:
            append_problems(self.csv, [Problem(path, reason + DURING_TRAINING, case_id)])
        log.warning("data.skip_bad_cases: leaving out %s%s for the rest of the run: %s%s%s", path,
                    f" (case {case_id})" if case_id else "", reason, DURING_TRAINING,
                    f"; listed in {self.csv}" if self.csv is not None else "")


# ---------------------------------------------------------------------------------------------
# bad_cases.csv


def read_problems(path: str | Path) -> list[Problem]:
    """The rows of a problems CSV (as :func:`write_problems` writes it); none when it is absent."""
    try:
        with Path(path).open(newline="") as f:
            return [Problem(row.get("file") or "", row.get("problem") or "", row.get("case_id") or "")
                    for row in csv.DictReader(f)]
    except FileNotFoundError:
        return []


def write_problems(path: str | Path, problems: Sequence[Problem]) -> None:
    """case_id, file, problem per row; atomically (temp file + rename), so a reader never sees half."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    writer.writerows([p.case_id, p.path, p.message] for p in problems)
    atomic_write_text(path, out.getvalue())


def append_problems(path: str | Path, problems: Sequence[Problem]) -> None:
    """Add the problems not yet listed (rewritten atomically, like :func:`write_problems`)."""
    existing = read_problems(path)
    new = [p for p in dict.fromkeys(problems) if p not in existing]
    if new:
        write_problems(path, [*existing, *new])
