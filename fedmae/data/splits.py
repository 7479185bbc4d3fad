"""Reproducible train / validation / test splits per site.

Validation cases are for model selection and test cases for reporting only; a site's split depends
on the seed and the site's name, not on other sites, so adding a site never reshuffles the others.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


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
