"""Torch datasets and loaders for pre-training and fine-tuning.

Pre-training sees images only: :func:`pretraining_dataset` is handed image arrays, never cases, so
no label can reach self-supervised training. Fine-tuning datasets pair each image with its target
for the configured task. Order and augmentation come from (seed, epoch) through
:mod:`fedmae.data.loader`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from monai.transforms import Lambdad

from fedmae.data.catalog import Case
from fedmae.data.loader import SeededDataset
from fedmae.data.preprocess import Preprocessing, augment_steps, cached_dataset, load_steps
from fedmae.data.tasks import TaskSpec, label_to_channels, target_of

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig

ImageSource = np.ndarray | str | tuple[str, ...]  # an in-memory (C, *S) array or the file(s) to load


def pretraining_dataset(images: Sequence[ImageSource], cfg: ExperimentConfig, prep: Preprocessing, train: bool = True) -> SeededDataset:
    """Images only (no labels can enter): ``data.samples_per_volume`` random crops of the model's input
    size per image, and flips; never a label-guided crop, since there is no label key to guide it."""
    steps = load_steps(["image"], prep) + augment_steps(["image"], cfg, "train" if train else "centre", finetuning=False)
    return cached_dataset([{"image": image} for image in images], steps, cfg, prep)


def finetuning_dataset(
    cases: Sequence[Case], task: TaskSpec, cfg: ExperimentConfig, prep: Preprocessing, train: bool = True
) -> SeededDataset:
    """(image, target) pairs. Segmentation targets are cropped and flipped with their image (crops
    centred on labelled voxels with ``data.finetune_crop: pos_neg``).

    Segmentation is evaluated on whole images (sliding window), so ``train=False`` leaves them
    uncropped; classification evaluates the centre crop.
    """
    items = [{"image": case.image, "label": target_of(case, task)} for case in cases]
    if task.type == "segmentation":
        keys = ["image", "label"]
        steps = load_steps(keys, prep) + augment_steps(keys, cfg, "train" if train else "whole", finetuning=True)
        steps.append(Lambdad(keys="label", func=label_to_channels(task)))
    else:
        steps = load_steps(["image"], prep) + augment_steps(["image"], cfg, "train" if train else "centre", finetuning=True)
    return cached_dataset(items, steps, cfg, prep)


def label_subset(cases: Sequence[Case], fraction: float, seed: int, site: str) -> list[Case]:
    """A reproducible ``fraction`` of a site's labelled training cases (at least one)."""
    if fraction >= 1.0 or not cases:
        return list(cases)
    count = max(1, round(len(cases) * fraction))
    rng = np.random.default_rng([seed, zlib.crc32(site.encode()), 1])
    chosen = sorted(rng.choice(len(cases), size=count, replace=False).tolist())
    return [cases[i] for i in chosen]
