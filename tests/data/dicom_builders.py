"""DICOM series written with pydicom, never through fedmae: a reader bug cannot hide behind a
builder with the same bug.

A series is written from a volume and the affine a NIfTI file of it has (voxel -> RAS mm), with
the geometry a scanner would store: ImageOrientationPatient and PixelSpacing from the affine's
first two columns, ImagePositionPatient of slice k from its origin plus k times its third column,
all in DICOM's LPS. File names and InstanceNumbers are shuffled, so only a reader that sorts by
position gets the volume right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def slice_geometry(affine: np.ndarray, k: int) -> dict[str, list[str]]:
    """The DICOM geometry of slice ``k`` of a volume with this RAS affine."""
    lps = LPS @ np.asarray(affine, dtype=np.float64)
    along_row, down_column = lps[:3, 0], lps[:3, 1]  # voxel axis 0 = columns, axis 1 = rows
    position = lps[:3, 3] + k * lps[:3, 2]
    return {
        "ImageOrientationPatient": [_ds(v) for v in (*(along_row / np.linalg.norm(along_row)),
                                                    *(down_column / np.linalg.norm(down_column)))],
        "PixelSpacing": [_ds(np.linalg.norm(down_column)), _ds(np.linalg.norm(along_row))],  # rows, columns
        "ImagePositionPatient": [_ds(v) for v in position],
    }


def write_series(
    folder: Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str = "CT",
    patient: str = "P001",
    series_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    suffix: str = "",
    seed: int = 0,
) -> list[Path]:
    """One file per slice ``volume[:, :, k]`` (columns x rows), in ``folder``; returns the paths in
    slice order. Values are stored as int16 ``(value - intercept) / slope``. Files are named
    ``IM<random number><suffix>`` (no suffix: found by their DICM marker) and their InstanceNumbers
    are shuffled too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume)
    depth = volume.shape[2]
    rng = np.random.default_rng(seed)
    names, numbers = rng.permutation(depth), rng.permutation(depth) + 1
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    paths = []
    for k in range(depth):
        stored = np.round((volume[:, :, k].T.astype(np.float64) - intercept) / slope)
        if stored.min() < -32768 or stored.max() > 32767:
            raise ValueError("values do not fit int16 with this slope and intercept")
        path = folder / f"IM{names[k]:04d}{suffix}"
        ds = new_slice(path, modality)
        ds.PatientID, ds.PatientName = patient, f"Test^{patient}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, int(numbers[k])
        for keyword, value in slice_geometry(affine, k).items():
            setattr(ds, keyword, value)
        ds.SliceThickness = _ds(np.linalg.norm(affine[:3, 2]))
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.set_pixel_data(stored.astype(np.int16), "MONOCHROME2", 16, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def new_slice(path: Path, modality: str = "CT") -> FileDataset:
    """An empty CT (or MR) Image Storage instance with fresh UIDs, to be filled and saved at ``path``."""
    sop_class = MRImageStorage if modality == "MR" else CTImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def edit_slice(path: Path, pixels: np.ndarray | None = None, **values: object) -> None:
    """Rewrite one file with some elements changed (a value of None deletes the element) and,
    with ``pixels`` ((rows, columns) int16, or (frames, rows, columns)), other pixel data."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if pixels is not None:
        ds.set_pixel_data(np.asarray(pixels, dtype=np.int16), "MONOCHROME2", 16, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def position(path: Path) -> np.ndarray:
    """A file's ImagePositionPatient (LPS mm)."""
    return np.array([float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient])


def as_ds(values: Sequence[float]) -> list[str]:
    """Numbers as DICOM decimal strings."""
    return [_ds(v) for v in values]


def stack_copies(source: str | Path, folder: Path, count: int,
                 instance_numbers: Sequence[int] | None = None) -> list[Path]:
    """A series of ``count`` copies of one real slice, moved by its SliceThickness along its normal:
    a volume with a real file's pixels, encoding and tags. Returns the paths in slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for k in range(count):
        ds = pydicom.dcmread(source)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        position = np.array([float(v) for v in ds.ImagePositionPatient]) + k * float(ds.SliceThickness) * normal
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = instance_numbers[k] if instance_numbers is not None else k + 1
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
