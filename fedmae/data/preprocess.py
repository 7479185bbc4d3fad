"""Preprocessing and augmentation as MONAI dictionary transforms, per modality, as the paper does.

Two stages. The deterministic stage turns a file (or an in-memory array) into a normalised tensor
on the working voxel grid: load, orient to RAS, resample, window or standardise the intensities,
crop to the foreground, pad to at least the model's input. Its output is what gets cached
(:func:`cached_dataset`), so a 3-D volume is decoded and resampled once, not every epoch. The
random stage then draws the training crop(s) and augmentations from the cached tensor, seeded per
sample (:mod:`fedmae.data.loader`).

| modality | resample (default) | intensity | foreground crop |
|---|---|---|---|
| ct | 1.5 x 1.5 x 2.0 mm | window -175..250 HU -> [0, 1] | yes |
| mri | 1 mm isotropic | z-score per channel over non-zero voxels | yes |
| xray | resize to data.image_size (grey) | z-score per image | no |
| other | none | z-score per image | no |

Training crops follow the paper's recipes (docs/recipes.md): ``data.samples_per_volume`` crops per
image and step; segmentation fine-tuning may centre them on labelled voxels (``data.finetune_crop:
pos_neg``, MONAI's RandCropByPosNegLabeld), pre-training never (its items have no label); 2-D
classification fine-tuning may add RandAugment (``data.randaugment_ops``). Every crop is the
model's input size, and fine-tuning refuses an encoder pre-trained on another
(:func:`check_encoder_input`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureTyped,
    Lambdad,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    RandSpatialCropSamplesd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from fedmae.data.badfiles import GuardedLoad
from fedmae.data.dicom import LoadImageOrSeriesd
from fedmae.data.loader import SeededDataset, seeded_dataset

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig
    from fedmae.data.catalog import Catalog

DEFAULT_SPACING = {"ct": (1.5, 1.5, 2.0), "mri": (1.0, 1.0, 1.0)}
DEFAULT_NORMALIZE = {"ct": "window", "mri": "zscore_nonzero", "xray": "zscore", "other": "zscore"}


@dataclass(frozen=True)
class Preprocessing:
    """The deterministic steps for one data set, resolved from the config and the catalogue."""

    modality: str
    spatial_dims: int
    from_files: bool
    normalize: str  # window | zscore | zscore_nonzero | none
    spacing: tuple[float, ...] | None  # None: keep the stored voxel grid
    window: tuple[float, float]
    crop_foreground: bool
    resize: tuple[int, ...] | None  # 2-D pictures are resized to this
    min_size: tuple[int, ...]  # pad to at least the model input

    def key(self) -> str:
        """A short digest: disk caches of different preprocessing never mix."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def resolve_preprocessing(cfg: ExperimentConfig, catalog: Catalog) -> Preprocessing:
    d = cfg.data
    modality = catalog.modality if d.modality == "auto" else d.modality
    from_files = bool(catalog.cases) and not catalog.cases[0].in_memory
    volumetric = from_files and catalog.spatial_dims == 3 and modality in ("ct", "mri")
    spacing = None
    if volumetric and d.resample:
        spacing = d.spacing or DEFAULT_SPACING[modality]
    return Preprocessing(
        modality=modality,
        spatial_dims=catalog.spatial_dims,
        from_files=from_files,
        normalize=DEFAULT_NORMALIZE[modality] if d.normalize == "auto" else d.normalize,
        spacing=tuple(spacing) if spacing else None,
        window=tuple(d.window),
        crop_foreground=volumetric and d.crop_foreground,
        resize=tuple(cfg.data_image_size) if from_files and catalog.spatial_dims == 2 else None,
        min_size=tuple(cfg.model.img_size),
    )


def load_steps(keys: Sequence[str], prep: Preprocessing) -> list:
    """Deterministic steps: file or array -> normalised (C, *S) tensor, at least the model input."""
    keys = list(keys)
    has_label = "label" in keys
    steps: list = []
    if prep.from_files:
        # MONAI's LoadImaged, with a folder read as a DICOM series (sorted by position, checked)
        steps.append(LoadImageOrSeriesd(keys=keys))
        if prep.spatial_dims == 2:
            steps.append(Lambdad(keys="image", func=to_grey))
        if prep.spatial_dims == 3:
            steps.append(Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))))
        if prep.spatial_dims == 3 and prep.spacing is not None:
            steps.append(Spacingd(keys=keys, pixdim=prep.spacing, mode=["bilinear", "nearest"][: len(keys)]))
    else:
        # A fresh copy: MONAI's intensity transforms work in place and would otherwise rewrite the
        # source arrays (and so every later epoch and stage) on each access.
        steps.append(Lambdad(keys=keys, func=_fresh_tensor))
    if prep.normalize == "window":
        lo, hi = prep.window
        steps.append(ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if prep.crop_foreground:
        # After windowing, air is 0 and the body is above it; raw MRI background is 0 too.
        steps.append(CropForegroundd(keys=keys, source_key="image", allow_smaller=True,
                                     start_coord_key=None, end_coord_key=None))
    if prep.normalize == "zscore":
        # Whole-image statistics before cropping, so a crop and the full image share one scale.
        steps.append(NormalizeIntensityd(keys="image", channel_wise=True))
    elif prep.normalize == "zscore_nonzero":
        steps.append(NormalizeIntensityd(keys="image", channel_wise=True, nonzero=True))
    if prep.resize is not None:
        modes = ["area", "nearest"] if has_label else ["area"]
        steps.append(Resized(keys=keys, spatial_size=list(prep.resize), mode=modes))
    steps.append(SpatialPadd(keys=keys, spatial_size=list(prep.min_size)))
    # A compact copy: a crop is a view into the whole volume, and caching the view would keep
    # (and write to disk) every voxel of the original.
    steps.append(Lambdad(keys=keys, func=_compact))
    # Plain tensors from here: cacheable with weights_only loading, and no MetaTensor bookkeeping.
    steps.append(EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False))
    return steps


def augment_steps(keys: Sequence[str], cfg: ExperimentConfig, mode: str, finetuning: bool) -> list:
    """Random (or centre) crop of the model's input size, then the training augmentations.

    ``mode``: "train" (the training crop(s) of :func:`training_crop` + flips; fine-tuning adds
    90-degree rotations, intensity scale/shift and, for 2-D classification, RandAugment),
    "centre" (centre crop) or "whole" (no crop: sliding-window evaluation).
    """
    keys = list(keys)
    # MONAI's spatial transforms hand back MetaTensors; the model wants plain tensors.
    plain = EnsureTyped(keys=keys, data_type="tensor", track_meta=False)
    d = cfg.data
    roi = list(cfg.model.img_size)
    if mode == "centre":
        # Deterministic, so MONAI's caches store the crop: compact it (see load_steps).
        return [CenterSpatialCropd(keys=keys, roi_size=roi), Lambdad(keys=keys, func=_compact), plain]
    if mode == "whole":
        return [plain]
    steps: list = [training_crop(keys, cfg, finetuning)]
    if d.flip_prob:
        steps += [RandFlipd(keys=keys, prob=d.flip_prob, spatial_axis=a) for a in range(cfg.spatial_dims)]
    if finetuning and d.rotate_prob and roi[0] == roi[1]:
        steps.append(RandRotate90d(keys=keys, prob=d.rotate_prob, max_k=3, spatial_axes=(0, 1)))
    if finetuning and d.intensity_prob:
        steps.append(RandScaleIntensityd(keys="image", factors=0.1, prob=d.intensity_prob))
        steps.append(RandShiftIntensityd(keys="image", offsets=0.1, prob=d.intensity_prob))
    if finetuning and d.randaugment_ops and "label" not in keys:  # the config allows it for 2-D classification only
        steps.append(RandAugmentd("image", d.randaugment_ops, d.randaugment_magnitude))
    return [*steps, plain]


def training_crop(keys: Sequence[str], cfg: ExperimentConfig, finetuning: bool) -> MapTransform:
    """The crop(s) of the model's input size that a training step draws from one image.

    One uniformly random crop; or ``data.samples_per_volume`` of them (a list of items, which the
    loader puts side by side in the batch); or, fine-tuning a segmentation with
    ``data.finetune_crop: pos_neg``, crops centred on a labelled voxel with probability
    ``data.pos_fraction`` and on background otherwise. Pre-training's items have no label key, so
    it never takes that branch.
    """
    keys = list(keys)
    d, roi = cfg.data, list(cfg.model.img_size)
    if finetuning and "label" in keys and d.finetune_crop == "pos_neg":
        return RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=d.pos_fraction,
                                      neg=1.0 - d.pos_fraction, num_samples=d.samples_per_volume)
    if d.samples_per_volume > 1:
        return RandSpatialCropSamplesd(keys=keys, roi_size=roi, num_samples=d.samples_per_volume, random_size=False)
    return RandSpatialCropd(keys=keys, roi_size=roi, random_size=False)


class RandAugmentd(Randomizable, MapTransform):
    """RandAugment (Cubuk et al. 2020) of a 2-D image: torchvision's operations and magnitudes,
    drawn from this transform's seeded state like MONAI's random transforms.

    torchvision draws from torch's global generator; here it runs in a forked generator seeded
    from ``self.R`` (set per sample by the loader), so a sample is augmented the same in any
    worker, and the training randomness (masking, dropout) is left as it was. The operations
    expect intensities in [0, 1]: each image is mapped there by its own range and back afterwards,
    so normalised intensities keep their scale. ``magnitude`` is on timm's 0-10 scale (the paper's
    ``rand-m9``), which is torchvision's with 11 magnitude bins.
    """

    def __init__(self, keys: str | Sequence[str], num_ops: int, magnitude: int):
        MapTransform.__init__(self, keys)
        from torchvision.transforms import InterpolationMode, v2  # only runs that use RandAugment load it

        self.operations = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11,
                                         interpolation=InterpolationMode.BILINEAR)
        self.seed = 0

    def randomize(self, data: Any = None) -> None:
        self.seed = int(self.R.randint(2**31))

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        self.randomize()
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = self._augment(torch.as_tensor(out[key]))
        return out

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        low = image.min()
        span = (image.max() - low).clamp_min(1e-6)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            augmented = self.operations((image - low) / span)  # (C, H, W), C 1 or 3
        return augmented * span + low


def check_encoder_input(encoder_img_size: Sequence[int] | None, cfg: ExperimentConfig, where: str) -> None:
    """Refuse to fine-tune on crops (``model.img_size``) other than the input an encoder was pre-trained on.

    A ViT's position table belongs to one grid of patches. A SelfMedMAE user whose model input
    differed from their crop got a Dice under 0.60, and 0.67 once the two were equal (SelfMedMAE
    issue #8). In fedmae the crop is the model's input, so the one way they can still differ is an
    encoder pre-trained on another input size; grids with the same number of patches (64x32 and
    32x64) would even load without complaint. ``encoder_img_size``: from the checkpoint's config
    (None: not recorded, nothing to check).
    """
    if encoder_img_size is None:
        return
    crop = list(cfg.model.img_size)
    if list(encoder_img_size) != crop:
        raise ValueError(f"{where}: the encoder was pre-trained on inputs of {list(encoder_img_size)}, but the fine-tuning "
                         f"crops are model.img_size {crop}; set model.img_size to {list(encoder_img_size)} (a ViT's "
                         "crop must be its input size)")


def cached_dataset(items: list[dict[str, Any]], steps: list, cfg: ExperimentConfig, prep: Preprocessing) -> SeededDataset:
    """A dataset over ``items`` whose deterministic steps run once per item, and whose random
    steps run per sample, seeded (:mod:`fedmae.data.loader`).

    As in MONAI's caches, the deterministic stage is every step before the first random one: the
    loaded, resampled, normalised tensor is kept (in memory, or on disk under ``data.cache_dir``,
    shared by runs and sites) and only crops and augmentations run per epoch. In-memory sources
    are always cached in memory: their deterministic steps are cheap, but not free every epoch.
    """
    first_random = next((i for i, step in enumerate(steps) if isinstance(step, Randomizable)), len(steps))
    fixed, augment = Compose(steps[:first_random]), steps[first_random:]
    if not prep.from_files:
        store: Any = [fixed(dict(item)) for item in items]
    # From files, a file that fails to load becomes one error naming it (fedmae.data.badfiles):
    # kept in place of the item in memory, raised (so never cached) with a disk cache.
    elif cfg.data.cache == "none":
        store = Dataset(items, transform=GuardedLoad(fixed, prep.spatial_dims, mark=True))
    elif cfg.data.cache == "disk":
        folder = Path(cfg.data.cache_dir) / prep.key()
        folder.mkdir(parents=True, exist_ok=True)
        store = PersistentDataset(items, transform=GuardedLoad(fixed, prep.spatial_dims, mark=False), cache_dir=folder)
    else:
        cache = CacheDataset(items, transform=GuardedLoad(fixed, prep.spatial_dims, mark=True),
                             num_workers=_cache_workers(cfg), progress=False)
        store = [cache[i] for i in range(len(cache))]
    return seeded_dataset(store, augment, cfg.model.img_size)


def _cache_workers(cfg: ExperimentConfig) -> int:
    workers = cfg.data.num_workers
    return max(1, os.cpu_count() or 1) if workers == "auto" else max(1, workers)


def to_grey(image: torch.Tensor) -> torch.Tensor:
    """Radiographs are grey: average colour channels and drop an alpha channel."""
    if image.shape[0] in (3, 4):
        return image[:3].float().mean(dim=0, keepdim=True)
    return image


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format)


def _fresh_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.tensor(np.asarray(array))
