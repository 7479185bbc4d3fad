"""Seeded datasets and loaders: an epoch's order and every augmentation are fixed by its seed.

A dataset here has two stages (see :mod:`fedmae.data.preprocess`): the deterministic one runs once
per item and is cached; the random one (crop, flips, ...) runs per sample, seeded by the epoch's
seed and the sample's index. So a sample is augmented the same way whichever worker loads it and
in whatever order, a loader can keep its worker processes for the whole run, and a run resumed at
any epoch sees exactly the batches it would have seen without the interruption.

When nothing random is left (a crop the size of the image, no flips: e.g. the built-in 2D data),
a batch is a plain stack of cached tensors: no per-sample transform runs at all. When the random
stage draws several crops from each image (``data.samples_per_volume``), a batch of B images holds
B x crops samples, each image's crops side by side.

A file that fails to load is dropped from its batch and handed to the loader's
:class:`~fedmae.data.badfiles.BadFiles`, which stops the run or leaves the file out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    Lambdad,
    RandCropByPosNegLabeld,
    Randomizable,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
)
from torch.utils.data import DataLoader, Sampler, default_collate

from fedmae.data.badfiles import BadFiles, UnloadableFile, find_unloadable
from fedmae.data.catalog import DataError

Item = dict[str, Any]
Key = tuple[int, int]  # (index into the dataset, seed of that sample's augmentation)
Failure = tuple[int, str, str]  # (index into the dataset, file, what failed)
# The training crops (fedmae.data.preprocess.training_crop): what they return are views into the
# cached tensor, so a copy follows them.
CROPS = (RandSpatialCropd, RandSpatialCropSamplesd, RandCropByPosNegLabeld)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


class SeededDataset(torch.utils.data.Dataset):
    """Cached items plus a per-sample random stage.

    ``store``: the items after the deterministic stage (a list, or a MONAI dataset that loads or
    caches them). ``augment``: the random stage, or None. Index with ``(index, seed)``; a plain
    index means seed 0. A random stage that draws several crops from an image
    (``data.samples_per_volume``) gives a list of items; a batch holds them side by side.
    """

    def __init__(self, store: Sequence[Item], augment: Compose | None):
        self.store, self.augment = store, augment

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: int | Key) -> Item | list[Item]:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        try:
            item = self.store[index]
        except Exception as err:
            found = find_unloadable(err)  # from a disk cache, wrapped by MONAI
            if found is None:
                raise
            raise UnloadableFile(found.path, found.reason) from None
        if isinstance(item, UnloadableFile):  # kept in place of the item by an in-memory cache
            raise UnloadableFile(item.path, item.reason)
        if self.augment is None:
            return item
        self.augment.set_random_state(seed=seed)
        return self.augment(dict(item))

    def __getitems__(self, keys: Sequence[Key]) -> Item:
        """One collated batch (torch's loaders fetch a whole batch through this): images x crops."""
        return default_collate([sample for key in keys for sample in _samples(self[key])])

    def fetch(self, keys: Sequence[Key]) -> tuple[Item | None, list[Failure]]:
        """One collated batch of the samples that load (None: not one did), and those that failed."""
        items: list[Item] = []
        failed: list[Failure] = []
        for key in keys:
            try:
                items += _samples(self[key])
            except UnloadableFile as err:
                failed.append((key[0] if isinstance(key, tuple) else key, err.path, err.reason))
        return (default_collate(items) if items else None), failed


def _samples(drawn: Item | list[Item]) -> list[Item]:
    """The samples one image gave: its crops, in the order they were drawn."""
    return drawn if isinstance(drawn, list) else [drawn]


class _Fetching(torch.utils.data.Dataset):
    """What the DataLoader (and its workers) index: batches that never raise for a bad file."""

    def __init__(self, dataset: SeededDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: Sequence[Key]) -> tuple[Item | None, list[Failure]]:
        return self.dataset.fetch(keys)


def seeded_dataset(store: Sequence[Item], augment: Sequence, roi: Sequence[int]) -> SeededDataset:
    """A :class:`SeededDataset` whose random stage drops what cannot change a sample.

    A random crop of ``roi`` from items that all have that size is no crop, and the steps after it
    that draw nothing then run once, on the cache. This needs the items at hand (an in-memory list).
    """
    steps = list(augment)
    if isinstance(store, list) and steps and isinstance(steps[0], RandSpatialCropd) and _all_of_size(store, roi):
        steps = steps[1:]
        fixed = next((i for i, step in enumerate(steps) if isinstance(step, Randomizable)), len(steps))
        if fixed:
            now = Compose(steps[:fixed])
            store = [now(dict(item)) if isinstance(item, dict) else item for item in store]
            steps = steps[fixed:]
    if steps and isinstance(steps[0], CROPS):
        # A crop is a view into the cached tensor: copy it (each crop, when there are several)
        # before anything can write into it.
        steps.insert(1, _copy_step(steps[0].keys))
    elif steps:
        steps.insert(0, _copy_step(_keys(store)))
    return SeededDataset(store, Compose(steps) if steps else None)


def _all_of_size(store: list[Item], roi: Sequence[int]) -> bool:
    return all(tuple(item["image"].shape[1:]) == tuple(roi) for item in store if isinstance(item, dict))


def _keys(store: Sequence[Item]) -> list[str]:
    """The tensor keys of the first item that loads."""
    for index in range(len(store)):
        try:
            item = store[index]
        except Exception as err:
            if find_unloadable(err) is None:
                raise
            continue
        if isinstance(item, dict):
            return [k for k, v in item.items() if isinstance(v, torch.Tensor)]
    return ["image"]


def _copy_step(keys: Sequence[str]) -> Lambdad:
    return Lambdad(keys=list(keys), func=_copy)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format)


class SeededBatches(Sampler[list[Key]]):
    """Batches of ``(index, seed)`` keys for the epoch whose seed was last set.

    The order is the one fedmae's earlier loader gave (torch's ``DataLoader(shuffle=True,
    generator=Generator().manual_seed(seed))`` iterated through ``tqdm.auto``, whose constructor
    calls ``iter`` once more: two workers' seeds drawn, then the permutation), so earlier runs
    keep their results.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool):
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.seed = 0
        # Samples whose file failed to load (data.skip_bad_cases): taken out of their batches,
        # which keeps every other sample where it was; a batch left empty is not yielded.
        self.left_out: set[int] = set()

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed)
            torch.empty(2, dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        sample_seeds = np.random.default_rng([self.seed, 1]).integers(0, 2**31, size=self.size).tolist()
        for start in range(0, self.size, self.batch_size):
            batch = [(i, sample_seeds[i]) for i in order[start:start + self.batch_size] if i not in self.left_out]
            if batch:
                yield batch


class EpochLoader:
    """The batches of one dataset, epoch after epoch, from one loader whose workers persist.

    ``epoch(seed)`` gives that epoch's batches; on CUDA they come in pinned memory, so copies to the
    device can be non-blocking. ``bad_files``: what to do with a file that fails to load (default:
    stop with :class:`~fedmae.data.badfiles.UnloadableFile`); a file left out stays out.
    """

    def __init__(self, dataset: SeededDataset, batch_size: int, shuffle: bool, num_workers: int | str = 0,
                 device: torch.device | None = None, bad_files: BadFiles | None = None):
        self.dataset = dataset
        self.bad_files = bad_files if bad_files is not None else BadFiles(skip=False)
        self.batches = SeededBatches(len(dataset), batch_size, shuffle)
        workers = resolve_workers(num_workers, dataset, device)
        self.loader = DataLoader(
            _Fetching(dataset),
            batch_sampler=self.batches,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device is not None and device.type == "cuda",
            collate_fn=_already_collated,
            # A generator of its own: torch would otherwise draw the workers' base seed from the
            # global RNG, shifting the masking and dropout noise of training.
            generator=torch.Generator(),
        )

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, seed: int) -> Iterator[Item]:
        self.batches.seed = seed
        return _Epoch(self, iter(self.loader))


class _Epoch:
    """One epoch's batches; each failure to load goes to the loader's BadFiles as it arrives."""

    def __init__(self, owner: EpochLoader, batches: Iterator[tuple[Item | None, list[Failure]]]):
        self.owner, self.batches, self.yielded = owner, batches, False

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> _Epoch:
        return self

    def __next__(self) -> Item:
        while True:
            try:
                batch, failed = next(self.batches)
            except StopIteration:
                if not self.yielded and self.owner.batches.left_out:
                    raise DataError(f"none of the {len(self.owner.dataset)} images of this loader could be loaded; "
                                    "see the warnings above and bad_cases.csv") from None
                raise
            for index, path, reason in failed:
                self.owner.bad_files.found(path, reason)  # raises unless data.skip_bad_cases
                self.owner.batches.left_out.add(index)
            if batch is not None:
                self.yielded = True
                return batch


def resolve_workers(num_workers: int | str, dataset: SeededDataset, device: torch.device | None) -> int:
    """Loader processes: none when nothing runs per sample (a batch is a stack of cached
    tensors) or on the CPU (workers would take cores from the model); ``auto`` on a GPU keeps it
    fed with up to 4 per GPU, leaving a core for the training process."""
    if num_workers != "auto":
        return int(num_workers)
    if dataset.augment is None or device is None or device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, torch.cuda.device_count()) - 1))


def _already_collated(batch: Item) -> Item:
    return batch
