"""DICOM series as a data source: one series per case, read into a volume with its RAS affine.

Layout (as ``nifti_folder``, with a folder per series where that has a file per volume)::

    root/images/<case>/...        one series per folder, any depth (images/patient7/ct/)
    root/labels/<case>.nii.gz     optional label map on the series' voxel grid (labels/patient7/ct.nii.gz)

or one sub-folder per site, each with its own ``images/`` (and ``labels/``). A case's id is its
series folder below ``images/``; its patient is the series' PatientID (0010,0020).

A series is read as dcm2niix, ITK and nibabel's DICOM notes do: the files are the folder's DICOM
files (a ``.dcm`` name or the DICM marker at byte 128; DICOMDIR is an index, not an image), all of
one SeriesInstanceUID, sorted by ImagePositionPatient along the slice normal (row x column
direction, ascending), never by InstanceNumber or file name. Voxel ``(i, j, k)`` is column ``i``,
row ``j`` of slice ``k``; the affine maps it to RAS millimetres like a NIfTI file's, so the
preprocessing (orientation, resampling) treats a series and a NIfTI file of the same scan alike.
RescaleSlope and RescaleIntercept are applied per slice (CT comes out in Hounsfield units).

Everything that makes a folder unusable as one volume (an unreadable file, several series in one
folder, missing or unevenly spaced slices, slices of different sizes, orientations or pixel
spacings) is a :class:`SeriesError` naming the file or folder: the checks report it as one line
(:mod:`fedmae.data.checks`), and :class:`DicomSeriesReader` gives MONAI's ``LoadImage`` the same
volume the checks passed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader
from monai.transforms import LoadImage, MapTransform
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from fedmae.data.catalog import Case, Catalog, DataError, Modality, Problem, is_nifti, nifti_stem

DICOM_SUFFIXES = (".dcm", ".dicom")
# (0008,0060) Modality -> fedmae's modality (its preprocessing); any other is "other".
MODALITIES: dict[str, Modality] = {"CT": "ct", "MR": "mri"}
GEOMETRY_TOLERANCE = 1e-4  # direction cosines and pixel spacings (mm) that agree to this are the same
POSITION_TOLERANCE = 0.01  # mm, or 1 % of the slice spacing if larger: slice positions agree to this
INSTALL_HINT = "reading DICOM needs pydicom: pip install fedmae[dicom]"


class SeriesError(DataError):
    """A folder that cannot be read as one volume: the file (or folder) at fault and why, one line."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable from loader workers
        return type(self), (self.path, self.reason)


@dataclass
class Series:
    """One DICOM series as a volume."""

    folder: str
    files: tuple[str, ...]  # in slice order
    shape: tuple[int, int, int, int]  # (1, X, Y, Z): columns, rows, slices
    affine: np.ndarray  # (4, 4) voxel -> RAS mm
    spacing: tuple[float, float, float]  # mm per voxel along X, Y, Z
    array: np.ndarray | None  # (1, X, Y, Z) float32, rescaled; None when only headers were read
    series_uid: str
    modality: str  # the DICOM Modality, e.g. CT
    patient: str  # PatientID ("" when absent)


def pydicom_module() -> Any:
    """pydicom, or a :class:`DataError` saying how to install it."""
    try:
        import pydicom
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    return pydicom


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM file by its name (.dcm) or its DICM marker. Hidden files (macOS' ._ forks) and the
    DICOMDIR index are not images; an unreadable file named .dcm is, so the checks report it."""
    path = Path(path)
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def series_files(folder: str | Path) -> list[str]:
    """The DICOM files directly in ``folder``, by name (the order of slices comes from their positions)."""
    return [str(p) for p in sorted(Path(folder).iterdir()) if is_dicom_file(p)]


# ---------------------------------------------------------------------------------------------
# one series -> one volume


@dataclass
class _Slice:
    path: str
    series_uid: str
    size: tuple[int, int]  # (rows, columns)
    orientation: np.ndarray  # (6,) row direction, then column direction (LPS)
    position: np.ndarray  # (3,) ImagePositionPatient (LPS mm)
    pixel_spacing: np.ndarray  # (2,) between rows, between columns (mm)
    slice_spacing: float | None  # SpacingBetweenSlices or SliceThickness (a one-slice series needs it)
    modality: str
    patient: str
    pixels: np.ndarray | None  # (columns, rows) float32, rescaled


def read_series(folder: str | Path, full: bool = True) -> Series:
    """The volume in ``folder`` (``full=False``: geometry from the headers only, no pixel data)."""
    pydicom = pydicom_module()
    folder = str(folder)
    if not os.path.isdir(folder):
        raise SeriesError(folder, "folder not found")
    files = series_files(folder)
    if not files:
        raise SeriesError(folder, "holds no DICOM files (.dcm names or files with the DICM marker)")
    slices = [_read_slice(pydicom, path, full) for path in files]
    _check_one_series(folder, slices)
    _check_same_grid(slices)
    slices, step = _stack_order(folder, slices)
    first = slices[0]
    row_dir, column_dir = first.orientation[:3], first.orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = row_dir * first.pixel_spacing[1]  # i: along a row, one column to the next
    lps[:3, 1] = column_dir * first.pixel_spacing[0]  # j: down a column, one row to the next
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> RAS, as NIfTI stores it
    rows, columns = first.size
    array = None
    if full:
        array = np.stack([s.pixels for s in slices], axis=-1)[None]  # (1, X, Y, Z)
    spacing = tuple(float(np.linalg.norm(affine[:3, axis])) for axis in range(3))
    return Series(folder, tuple(s.path for s in slices), (1, columns, rows, len(slices)), affine,
                  spacing, array, first.series_uid, first.modality, first.patient)  # type: ignore[arg-type]


def _read_slice(pydicom: Any, path: str, full: bool) -> _Slice:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not full)
    except FileNotFoundError:
        raise SeriesError(path, "file not found") from None
    except Exception as err:  # noqa: BLE001 - pydicom fails on damaged files with many error types
        raise SeriesError(path, f"cannot be read as DICOM ({_reason(err)}); the file is damaged or not DICOM") from None
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
        raise SeriesError(path, "has no SeriesInstanceUID (0020,000E); it cannot be told apart from other series")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SeriesError(path, f"is a multi-frame image ({frames} frames); only series of single-frame slices "
                                "are read")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise SeriesError(path, f"has {samples} samples per pixel (colour); a series of grey slices is expected")
    position = _numbers(ds, "ImagePositionPatient", "(0020,0032)", 3, path)
    orientation = _numbers(ds, "ImageOrientationPatient", "(0020,0037)", 6, path)
    pixel_spacing = _numbers(ds, "PixelSpacing", "(0028,0030)", 2, path)
    if (pixel_spacing <= 0).any():
        raise SeriesError(path, f"has PixelSpacing {pixel_spacing.tolist()}; spacings must be positive")
    for name, axis in (("row", orientation[:3]), ("column", orientation[3:])):
        if abs(np.linalg.norm(axis) - 1) > 1e-3:
            raise SeriesError(path, f"ImageOrientationPatient's {name} direction {axis.tolist()} is not a unit vector")
    size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    if min(size) < 1:
        raise SeriesError(path, "has no Rows / Columns (0028,0010-0011); the image size is unknown")
    thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    pixels = None
    if full:
        try:
            stored = ds.pixel_array
        except Exception as err:  # noqa: BLE001 - decoding errors come from many libraries
            raise SeriesError(path, f"pixel data cannot be decoded ({_reason(err)}); the file is damaged, or "
                                    "compressed in a form pydicom cannot decode without a plugin") from None
        if stored.shape != size:
            raise SeriesError(path, f"pixel data has shape {list(stored.shape)}, not Rows x Columns {list(size)}")
        slope = float(ds.get("RescaleSlope", 1) or 1)  # an empty or zero slope is a missing one
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        pixels = (stored.astype(np.float64) * slope + intercept).astype(np.float32).T  # (columns, rows)
    return _Slice(path, uid, size, orientation, position, pixel_spacing, float(thickness) if thickness else None,
                  str(ds.get("Modality", "") or ""), str(ds.get("PatientID", "") or "").strip(), pixels)


def _numbers(ds: Any, keyword: str, tag: str, count: int, path: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        numbers = np.array([float(v) for v in ensure_tuple(value)], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or numbers.shape != (count,) or not np.isfinite(numbers).all():
        what = "no" if value is None or value == "" else f"an invalid ({value!r})"
        raise SeriesError(path, f"has {what} {keyword} {tag}; the slices' geometry needs it")
    return numbers


def _check_one_series(folder: str, slices: list[_Slice]) -> None:
    counts = Counter(s.series_uid for s in slices)
    if len(counts) > 1:
        listed = ", ".join(f"{uid} ({n} file{'s' * (n > 1)})" for uid, n in counts.most_common(3))
        more = f" and {len(counts) - 3} more" if len(counts) > 3 else ""
        raise SeriesError(folder, f"holds {len(counts)} series: {listed}{more}; put each series in a folder of its own")


def _check_same_grid(slices: list[_Slice]) -> None:
    # Compared with the grid most slices share, so the message names the odd one out.
    def grid(s: _Slice) -> tuple:
        return s.size, tuple(np.round(s.orientation, 4)), tuple(np.round(s.pixel_spacing, 4))

    common = Counter(grid(s) for s in slices).most_common(1)[0][0]
    ref = next(s for s in slices if grid(s) == common)
    name = Path(ref.path).name
    for s in slices:
        if s.size != ref.size:
            raise SeriesError(s.path, f"is {s.size[1]} x {s.size[0]} pixels, unlike {ref.size[1]} x {ref.size[0]} "
                                      f"of {name}; the slices of a series must share one size")
        if np.abs(s.orientation - ref.orientation).max() > GEOMETRY_TOLERANCE:
            raise SeriesError(s.path, f"is oriented {_fmt(s.orientation)}, unlike {_fmt(ref.orientation)} of {name} "
                                      "(ImageOrientationPatient); the slices of a series must be parallel")
        if np.abs(s.pixel_spacing - ref.pixel_spacing).max() > GEOMETRY_TOLERANCE:
            raise SeriesError(s.path, f"has pixel spacing {_fmt(s.pixel_spacing)} mm, unlike "
                                      f"{_fmt(ref.pixel_spacing)} of {name}")


def _stack_order(folder: str, slices: list[_Slice]) -> tuple[list[_Slice], np.ndarray]:
    """The slices sorted along the normal, and the step from one slice to the next (LPS mm)."""
    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    where = np.array([s.position @ normal for s in slices])
    order = np.argsort(where, kind="stable")
    slices, where = [slices[i] for i in order], where[order]
    if len(slices) == 1:
        return slices, normal * (slices[0].slice_spacing or 1.0)
    gaps = np.diff(where)
    if gaps.min() < POSITION_TOLERANCE:
        k = int(gaps.argmin())
        raise SeriesError(slices[k + 1].path, f"lies at the same position as {Path(slices[k].path).name} "
                                              f"({where[k]:.6g} mm along the slice normal): a repeated slice or two "
                                              "acquisitions in one series")
    spacing = float(np.median(gaps))
    tolerance = max(POSITION_TOLERANCE, 0.01 * spacing)
    for k, gap in enumerate(gaps):
        skipped = round(gap / spacing) - 1
        if skipped >= 1 and abs(gap - (skipped + 1) * spacing) <= tolerance * (skipped + 1):
            raise SeriesError(folder, f"{skipped} slice(s) missing between {Path(slices[k].path).name} and "
                                      f"{Path(slices[k + 1].path).name}: {gap:.4g} mm apart where the others are "
                                      f"{spacing:.4g} mm")
    if np.abs(gaps - spacing).max() > tolerance:
        k = int(np.abs(gaps - spacing).argmax())
        raise SeriesError(folder, f"slices are unevenly spaced: {gaps.min():.4g} to {gaps.max():.4g} mm apart "
                                  f"along the normal ({Path(slices[k].path).name} to {Path(slices[k + 1].path).name}: "
                                  f"{gaps[k]:.4g} mm); a volume needs one slice spacing")
    positions = np.stack([s.position for s in slices])
    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    # Equal gaps along the normal, but a slice may still be shifted in its own plane.
    off = np.linalg.norm(positions - (positions[0] + np.arange(len(slices))[:, None] * step), axis=1)
    if off.max() > tolerance:
        k = int(off.argmax())
        raise SeriesError(slices[k].path, f"is shifted {off[k]:.4g} mm in its plane from the line through the other "
                                          "slices' positions; the slices do not stack into one volume")
    return slices, step


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# ---------------------------------------------------------------------------------------------
# MONAI: a series folder wherever an image file can stand


class DicomSeriesReader(ImageReader):
    """MONAI image reader of DICOM series folders through :func:`read_series`; several folders
    are stacked as channels. ``LoadImage(reader=DicomSeriesReader())`` loads a folder as a
    channel-first volume with its RAS affine, like a NIfTI file."""

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(Path(f).is_dir() for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs: Any) -> list[str]:
        # Decoding waits for get_data: LoadImage hands a folder whose read() failed to its other
        # readers, and MONAI's own DICOM reader (sorting by InstanceNumber) would then load it.
        folders = [str(f) for f in ensure_tuple(data)]
        for folder in folders:
            if not Path(folder).is_dir():
                raise SeriesError(folder, "not a folder of DICOM files")
        return folders

    def get_data(self, img: list[str]) -> tuple[np.ndarray, dict]:
        volumes = [read_series(folder) for folder in img]
        first = volumes[0]
        for volume in volumes[1:]:
            if volume.shape[1:] != first.shape[1:] or np.abs(volume.affine - first.affine).max() > 1e-3:
                raise SeriesError(volume.folder, f"channel series of shape {list(volume.shape[1:])} is not on the "
                                                 f"voxel grid of {first.folder} ({list(first.shape[1:])})")
        array = np.concatenate([v.array for v in volumes])  # (C, X, Y, Z)
        meta = {
            MetaKeys.AFFINE: first.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: first.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(first.shape[1:]),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
        }
        return array, meta


class LoadImageOrSeriesd(MapTransform):
    """MONAI's ``LoadImaged(image_only=True, ensure_channel_first=True)``, except that a folder
    (or a list of folders) is read as a DICOM series by :class:`DicomSeriesReader`."""

    def __init__(self, keys: str | Sequence[str], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        with _no_nvimgcodec_notices():
            self.loader = LoadImage(image_only=True, ensure_channel_first=True)
        self.series_reader = DicomSeriesReader()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            folders = isinstance(d[key], (str, os.PathLike, tuple, list)) and self.series_reader.verify_suffix(d[key])
            # Given at call time, the series reader is the only one tried: no fallback to another.
            d[key] = self.loader(d[key], reader=self.series_reader if folders else None)
        return d


@contextlib.contextmanager
def _no_nvimgcodec_notices() -> Iterator[None]:
    """Quiet while MONAI's default readers are built: with pydicom installed they include one for
    NVIDIA's nvImageCodec, which warns and logs when that optional GPU decoder is absent (every
    time); fedmae reads DICOM with its own reader and pydicom's decoders."""
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# the data source


def read_dicom_folder(root: str | Path, modality: Modality | str = "auto") -> Catalog:
    """The series under ``root/images`` (or ``root/<site>/images``) as cases. ``modality``: auto
    reads the series' Modality tag (CT -> ct, MR -> mri, others -> other)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (data.root should hold images/ with one folder per DICOM series)")
    pydicom = pydicom_module()
    problems: list[Problem] = []
    if (root / "images").is_dir():
        cases = _from_folders(root, "", problems)
    else:
        site_dirs = sorted(p for p in root.iterdir() if (p / "images").is_dir() and not p.name.startswith("."))
        if not site_dirs:
            raise DataError(f"{root}: no images/ folder (nor site folders with one); put one folder per DICOM series "
                            "under images/")
        cases = [case for d in site_dirs for case in _from_folders(d, d.name, problems)]
    cases, modalities = _with_headers(pydicom, cases, problems)
    return Catalog(source="dicom", root=str(root), modality=_modality(root, modality, modalities), spatial_dims=3,
                   cases=cases, problems=problems)


def is_series_layout(root: str | Path) -> bool:
    """Whether a folder with ``images/`` (its own or its sites') holds series folders rather than
    NIfTI files: for ``fedmae data inspect PATH``."""
    root = Path(root)
    images = [root / "images"] if (root / "images").is_dir() else [
        p / "images" for p in sorted(root.iterdir()) if (p / "images").is_dir()]
    for folder in images:
        entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
        if any(is_nifti(e.name) for e in entries):
            return False
        if any(e.is_dir() for e in entries):
            return True
    return False


def _from_folders(folder: Path, site: str, problems: list[Problem]) -> list[Case]:
    images = folder / "images"
    labels = _label_maps(folder / "labels")
    cases, matched = [], set()
    for path, dirs, files in os.walk(images):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if not any(is_dicom_file(Path(path) / name) for name in sorted(files)):
            continue
        series_id = Path(path).relative_to(images).as_posix()
        if series_id == ".":
            problems.append(Problem(str(images), "holds DICOM files itself; put each series in a folder of its own "
                                                 "under images/"))
            continue
        label = labels.get(series_id)
        if label is not None:
            matched.add(series_id)
        cases.append(Case(case_id=_prefixed(site, series_id), image=path, label=str(label) if label else None,
                          site=site))
    for series_id, label in labels.items():
        if series_id not in matched:
            problems.append(Problem(str(label), f"label map has no series folder {series_id}/ in {images}",
                                    _prefixed(site, series_id)))
    if not cases:
        problems.append(Problem(str(images), "holds no folders of DICOM files"))
    return cases


def _label_maps(labels: Path) -> dict[str, Path]:
    """Label maps by the series folder they belong to: labels/a/b.nii.gz -> "a/b"."""
    if not labels.is_dir():
        return {}
    found = {}
    for path, dirs, files in os.walk(labels):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if is_nifti(name) and not name.startswith("."):
                relative = (Path(path) / name).relative_to(labels)
                found[(relative.parent / nifti_stem(name)).as_posix()] = Path(path) / name
    return found


def _prefixed(site: str, case_id: str) -> str:
    # Site folders may reuse series folder names; the case id must stay unique across sites.
    return f"{site}/{case_id}" if site else case_id


def _with_headers(pydicom: Any, cases: list[Case], problems: list[Problem]) -> tuple[list[Case], list[str]]:
    """Each case's patient from its first file's header, one case per series, and the modalities
    found. A header that cannot be read is left to the checks, which read every file."""
    kept, modalities, seen = [], [], {}
    for case in cases:
        first = series_files(case.image)[0]
        try:
            ds = pydicom.dcmread(first, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "PatientID", "Modality"])
        except Exception:  # noqa: BLE001 - reported with its reason by the checks
            kept.append(case)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid and uid in seen:
            problems.append(Problem(str(case.image), f"holds the same series ({uid}) as {seen[uid]}; remove the copy",
                                    case.case_id))
            continue
        seen[uid] = case.image
        patient = str(ds.get("PatientID", "") or "").strip()
        # Patient IDs of different hospitals are not one namespace.
        case.patient = _prefixed(case.site, patient) if patient else ""
        modalities.append(str(ds.get("Modality", "") or ""))
        kept.append(case)
    return kept, modalities


def _modality(root: Path, modality: str, found: list[str]) -> Modality:
    if modality != "auto":
        return modality  # type: ignore[return-value]
    kinds = {MODALITIES.get(m.upper(), "other") for m in found}
    if len(kinds) > 1:
        counts = ", ".join(f"{n} {m or 'unnamed'}" for m, n in sorted(Counter(found).items()))
        raise DataError(f"{root}: holds series of several modalities ({counts}); set data.modality (ct, mri or "
                        "other) or keep one modality per data set")
    return kinds.pop() if kinds else "other"
