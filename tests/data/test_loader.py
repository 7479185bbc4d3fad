"""Seeded loaders: order and augmentation fixed by (seed, epoch, sample), whatever loads them."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedmae.data.cohort import load_cohort
from fedmae.data.datasets import finetuning_dataset, pretraining_dataset
from fedmae.data.loader import EpochLoader, SeededBatches, epoch_seed
from fedmae.engine.pretrain import site_images
from tests.tiny import tiny_config


@pytest.mark.parametrize("size,batch", [(30, 8), (216, 16), (5, 16)])
def test_order_is_the_one_earlier_runs_were_trained_in(size, batch):
    # fedmae's loader before: MONAI's DataLoader over a seeded generator, iterated through tqdm.auto.
    items = Dataset([{"i": torch.tensor(i)} for i in range(size)])
    for seed in (0, epoch_seed(0, 3)):
        earlier = DataLoader(items, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
        expected = [b["i"].tolist() for b in tqdm(earlier, disable=True)]
        batches = SeededBatches(size, batch, shuffle=True)
        batches.seed = seed
        assert [[index for index, _ in keys] for keys in batches] == expected


def test_an_epoch_is_fixed_by_its_seed_and_independent_of_the_workers():
    cfg = tiny_config(2, data={"image_size": [40, 40], "flip_prob": 0.5})
    cohort = load_cohort(cfg)
    dataset = finetuning_dataset(cohort.sites[0].train, cohort.task, cfg, cohort.prep, train=True)
    assert dataset.augment is not None  # random crops from larger images, and flips
    in_process = EpochLoader(dataset, 3, shuffle=True, num_workers=0)
    workers = EpochLoader(dataset, 3, shuffle=True, num_workers=2)
    try:
        for epoch in (1, 2, 1):  # the workers persist across epochs; a repeated epoch is the same again
            a = [b["image"] for b in in_process.epoch(epoch_seed(0, epoch))]
            b = [b["image"] for b in workers.epoch(epoch_seed(0, epoch))]
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
            assert a[0].shape == (3, 1, 32, 32)
        first, second = (torch.cat([b["image"] for b in in_process.epoch(epoch_seed(0, e))]) for e in (1, 2))
        assert not torch.equal(first, second)
    finally:
        del workers


def test_a_sample_is_augmented_the_same_in_any_batch():
    cfg = tiny_config(2, data={"image_size": [40, 40], "flip_prob": 0.5})
    cohort = load_cohort(cfg)
    dataset = pretraining_dataset(site_images(cohort.sites, "train"), cfg, cohort.prep, train=True)
    keys = next(iter(_batches(len(dataset), 4, seed=7)))
    batch = dataset.__getitems__(keys)["image"]
    for position, key in enumerate(keys):
        assert torch.equal(dataset[key]["image"], batch[position])


def _batches(size: int, batch: int, seed: int) -> SeededBatches:
    batches = SeededBatches(size, batch, shuffle=True)
    batches.seed = seed
    return batches


def test_images_at_the_model_size_without_flips_are_batched_from_the_cache():
    cfg = tiny_config(2, data={"flip_prob": 0.0})  # built-in images at the model size: nothing random per sample
    cohort = load_cohort(cfg)
    dataset = pretraining_dataset(site_images(cohort.sites, "train"), cfg, cohort.prep, train=True)
    assert dataset.augment is None
    loader = EpochLoader(dataset, 4, shuffle=True, num_workers="auto")
    assert loader.loader.num_workers == 0
    rng = torch.random.get_rng_state()
    batches = list(loader.epoch(epoch_seed(0, 0)))
    assert torch.equal(torch.random.get_rng_state(), rng)  # the training RNG stream is left alone
    assert sum(len(b["image"]) for b in batches) == len(dataset) and type(batches[0]["image"]) is torch.Tensor


@pytest.mark.parametrize("task_type", ["classification", "segmentation"])
def test_augmentations_never_write_into_the_cache(task_type):
    cfg = tiny_config(2, task_type, data={"flip_prob": 1.0, "intensity_prob": 1.0, "rotate_prob": 1.0})
    cohort = load_cohort(cfg)
    dataset = finetuning_dataset(cohort.sites[0].train, cohort.task, cfg, cohort.prep, train=True)
    cached = [{k: v.clone() for k, v in item.items() if isinstance(v, torch.Tensor)} for item in dataset.store]
    for epoch in range(3):
        for _ in EpochLoader(dataset, 2, shuffle=True).epoch(epoch_seed(0, epoch)):
            pass
    for before, item in zip(cached, dataset.store):
        assert all(torch.equal(v, item[k]) for k, v in before.items())
