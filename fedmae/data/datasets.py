"""Sites, tasks and torch datasets/loaders for pre-training and fine-tuning.

Pre-training sees images only: :func:`pretraining_dataset` is handed image arrays, never cases, so
no label can reach self-supervised training. Fine-tuning datasets pair each image with its target
for the configured task. Loaders are rebuilt every epoch from a seed derived from (seed, epoch), so
shuffling and augmentation are reproducible and a resumed run sees exactly the batches it would
have seen without the interruption.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    Lambdad,
    NormalizeIntensityd,
    RandFlipd,
    RandSpatialCropd,
)

from fedmae.data import synthetic
from fedmae.data.splits import split_indices

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig


class Case(Protocol):
    """What a data source yields per patient: the image and, when known, its annotations."""

    case_id: str
    site: str
    image: np.ndarray  # (C, *S) float32
    label: np.ndarray | None  # (*S) int64 segmentation map
    findings: np.ndarray | None  # (K,) float32 multi-label findings


@dataclass
class SiteData:
    name: str
    train: list[Case]
    val: list[Case]
    test: list[Case]


@dataclass(frozen=True)
class TaskSpec:
    """What the fine-tune model predicts: type, output names and how targets are encoded."""

    type: str  # classification | segmentation
    multi_label: bool
    class_names: tuple[str, ...]

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)


def load_sites(cfg: ExperimentConfig) -> list[SiteData]:
    """The configured data source, split per site into train / val / test."""
    d = cfg.data
    hospitals = synthetic.generate_hospitals(
        num_sites=d.num_sites,
        cases_per_site=d.cases_per_site,
        spatial_dims=cfg.spatial_dims,
        shape=tuple(cfg.data_image_size),
        in_channels=cfg.model.in_channels,
        seed=cfg.seed,
        heterogeneity=d.heterogeneity,
    )
    sites = []
    for name, cases in hospitals.items():
        split = split_indices(len(cases), d.val_fraction, d.test_fraction, cfg.seed, name)
        sites.append(
            SiteData(name, [cases[i] for i in split.train], [cases[i] for i in split.val], [cases[i] for i in split.test])
        )
    return sites


def task_spec(cfg: ExperimentConfig) -> TaskSpec:
    """Outputs of the built-in data for the configured task."""
    t = cfg.task
    if t.type == "classification":
        names = synthetic.FINDINGS if cfg.multi_label else ("no_finding", *synthetic.FINDINGS)
    else:
        # Softmax segmentation predicts every organ plus background; sigmoid (multi-label)
        # segmentation predicts one binary channel per foreground structure.
        names = synthetic.ORGANS[1:] if cfg.multi_label else synthetic.ORGANS
    return TaskSpec(t.type, cfg.multi_label, tuple(names))


def target_of(case: Case, task: TaskSpec) -> np.ndarray:
    """The fine-tuning target of one case.

    classification, multi-label: (K,) float 0/1; multi-class: () int64, the first finding present
    (1..K) or 0 for none; segmentation: (1, *S) int64 class map, or (K, *S) float 0/1 channels.
    """
    if task.type == "classification":
        if case.findings is None:
            raise ValueError(f"case {case.case_id} has no findings, needed for classification")
        findings = np.asarray(case.findings, dtype=np.float32)
        if task.multi_label:
            return findings
        positive = np.flatnonzero(findings > 0.5)
        return np.asarray(positive[0] + 1 if positive.size else 0, dtype=np.int64)
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label map, needed for segmentation")
    label = np.asarray(case.label, dtype=np.int64)
    if task.multi_label:
        return np.stack([(label == c).astype(np.float32) for c in range(1, task.num_outputs + 1)])
    return label[None]


# ---------------------------------------------------------------------------------------------
# torch datasets


def _transforms(keys: list[str], cfg: ExperimentConfig, mode: str) -> Compose:
    """Per-image intensity standardisation, then by ``mode``: "train" (random crop of the model's
    input size + flips), "centre" (centre crop) or "whole" (no crop: sliding-window evaluation)."""
    # A fresh copy first: MONAI's intensity transforms work in place and would otherwise rewrite
    # the cached source arrays (and so every later epoch and stage) on each access.
    steps: list = [Lambdad(keys=keys, func=_fresh_tensor)]
    if cfg.data.normalize == "zscore":
        # Whole-image statistics before cropping, so a crop and the full image share one scale.
        steps.append(NormalizeIntensityd(keys="image", channel_wise=True))
    if mode == "train":
        steps.append(RandSpatialCropd(keys=keys, roi_size=list(cfg.model.img_size), random_size=False))
        if cfg.data.flip_prob:
            steps += [RandFlipd(keys=keys, prob=cfg.data.flip_prob, spatial_axis=a) for a in range(cfg.spatial_dims)]
    elif mode == "centre":
        steps.append(CenterSpatialCropd(keys=keys, roi_size=list(cfg.model.img_size)))
    # Back to plain tensors: MetaTensor bookkeeping only costs time in a model's forward pass.
    steps.append(EnsureTyped(keys=keys, data_type="tensor", track_meta=False))
    return Compose(steps)


def _fresh_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.tensor(np.asarray(array))


def pretraining_dataset(images: Sequence[np.ndarray], cfg: ExperimentConfig, train: bool = True) -> Dataset:
    """Images only (no labels can enter): random crops and flips of the model's input size."""
    return Dataset([{"image": image} for image in images], transform=_transforms(["image"], cfg, "train" if train else "centre"))


def finetuning_dataset(cases: Sequence[Case], task: TaskSpec, cfg: ExperimentConfig, train: bool = True) -> Dataset:
    """(image, target) pairs. Segmentation targets are cropped and flipped with their image.

    Segmentation is evaluated on whole images (sliding window), so ``train=False`` leaves them
    uncropped; classification evaluates the centre crop.
    """
    items = [{"image": case.image, "label": target_of(case, task)} for case in cases]
    if task.type == "segmentation":
        return Dataset(items, transform=_transforms(["image", "label"], cfg, "train" if train else "whole"))
    return Dataset(items, transform=_transforms(["image"], cfg, "train" if train else "centre"))


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream)."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0])


def make_loader(dataset: Dataset, batch_size: int, seed: int, shuffle: bool, num_workers: int = 0) -> DataLoader:
    """A loader whose order and augmentations are fixed by ``seed`` (MONAI seeds the transforms)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def label_subset(cases: Sequence[Case], fraction: float, seed: int, site: str) -> list[Case]:
    """A reproducible ``fraction`` of a site's labelled training cases (at least one)."""
    if fraction >= 1.0 or not cases:
        return list(cases)
    count = max(1, round(len(cases) * fraction))
    rng = np.random.default_rng([seed, zlib.crc32(site.encode()), 1])
    chosen = sorted(rng.choice(len(cases), size=count, replace=False).tolist())
    return [cases[i] for i in chosen]
