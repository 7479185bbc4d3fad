"""Partitioners: disjoint, complete, reproducible, and skewed as their β says."""

from __future__ import annotations

import numpy as np
import pytest

from fedmae.data.partition import (
    label_histogram,
    partition_iid,
    partition_label_skew,
    partition_natural,
    partition_quantity_skew,
)

LABELS = [i % 5 for i in range(300)]  # five balanced classes


def assert_partition(parts, num_items, min_per_site=1):
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(num_items))  # disjoint and complete
    assert min(len(p) for p in parts) >= min_per_site


def split_with(scheme, seed, beta=0.5, sites=4):
    if scheme == "iid":
        return partition_iid(len(LABELS), sites, seed)
    if scheme == "quantity":
        return partition_quantity_skew(len(LABELS), sites, beta, seed)
    return partition_label_skew(LABELS, sites, beta, seed)


@pytest.mark.parametrize("scheme", ["iid", "quantity", "label"])
def test_partitions_are_complete_and_reproducible(scheme):
    parts = split_with(scheme, seed=3)
    assert_partition(parts, len(LABELS))
    assert parts == split_with(scheme, seed=3)
    assert parts != split_with(scheme, seed=4)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition_iid(103, 4, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def mean_class_entropy(parts):
    entropies = []
    for counts in label_histogram(parts, LABELS):
        p = np.array(list(counts.values()), dtype=float)
        p = p[p > 0] / p.sum()
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


def test_label_skew_follows_beta():
    even = mean_class_entropy(partition_label_skew(LABELS, 4, beta=100.0, seed=0))
    skewed = mean_class_entropy(partition_label_skew(LABELS, 4, beta=0.1, seed=0))
    assert even > 0.95 * np.log(5)  # β = 100: every site sees all classes about equally
    assert skewed < 0.7 * even  # β = 0.1: sites are dominated by a few classes


def test_quantity_skew_follows_beta():
    def spread(beta):
        sizes = [len(p) for p in partition_quantity_skew(300, 5, beta, seed=1)]
        return max(sizes) / min(sizes)

    assert spread(1000.0) < 1.3 and spread(0.2) > 3


@pytest.mark.parametrize("minimum", [1, 10])
def test_minimum_per_site_is_respected(minimum):
    assert_partition(partition_quantity_skew(60, 5, 0.05, seed=2, min_per_site=minimum), 60, minimum)
    assert_partition(partition_label_skew(LABELS, 5, 0.1, seed=2, min_per_site=minimum), 300, minimum)


def test_natural_keeps_the_source_sites_in_order():
    parts = partition_natural(["b", "a", "b", "c", "a"])
    assert list(parts) == ["b", "a", "c"] and parts == {"b": [0, 2], "a": [1, 4], "c": [3]}


@pytest.mark.parametrize("call,words", [
    (lambda: partition_iid(3, 4, 0), "3 items cannot give 4 sites"),
    (lambda: partition_quantity_skew(10, 2, 0.0, 0), "beta"),
    (lambda: partition_label_skew(LABELS, 0, 1.0, 0), "num_sites must be at least 1"),
    (lambda: partition_label_skew([0] * 10 + [1], 10, 0.01, 0, min_per_site=1), "raise beta or use fewer sites"),
    (lambda: partition_natural([]), "no items"),
])
def test_impossible_requests_say_what_to_change(call, words):
    with pytest.raises(ValueError, match=words):
        call()
