"""Sites, splits, targets and loaders; pre-training never reads labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedmae.data.cohort import load_cohort
from fedmae.data.datasets import finetuning_dataset, label_subset
from fedmae.data.loader import EpochLoader, epoch_seed
from fedmae.data.tasks import label_to_channels, target_of
from fedmae.data.splits import split_indices
from fedmae.data.synthetic import FINDINGS, ORGANS
from fedmae.engine.pretrain import pretrain
from tests.tiny import tiny_config


@pytest.mark.parametrize("n,val,test", [(10, 0.2, 0.2), (40, 0.15, 0.25), (3, 0.1, 0.1), (7, 0.45, 0.45)])
def test_splits_are_disjoint_complete_and_reproducible(n, val, test):
    split = split_indices(n, val, test, seed=1, site="a")
    parts = [set(split.train), set(split.val), set(split.test)]
    assert set().union(*parts) == set(range(n)) and sum(map(len, parts)) == n
    assert all(parts)
    assert split == split_indices(n, val, test, seed=1, site="a")
    if n >= 10:
        assert split != split_indices(n, val, test, seed=2, site="a")
        assert split != split_indices(n, val, test, seed=1, site="b")


def test_sites_have_their_own_scanners_and_splits():
    cfg = tiny_config(2, data={"num_sites": 3, "cases_per_site": 10})
    sites = load_cohort(cfg).sites
    assert [s.name for s in sites] == ["site-0", "site-1", "site-2"]
    for site in sites:
        ids = [c.case_id for c in site.train + site.val + site.test]
        assert len(ids) == len(set(ids)) == 10
        assert all(c.site == site.name for c in site.train)
    assert sites[0].train[0].image.shape == (1, 32, 32)


@pytest.mark.parametrize("task,multi,shape,names", [
    ("classification", True, (len(FINDINGS),), FINDINGS),
    ("classification", False, (), ("no_finding", *FINDINGS)),
    ("segmentation", False, (1, 32, 32), ORGANS),
    ("segmentation", True, (5, 32, 32), ORGANS[1:]),
])
def test_targets_per_task(task, multi, shape, names):
    cfg = tiny_config(2, task, task={"multi_label": multi})
    cohort = load_cohort(cfg)
    spec = cohort.task
    case = cohort.sites[0].train[0]
    target = target_of(case, spec)
    if task == "segmentation":  # the class map enters the pipeline; channels are made after cropping
        target = label_to_channels(spec)(target).numpy()
    assert target.shape == shape and spec.class_names == tuple(names)
    if task == "segmentation" and not multi:
        assert np.array_equal(target[0], case.label)
    if task == "segmentation" and multi:
        assert np.array_equal(target.argmax(0) + 1, np.where(case.label > 0, case.label, 1))


def test_multiclass_target_is_first_finding_or_none():
    spec = load_cohort(tiny_config(2, task={"multi_label": False})).task

    @dataclass
    class Stub:
        findings: np.ndarray
        case_id: str = "x"

    assert target_of(Stub(np.array([0, 1, 1, 0], np.float32)), spec) == 2
    assert target_of(Stub(np.zeros(4, np.float32)), spec) == 0


class LabelTrap:
    """A case whose annotations explode when touched."""

    def __init__(self, case):
        self.case_id, self.site, self.image = case.case_id, case.site, case.image

    @property
    def label(self):
        raise AssertionError("pre-training read a label")

    @property
    def findings(self):
        raise AssertionError("pre-training read findings")


def test_pretraining_never_reads_labels(tmp_path):
    cfg = tiny_config(2, pretrain={"epochs": 1, "warmup_epochs": 0})
    cohort = load_cohort(cfg)
    for site in cohort.sites:
        site.train = [LabelTrap(c) for c in site.train]
        site.val = [LabelTrap(c) for c in site.val]
        site.test = [LabelTrap(c) for c in site.test]
    result = pretrain(cfg, tmp_path, cohort=cohort)
    assert result.metrics["epoch"] == 1


def test_loader_order_and_augmentation_are_fixed_by_the_seed():
    cfg = tiny_config(2, data={"image_size": [40, 40], "flip_prob": 0.5})
    cohort = load_cohort(cfg)
    dataset = finetuning_dataset(cohort.sites[0].train, cohort.task, cfg, cohort.prep, train=True)

    def first_batch(seed):
        return next(EpochLoader(dataset, 4, shuffle=True).epoch(seed))["image"]

    a, b, c = first_batch(epoch_seed(0, 1)), first_batch(epoch_seed(0, 1)), first_batch(epoch_seed(0, 2))
    assert a.shape == (4, 1, 32, 32)  # random crops of the model size from larger images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zscore_normalisation_per_image():
    cfg = tiny_config(2)
    cohort = load_cohort(cfg)
    dataset = finetuning_dataset(cohort.sites[1].val, cohort.task, cfg, cohort.prep, train=False)
    image = dataset[0]["image"]
    assert isinstance(image, torch.Tensor) and type(image) is torch.Tensor  # plain tensor, not MetaTensor
    assert abs(float(image.mean())) < 0.2 and 0.8 < float(image.std()) < 1.2


def test_segmentation_evaluation_keeps_whole_images():
    cfg = tiny_config(2, "segmentation", data={"image_size": [40, 48]})  # softmax: one class map
    cohort = load_cohort(cfg)
    dataset = finetuning_dataset(cohort.sites[0].val, cohort.task, cfg, cohort.prep, train=False)
    item = dataset[0]
    assert item["image"].shape == (1, 40, 48) and item["label"].shape == (1, 40, 48)


def test_label_subset_is_reproducible_and_keeps_one():
    cases = list(range(20))
    assert label_subset(cases, 0.25, 0, "a") == label_subset(cases, 0.25, 0, "a")
    assert len(label_subset(cases, 0.25, 0, "a")) == 5
    assert len(label_subset(cases, 0.01, 0, "a")) == 1
    assert label_subset(cases, 1.0, 0, "a") == cases
    assert label_subset([], 0.25, 0, "a") == []  # a site without labelled cases


@pytest.mark.parametrize("task_type", ["classification", "segmentation"])
def test_transforms_leave_the_source_images_untouched(task_type):
    cfg = tiny_config(2, task_type, data={"image_size": [40, 40], "flip_prob": 1.0})
    cohort = load_cohort(cfg)
    cases = cohort.sites[0].train
    before = [c.image.copy() for c in cases]
    dataset = finetuning_dataset(cases, cohort.task, cfg, cohort.prep, train=True)
    for i in range(len(dataset)):
        dataset[i]
    assert all(np.array_equal(b, c.image) for b, c in zip(before, cases))
