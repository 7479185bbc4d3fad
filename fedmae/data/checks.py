"""Checks of every case before training starts: each file's problems and statistics.

A run that dies after hours on one truncated volume loses the time; a run that silently trains on
a NaN volume or a label map that does not fit its image loses the result. So every file is opened
(and with ``full`` read to the last voxel) up front, and each problem is reported as one line
naming the file. Files are read with nibabel and Pillow directly (a folder is a DICOM series,
read by :mod:`fedmae.data.dicom`): the loader's own preprocessing (MONAI) later reads the same
files, but errors from deep inside a transform chain do not say which file or what to do.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fedmae.data.catalog import Case, Catalog, Problem, is_nifti

AFFINE_TOLERANCE = 1e-3  # mm; image and label grids must agree to this
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, MemoryError)


@dataclass
class CaseStats:
    """What one case looks like on disk (before preprocessing)."""

    case_id: str
    shape: tuple[int, ...]  # (C, *S)
    spacing: tuple[float, ...] | None = None  # mm per voxel, when the file says
    minimum: float | None = None  # intensity statistics over all voxels (full checks only)
    maximum: float | None = None
    mean: float | None = None
    std: float | None = None
    label_values: tuple[int, ...] | None = None  # distinct label values (full checks only)


@dataclass
class ScanResult:
    stats: dict[str, CaseStats] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def bad_cases(self) -> set[str]:
        return {p.case_id for p in self.problems if p.case_id}


@dataclass
class _Image:
    array: np.ndarray | None  # (C, *S) when read
    shape: tuple[int, ...]  # (C, *S)
    spacing: tuple[float, ...] | None
    affine: np.ndarray | None


def scan(
    catalog: Catalog,
    cases: Sequence[Case] | None = None,
    *,
    full: bool = True,
    channels: int | None = None,
    num_classes: int | None = None,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> ScanResult:
    """Open every case's files; return their statistics and every problem found.

    ``channels``: the image channels the model expects; ``num_classes``: label values must lie in
    0 .. num_classes - 1 (default: the classes the catalogue declares).
    """
    cases = catalog.cases if cases is None else cases
    num_classes = num_classes if num_classes is not None else (len(catalog.seg_classes) or None)
    result = ScanResult()

    def check(case: Case) -> tuple[CaseStats | None, list[Problem]]:
        return check_case(case, catalog, full=full, channels=channels, num_classes=num_classes)

    # Threads overlap the decompression of .nii.gz files (zlib releases the GIL).
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for done, (stats, problems) in enumerate(pool.map(check, cases), start=1):
            if stats is not None:
                result.stats[stats.case_id] = stats
            result.problems.extend(problems)
            if progress is not None:
                progress(done, len(cases))
    return result


def check_case(
    case: Case, catalog: Catalog, *, full: bool = True, channels: int | None = None, num_classes: int | None = None
) -> tuple[CaseStats | None, list[Problem]]:
    problems: list[Problem] = []

    def problem(path: str, message: str) -> tuple[None, list[Problem]]:
        problems.append(Problem(path, message, case.case_id))
        return None, problems

    image_path = case.files[0] if case.files else f"<{catalog.source}:{case.case_id}>"
    try:
        image = _read_image(case, catalog.spatial_dims, full)
    except _Unreadable as err:
        return problem(err.path, err.message)
    if len(image.shape) != catalog.spatial_dims + 1:
        return problem(image_path, f"has {len(image.shape) - 1} spatial dimensions, expected {catalog.spatial_dims}")
    if channels is not None and image.shape[0] != channels:
        problem(image_path, f"has {image.shape[0]} channel(s) but model.in_channels is {channels}")
    stats = CaseStats(case.case_id, image.shape, image.spacing)
    if image.array is not None:
        finite = np.isfinite(image.array)
        if not finite.all():
            bad = int(finite.size - finite.sum())
            problem(image_path, f"has {bad} NaN/Inf intensity value(s)")
        values = image.array[finite]
        if values.size:
            stats.minimum, stats.maximum = float(values.min()), float(values.max())
            stats.mean, stats.std = float(values.mean()), float(values.std())
    if case.findings is not None:
        findings = np.asarray(case.findings)
        if findings.shape != (len(catalog.findings),) or not np.isin(findings, (0, 1)).all():
            problem(image_path, f"findings must be {len(catalog.findings)} values of 0 or 1, got {findings.tolist()}")
    if case.label is not None:
        stats.label_values = _check_label(case, image, catalog.spatial_dims, full, num_classes, problems)
    return stats, problems


class _Unreadable(Exception):
    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path, self.message = path, message


def _read_image(case: Case, spatial_dims: int, full: bool) -> _Image:
    if case.in_memory:
        array = np.asarray(case.image)
        return _Image(array, array.shape, None, None)
    parts = [_read_file(path, spatial_dims, full) for path in case.image_files]
    first = parts[0]
    for path, part in zip(case.image_files[1:], parts[1:]):
        if part.shape[1:] != first.shape[1:]:
            raise _Unreadable(path, f"channel file has shape {list(part.shape[1:])}, unlike {list(first.shape[1:])} of {case.files[0]}")
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    array = np.concatenate([p.array for p in parts]) if full else None
    return _Image(array, shape, first.spacing, first.affine)


def read_problem(path: str, spatial_dims: int) -> str | None:
    """What is wrong with one image or label file when read to the last voxel, or None."""
    try:
        _read_file(path, spatial_dims, full=True)
    except _Unreadable as err:
        return err.message
    return None


def _read_file(path: str, spatial_dims: int, full: bool) -> _Image:
    if os.path.isdir(path):  # a DICOM series: one folder, one volume
        return _read_series(path, full)
    if is_nifti(path):
        return _read_nifti(path, spatial_dims, full)
    return _read_picture(path, full)


def _read_series(path: str, full: bool) -> _Image:
    from fedmae.data.dicom import SeriesError, read_series

    try:
        series = read_series(path, full=full)
    except SeriesError as err:  # names the file at fault, or the folder
        raise _Unreadable(err.path, err.reason) from None
    spacing = tuple(round(s, 4) for s in series.spacing)
    return _Image(series.array, series.shape, spacing, series.affine)


def _read_nifti(path: str, spatial_dims: int, full: bool) -> _Image:
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.shape)
        array = np.asanyarray(img.dataobj, dtype=np.float32) if full else None
    except FileNotFoundError:
        raise _Unreadable(path, "file not found") from None
    except (*READ_ERRORS, nib.filebasedimages.ImageFileError) as err:
        raise _Unreadable(path, f"cannot be read as NIfTI ({_reason(err)}); the file is damaged or not NIfTI") from None
    if len(shape) == spatial_dims:  # no channel axis
        channel_shape = (1, *shape)
        array = None if array is None else array[None]
    elif len(shape) == spatial_dims + 1:  # channels last, as in MSD's 4-D BraTS volumes
        channel_shape = (shape[-1], *shape[:-1])
        array = None if array is None else np.moveaxis(array, -1, 0)
    else:
        raise _Unreadable(path, f"has shape {list(shape)}; expected {spatial_dims} spatial axes and optionally channels last")
    spacing = tuple(round(float(z), 4) for z in img.header.get_zooms()[:spatial_dims])
    return _Image(array, channel_shape, spacing, img.affine)


def _read_picture(path: str, full: bool) -> _Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            size = picture.size
            # Radiographs are grey; colour or alpha channels are converted to grey when loaded.
            array = np.asarray(picture.convert("F"), dtype=np.float32)[None] if full else None
    except FileNotFoundError:
        raise _Unreadable(path, "file not found") from None
    except (*READ_ERRORS, UnidentifiedImageError) as err:
        raise _Unreadable(path, f"cannot be read as an image ({_reason(err)}); the file is damaged or truncated") from None
    return _Image(array, (1, size[1], size[0]), None, None)


def _check_label(
    case: Case, image: _Image, spatial_dims: int, full: bool, num_classes: int | None, problems: list[Problem]
) -> tuple[int, ...] | None:
    in_memory = not isinstance(case.label, str)
    path = f"<label of {case.case_id}>" if in_memory else case.label

    def problem(message: str) -> None:
        problems.append(Problem(path, message, case.case_id))

    if in_memory:
        label = _Image(np.asarray(case.label)[None], (1, *np.shape(case.label)), None, None)
    else:
        try:
            label = _read_file(path, spatial_dims, full)
        except _Unreadable as err:
            problem(err.message)
            return None
    if label.shape[0] != 1:
        problem(f"label map has {label.shape[0]} channels; expected one map of class values")
        return None
    if label.shape[1:] != image.shape[1:]:
        problem(f"label shape {list(label.shape[1:])} does not match image shape {list(image.shape[1:])}")
        return None
    if label.affine is not None and image.affine is not None:
        gap = float(np.abs(label.affine - image.affine).max())
        if gap > AFFINE_TOLERANCE:
            problem(f"label affine differs from the image's by up to {gap:.3g} mm (not on the same voxel grid)")
    if label.array is None:
        return None
    values = label.array[np.isfinite(label.array)]
    if values.size != label.array.size:
        problem("label map has NaN/Inf values")
    if not np.array_equal(values, np.round(values)):
        problem("label map has non-integer values")
    found = tuple(int(v) for v in np.unique(np.round(values)))
    if num_classes is not None:
        outside = [v for v in found if not 0 <= v < num_classes]
        if outside:
            problem(f"label values {outside} are outside the declared classes 0..{num_classes - 1}")
    return found


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."
