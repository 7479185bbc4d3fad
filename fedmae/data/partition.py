"""Partitioners: split one data set into N simulated sites.

Each returns one list of item indices per site: disjoint, covering every item, reproducible from
the seed, and with at least ``min_per_site`` items per site (a site with nothing to train on is
not a site). The label-skew and quantity-skew schemes follow the federated-learning literature
(Hsu et al. 2019; SSL-FL uses β = 100, 1, 0.5): small β concentrates each class (or the data) on
few sites, large β approaches an even split.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

MAX_DRAWS = 1000  # redraws before giving up on meeting min_per_site


def _check(num_items: int, num_sites: int, min_per_site: int) -> None:
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    if min_per_site < 0:
        raise ValueError(f"min_per_site must be non-negative, got {min_per_site}")
    if num_items < num_sites * min_per_site:
        raise ValueError(
            f"{num_items} items cannot give {num_sites} sites at least {min_per_site} each; use fewer sites"
        )


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta (Dirichlet concentration) must be positive, got {beta}")


def partition_iid(num_items: int, num_sites: int, seed: int, min_per_site: int = 1) -> list[list[int]]:
    """A uniformly random split into near-equal sites (sizes differ by at most one)."""
    _check(num_items, num_sites, min_per_site)
    order = np.random.default_rng(seed).permutation(num_items)
    return [sorted(part.tolist()) for part in np.array_split(order, num_sites)]


def partition_quantity_skew(
    num_items: int, num_sites: int, beta: float, seed: int, min_per_site: int = 1
) -> list[list[int]]:
    """Random items, site sizes drawn from Dirichlet(β): small β gives a few large sites."""
    _check(num_items, num_sites, min_per_site)
    _check_beta(beta)
    rng = np.random.default_rng(seed)
    spare = num_items - num_sites * min_per_site
    shares = rng.dirichlet(np.full(num_sites, beta))
    extra = np.floor(shares * spare).astype(int)
    # Hand out the rounding remainder to the sites with the largest fractional parts.
    remainder = spare - extra.sum()
    extra[np.argsort(-(shares * spare - extra))[:remainder]] += 1
    sizes = extra + min_per_site
    order = rng.permutation(num_items)
    bounds = np.cumsum(sizes)[:-1]
    return [sorted(part.tolist()) for part in np.split(order, bounds)]


def partition_label_skew(
    labels: Sequence[Hashable], num_sites: int, beta: float, seed: int, min_per_site: int = 1
) -> list[list[int]]:
    """Dirichlet label skew: each class's items are spread over the sites by Dirichlet(β) shares.

    ``labels`` holds one class per item (for multi-label data, pass a primary label such as the
    first finding or "none"). Redraws until every site has ``min_per_site`` items.
    """
    _check(len(labels), num_sites, min_per_site)
    _check_beta(beta)
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels), key=str)
    members = {c: np.array([i for i, label in enumerate(labels) if label == c]) for c in classes}
    for _ in range(MAX_DRAWS):
        sites: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            items = rng.permutation(members[c])
            shares = rng.dirichlet(np.full(num_sites, beta))
            bounds = (np.cumsum(shares)[:-1] * len(items)).round().astype(int)
            for site, part in zip(sites, np.split(items, bounds)):
                site.extend(part.tolist())
        if min(len(s) for s in sites) >= min_per_site:
            return [sorted(s) for s in sites]
    raise ValueError(
        f"label skew with beta={beta} left a site with under {min_per_site} items after {MAX_DRAWS} draws; "
        "raise beta or use fewer sites"
    )


def partition_natural(site_of: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """The sites the data came from (a site column, or one folder per site), in first-seen order."""
    if not site_of:
        raise ValueError("no items to partition")
    sites: dict[Hashable, list[int]] = {}
    for index, site in enumerate(site_of):
        sites.setdefault(site, []).append(index)
    return sites


def label_histogram(parts: Sequence[Sequence[int]], labels: Sequence[Hashable]) -> list[dict[Hashable, int]]:
    """Per site, how many items of each class: the table a partition summary prints."""
    classes = sorted(set(labels), key=str)
    return [{c: sum(1 for i in part if labels[i] == c) for c in classes} for part in parts]
