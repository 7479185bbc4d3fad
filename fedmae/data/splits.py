"""Reproducible train / validation / test splits per site, and the split file that saves them.

Validation cases are for model selection and test cases for reporting only; a site's split depends
on the seed and the site's name, not on other sites, so adding a site never reshuffles the others.
A split file (``data.split_file``, and each run's ``splits.json``) records which site and split
every case went to, so that later runs use the same ones.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmae.data.catalog import SPLITS, UNLABELLED, Case, Catalog, DataError
from fedmae.files import atomic_write_json

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig

log = logging.getLogger(__name__)

SPLIT_FILE_FORMAT = 1


@dataclass(frozen=True)
class Split:
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


@dataclass
class SiteData:
    """One site's cases, per split."""

    name: str
    train: list[Case]
    val: list[Case]
    test: list[Case]
    unlabelled: list[Case] = field(default_factory=list)  # pre-training only

    def split(self, name: str) -> list[Case]:
        return getattr(self, name)


def split_indices(num_cases: int, val_fraction: float, test_fraction: float, seed: int, site: str) -> Split:
    """Shuffle ``range(num_cases)`` with (seed, site) and cut it into train / val / test.

    A split with a positive fraction gets at least one case, and training keeps at least one. A
    fraction of 0 draws nothing (the data set has an official split of that kind).
    """
    wanted = 1 + (val_fraction > 0) + (test_fraction > 0)
    if num_cases < wanted:
        raise ValueError(f"site {site!r} has {num_cases} case(s); train, validation and test need at least {wanted}")
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    order = rng.permutation(num_cases).tolist()
    n_val = max(1, round(num_cases * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(num_cases * test_fraction)) if test_fraction > 0 else 0
    if n_val + n_test >= num_cases:
        n_val, n_test = int(val_fraction > 0), int(test_fraction > 0)
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val :]
    return Split(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)))


# ---------------------------------------------------------------------------------------------
# split files


def split_file_content(assignment: dict[str, tuple[str, str]], catalog: Catalog, cfg: ExperimentConfig) -> dict[str, Any]:
    """A split file's content: case ids per site and split (``assignment``: case id -> (site, split))."""
    sites: dict[str, dict[str, list[str]]] = {}
    for case_id, (site, split) in assignment.items():
        sites.setdefault(site, {s: [] for s in (*SPLITS, UNLABELLED)})[split].append(case_id)
    return {
        "format": SPLIT_FILE_FORMAT,
        "source": catalog.source,
        "root": catalog.root,
        "seed": cfg.seed,
        "partition": cfg.data.partition,
        "sites": sites,
    }


def write_split_file(path: Path, content: Mapping[str, Any]) -> None:
    """Atomically: a crash never leaves half a split file that a later run would trust."""
    atomic_write_json(path, content, indent=1)


def read_split_file(path: Path, cases: list[Case], skipped_ids: set[str]) -> dict[str, tuple[str, str]]:
    """case id -> (site, split) for ``cases``, from a split file that must place every one of them
    (``skipped_ids``: cases left out with problems, which the file may still list)."""
    try:
        content = json.loads(path.read_text())
        sites = content["sites"]
        assignment = {
            case_id: (site, split)
            for site, splits in sites.items()
            for split, ids in splits.items()
            for case_id in ids
        }
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a fedmae split file ({type(err).__name__}: {err}); delete it to draw new splits") from None
    bad_split = next((s for splits in sites.values() for s in splits if s not in (*SPLITS, UNLABELLED)), None)
    if bad_split is not None:
        raise DataError(f"{path}: unknown split {bad_split!r}; use {', '.join((*SPLITS, UNLABELLED))}")
    known = {c.case_id for c in cases}
    missing = [c.case_id for c in cases if c.case_id not in assignment]
    if missing:
        raise DataError(f"{path}: does not place case {missing[0]} ({len(missing)} in all); delete it to draw new splits")
    unknown = [i for i in assignment if i not in known and i not in skipped_ids]
    if unknown:
        raise DataError(f"{path}: lists case {unknown[0]} which the data set does not have ({len(unknown)} in all)")
    log.info("using the splits in %s", path)
    return {i: a for i, a in assignment.items() if i in known}
