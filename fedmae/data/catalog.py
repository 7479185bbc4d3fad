"""What every data source reader produces: a catalogue of cases, before any pixel is read.

A reader turns a data set on disk (a Decathlon folder, a NIfTI folder with a manifest, a folder
of DICOM series, the ChestX-ray14 layout, a MedMNIST file) or the built-in generator into a
:class:`Catalog`: one :class:`Case` per image with where its pixels are, its annotations when it
has any, its natural site and patient, and any official split. Problems found while indexing (a
listed file that is missing, an unknown finding name) are collected as :class:`Problem` records
instead of raised, so one inspection can report all of them; the loader decides whether they are
fatal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

Modality = Literal["ct", "mri", "xray", "other"]
SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # a split of its own: images that only pre-training uses


class DataError(ValueError):
    """A data problem the user must fix; the message names the file and the problem."""


@dataclass
class Case:
    """One image and its annotations.

    ``image`` is a (C, *S) float32 array held in memory (built-in data, MedMNIST) or the path of an
    image file or DICOM series folder (several paths: one per channel, stacked in order). ``label``
    is a segmentation map, (*S) integer array or file path. ``findings`` are classification
    targets: (K,) 0/1 values, one-hot when the classes are exclusive.
    """

    case_id: str
    image: np.ndarray | str | tuple[str, ...]
    label: np.ndarray | str | None = None
    findings: np.ndarray | None = None
    site: str = ""  # natural site ("" when the source does not say)
    patient: str = ""  # cases of one patient share a site and a split ("" = its own patient)
    split: str | None = None  # official split (train / val / test / unlabelled); None: drawn from the seed

    @property
    def group(self) -> str:
        return self.patient or self.case_id

    @property
    def in_memory(self) -> bool:
        return isinstance(self.image, np.ndarray)

    @property
    def image_files(self) -> tuple[str, ...]:
        if self.in_memory:
            return ()
        return (self.image,) if isinstance(self.image, str) else tuple(self.image)

    @property
    def files(self) -> tuple[str, ...]:
        """The files this case reads (images first), for error messages and checks."""
        return self.image_files + ((self.label,) if isinstance(self.label, str) else ())


@dataclass(frozen=True)
class Problem:
    """Something wrong with one case (or the data set, when ``case_id`` is empty)."""

    path: str  # the file at fault (or the data set's root)
    message: str
    case_id: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Catalog:
    """A data set's cases and what its annotations mean."""

    source: str  # reader name: synthetic, decathlon, nifti_folder, dicom, chestxray14, medmnist
    root: str
    modality: Modality
    spatial_dims: int
    cases: list[Case]
    findings: tuple[str, ...] = ()  # classification outputs (empty: the source has none)
    exclusive: bool = False  # findings are mutually exclusive classes (one-hot), not multi-label
    seg_classes: tuple[str, ...] = ()  # segmentation label names; index = label value, 0 = background
    channels: int | None = None  # image channels when the source declares them
    channel_names: tuple[str, ...] = ()
    problems: list[Problem] = field(default_factory=list)

    def labelled(self, case: Case, task_type: str) -> bool:
        """Whether ``case`` carries the annotation ``task_type`` needs."""
        return case.findings is not None if task_type == "classification" else case.label is not None


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(name: str) -> str:
    """``case_001.nii.gz`` -> ``case_001``."""
    base = name.rsplit("/", 1)[-1]
    for suffix in NIFTI_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def resolve_path(root: Path, path: str) -> Path:
    """A path from an index file: relative paths are relative to the data set's folder."""
    resolved = Path(path)
    return resolved if resolved.is_absolute() else root / resolved


def listed_case(
    case_id: str,
    images: list[Path],
    label: Path | None,
    fields: Mapping[str, object],
    split: str | None,
    listed_in: str,
    problems: list[Problem],
) -> Case | None:
    """A case from an index entry (a dataset.json entry, a manifest row), or None when a file it
    lists is missing: each missing file becomes a problem naming where it was listed."""
    missing = [p for p in [*images, label] if p is not None and not p.is_file()]
    for path in missing:
        what = "label" if path == label else "image"
        problems.append(Problem(str(path), f"{what} listed in {listed_in} does not exist", case_id))
    if missing:
        return None
    return Case(
        case_id=case_id,
        image=str(images[0]) if len(images) == 1 else tuple(map(str, images)),
        label=str(label) if label else None,
        site=str(fields.get("site") or ""),  # JSON null means "not given"
        patient=str(fields.get("patient") or ""),
        split=split,
    )
