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

    Validation and test get at least one case each, and training keeps at least one.
    """
    if num_cases < 3:
        raise ValueError(f"site {site!r} has {num_cases} cases; train, validation and test need at least 3")
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    order = rng.permutation(num_cases).tolist()
    n_val = max(1, round(num_cases * val_fraction))
    n_test = max(1, round(num_cases * test_fraction))
    if n_val + n_test >= num_cases:
        n_val, n_test = 1, 1
    test = order[:n_test]
    val = order[n_test : n_test + n_val]
    train = order[n_test + n_val :]
    return Split(tuple(sorted(train)), tuple(sorted(val)), tuple(sorted(test)))
