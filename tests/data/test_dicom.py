"""Tests of the DICOM source (fedmae.data.dicom): series written with pydicom by
tests/data/dicom_builders.py, and real slices pydicom ships (never downloaded)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import PydicomReader
from monai.transforms import Compose, LoadImage
from pydicom.data import get_testdata_file

from fedmae.data.badfiles import diagnose
from fedmae.data.catalog import DataError
from fedmae.data.checks import scan
from fedmae.data.dicom import (
    DicomSeriesReader,
    LoadImageOrSeriesd,
    SeriesError,
    is_dicom_file,
    read_dicom_folder,
    read_series,
)
from fedmae.data.preprocess import load_steps, resolve_preprocessing
from fedmae.data.sources import detect_source, read_catalog
from tests.command_line import fedmae
from tests.data.builders import _ct_volume, write_nifti
from tests.data.dicom_builders import as_ds, edit_slice, position, stack_copies, write_series
from tests.test_cli_data import BUDGET, run_pretrain_and_finetune
from tests.tiny import tiny_config, tiny_raw

SHAPE = (12, 10, 6)  # columns, rows, slices: distinct, so a transposed volume would show
CLASSES = ["background", "liver", "spleen"]


def _affine(spacing, rotation=np.eye(3), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _rotation(about_z: float, about_x: float) -> np.ndarray:
    z, x = np.radians(about_z), np.radians(about_x)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


AFFINES = {
    # as DICOM converters store scans: x and y flipped (LPS-like), slices upwards
    "scanner": _affine((-2.0, -2.0, 3.0), origin=(100.0, 120.0, -50.0)),
    # a tilted plane; spacings whose resampling ratios (to 1.5 x 1.5 x 2 mm) never land on half voxels
    "oblique": _affine((0.9, 0.7, 2.0), _rotation(25, 12), origin=(-30.0, 45.0, 12.5)),
    # slices stored against the row x column normal (a left-handed voxel grid)
    "reversed": _affine((0.9, 0.7, -2.0), origin=(10.0, -20.0, 40.0)),
}


def _ct(shape=SHAPE, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, label uint8) of an abdomen-like phantom."""
    return _ct_volume(shape, np.random.default_rng(seed))


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.load(write_nifti(path, data, affine))


# ---------------------------------------------------------------- one series -> one volume


@pytest.mark.parametrize("name", ["scanner", "oblique"])
def test_series_reads_as_the_same_volume_and_affine_as_its_nifti(tmp_path, name):
    hu, _ = _ct()
    nifti = _nifti(tmp_path / "ct.nii.gz", hu, AFFINES[name])
    written = write_series(tmp_path / "series", hu, nifti.affine)  # from the affine as NIfTI stores it
    series = read_series(tmp_path / "series")
    assert series.shape == (1, *SHAPE)
    np.testing.assert_array_equal(series.array[0], np.asarray(nifti.dataobj, dtype=np.float32))
    np.testing.assert_allclose(series.affine, nifti.affine, atol=1e-4)
    assert series.spacing == pytest.approx(nifti.header.get_zooms(), abs=1e-4)
    # Sorted by position: the file names and the InstanceNumbers are shuffled.
    assert series.files == tuple(map(str, written))
    assert (series.modality, series.patient) == ("CT", "P001")


def test_slices_stack_upwards_along_the_normal_whatever_order_a_nifti_stores(tmp_path):
    hu, _ = _ct()
    affine = AFFINES["reversed"]
    write_series(tmp_path / "series", hu, affine)
    series = read_series(tmp_path / "series")
    depth = SHAPE[2]
    np.testing.assert_array_equal(series.array[0], hu[:, :, ::-1])
    for i, j, k in [(0, 0, 0), (3, 2, 5), (11, 9, 1)]:  # the same voxel, the same point in space
        np.testing.assert_allclose(series.affine @ [i, j, depth - 1 - k, 1], affine @ [i, j, k, 1], atol=1e-4)


def test_rescale_slope_and_intercept_are_applied_per_slice(tmp_path):
    hu, _ = _ct()
    paths = write_series(tmp_path / "series", hu, AFFINES["scanner"], slope=0.5, intercept=-1000.0)
    edit_slice(paths[2], RescaleIntercept="-1010")  # same stored values, another intercept
    volume = read_series(tmp_path / "series").array[0]
    expected = hu.astype(np.float32)
    expected[:, :, 2] -= 10
    np.testing.assert_array_equal(volume, expected)


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI's optional GPU decoder is absent
def test_real_ct_slices_read_as_monais_pydicom_reader_reads_them(tmp_path):
    source = get_testdata_file("CT_small.dcm", download=False)  # shipped inside pydicom
    stack_copies(source, tmp_path / "ordered", 4)
    stack_copies(source, tmp_path / "shuffled", 4, instance_numbers=[3, 1, 4, 2])
    # MONAI's reader sorts by InstanceNumber, so it is right only where those follow the positions.
    theirs = LoadImage(reader=PydicomReader(), image_only=True)(str(tmp_path / "ordered"))
    ds = pydicom.dcmread(source)
    hu = ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    for folder in ("ordered", "shuffled"):
        ours = read_series(tmp_path / folder)
        np.testing.assert_allclose(ours.array[0], theirs.numpy(), atol=1e-3)
        np.testing.assert_allclose(ours.affine, theirs.affine.numpy(), atol=1e-4)
        np.testing.assert_allclose(ours.array[0, :, :, 0], hu, atol=1e-3)  # Hounsfield units, not stored values


def test_a_single_slice_is_a_volume_as_thick_as_the_slice(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), folder / "CT_small.dcm")
    series = read_series(folder)
    assert series.shape == (1, 128, 128, 1)
    assert series.spacing == pytest.approx((0.661468, 0.661468, 5.0))  # SliceThickness: no neighbour to measure


def test_dicomdir_hidden_and_other_files_are_not_slices(tmp_path):
    hu, _ = _ct()
    write_series(tmp_path / "series", hu, AFFINES["scanner"])
    shutil.copy(get_testdata_file("DICOMDIR", download=False), tmp_path / "series" / "DICOMDIR")
    shutil.copy(tmp_path / "series" / "IM0000", tmp_path / "series" / "._IM0000")  # a macOS resource fork
    (tmp_path / "series" / "notes.txt").write_text("scanned on a Tuesday")
    assert not any(is_dicom_file(tmp_path / "series" / n) for n in ("DICOMDIR", "._IM0000", "notes.txt"))
    assert read_series(tmp_path / "series").shape == (1, *SHAPE)


# ---------------------------------------------------------------- the same scan as NIfTI and as DICOM


@pytest.mark.parametrize("name", ["scanner", "oblique", "reversed"])
def test_series_and_nifti_of_one_scan_give_the_same_training_tensors(tmp_path, name):
    hu, label = _ct((16, 14, 8))
    image = _nifti(tmp_path / "nifti/images/case.nii.gz", hu, AFFINES[name])
    write_nifti(tmp_path / "nifti/labels/case.nii.gz", label, image.affine)
    write_series(tmp_path / "dicom/images/case", hu, image.affine)
    write_nifti(tmp_path / "dicom/labels/case.nii.gz", label, image.affine)
    items = []
    for source, root in (("nifti_folder", tmp_path / "nifti"), ("dicom", tmp_path / "dicom")):
        cfg = tiny_config(3, "segmentation", data={"source": source, "root": str(root), "modality": "ct",
                                                   "num_sites": 1},
                          task={"class_names": CLASSES})
        catalog = read_catalog(cfg)
        prep = resolve_preprocessing(cfg, catalog)
        assert prep.spacing == (1.5, 1.5, 2.0) and prep.crop_foreground  # CT: resampled, windowed, cropped
        case = catalog.cases[0]
        items.append(Compose(load_steps(["image", "label"], prep))({"image": case.image, "label": case.label}))
    nifti, dicom = items
    assert nifti["image"].shape == dicom["image"].shape
    torch.testing.assert_close(dicom["image"], nifti["image"], atol=1e-4, rtol=0)
    assert torch.equal(dicom["label"], nifti["label"])


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_series_reader_loads_folders_for_monai_with_their_affine(tmp_path):
    hu, _ = _ct()
    image = _nifti(tmp_path / "ct.nii.gz", hu, AFFINES["oblique"])
    write_series(tmp_path / "a", hu, image.affine)
    write_series(tmp_path / "b", hu + 1, image.affine)
    loaded = LoadImage(image_only=True, ensure_channel_first=True)(str(tmp_path / "a"), reader=DicomSeriesReader())
    assert loaded.shape == (1, *SHAPE)
    np.testing.assert_allclose(loaded.affine.numpy(), image.affine, atol=1e-4)
    both = LoadImageOrSeriesd(keys="image")({"image": (str(tmp_path / "a"), str(tmp_path / "b"))})["image"]
    assert both.shape == (2, *SHAPE)  # one series per channel
    torch.testing.assert_close(both[1] - both[0], torch.ones(SHAPE))


def test_a_series_that_breaks_after_the_checks_fails_with_the_checks_message(tmp_path):
    hu, _ = _ct()
    paths = write_series(tmp_path / "series", hu, AFFINES["scanner"])
    paths[3].unlink()
    # No fallback to MONAI's own DICOM reader, which would stack the remaining slices.
    with pytest.raises(SeriesError, match="1 slice.s. missing between"):
        LoadImageOrSeriesd(keys="image")({"image": str(tmp_path / "series")})
    error = diagnose({"image": str(tmp_path / "series")}, RuntimeError("deep in a transform"), 3)
    assert error.path == str(tmp_path / "series") and "1 slice(s) missing" in error.reason


# ---------------------------------------------------------------- the catalogue


def test_catalog_has_one_case_per_series_folder_and_labels_named_after_it(tmp_path):
    hu, label = _ct()
    affine = AFFINES["scanner"]
    write_series(tmp_path / "images/p1/ct", hu, affine, patient="P1")
    write_series(tmp_path / "images/p1/late", hu, affine, patient="P1")
    write_series(tmp_path / "images/p2", hu, affine, patient="P2")
    write_nifti(tmp_path / "labels/p1/ct.nii.gz", label, affine)
    write_nifti(tmp_path / "labels/p2.nii.gz", label, affine)
    write_nifti(tmp_path / "labels/p3.nii.gz", label, affine)  # no such series
    catalog = read_dicom_folder(tmp_path)
    assert (catalog.source, catalog.root, catalog.modality, catalog.spatial_dims) == ("dicom", str(tmp_path), "ct", 3)
    assert [c.case_id for c in catalog.cases] == ["p1/ct", "p1/late", "p2"]
    assert [c.image for c in catalog.cases] == [str(tmp_path / "images" / c) for c in ("p1/ct", "p1/late", "p2")]
    assert [c.label for c in catalog.cases] == [str(tmp_path / "labels/p1/ct.nii.gz"), None,
                                                str(tmp_path / "labels/p2.nii.gz")]
    assert [c.patient for c in catalog.cases] == ["P1", "P1", "P2"]  # a patient's series stay together
    assert [(p.path, p.case_id) for p in catalog.problems] == [(str(tmp_path / "labels/p3.nii.gz"), "p3")]
    assert "label map has no series folder p3/" in catalog.problems[0].message


def test_site_folders_are_sites_and_their_ids_stay_apart(tmp_path):
    hu, _ = _ct()
    for site in ("hospA", "hospB"):
        write_series(tmp_path / site / "images/s1", hu, AFFINES["scanner"], patient="P1")
    catalog = read_dicom_folder(tmp_path)
    assert [(c.case_id, c.site, c.patient) for c in catalog.cases] == [
        ("hospA/s1", "hospA", "hospA/P1"), ("hospB/s1", "hospB", "hospB/P1")]
    assert catalog.problems == []


def test_modality_comes_from_the_tags_unless_set(tmp_path):
    hu, _ = _ct()
    write_series(tmp_path / "mr/images/a", hu + 1024, AFFINES["scanner"], modality="MR", intercept=0.0)
    assert read_dicom_folder(tmp_path / "mr").modality == "mri"
    assert read_dicom_folder(tmp_path / "mr", "other").modality == "other"
    shutil.copytree(tmp_path / "mr/images/a", tmp_path / "mixed/images/mr")
    write_series(tmp_path / "mixed/images/ct", hu, AFFINES["scanner"])
    with pytest.raises(DataError, match=r"several modalities \(1 CT, 1 MR\); set data.modality"):
        read_dicom_folder(tmp_path / "mixed")
    assert read_dicom_folder(tmp_path / "mixed", "ct").modality == "ct"


def test_a_copied_series_is_a_problem_and_left_out(tmp_path):
    hu, _ = _ct()
    write_series(tmp_path / "images/a", hu, AFFINES["scanner"])
    shutil.copytree(tmp_path / "images/a", tmp_path / "images/b")
    catalog = read_dicom_folder(tmp_path)
    assert [c.case_id for c in catalog.cases] == ["a"]
    (problem,) = catalog.problems
    assert problem.case_id == "b" and "holds the same series" in problem.message
    assert str(tmp_path / "images/a") in problem.message


def test_layout_errors_name_what_to_fix(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not a folder"):
        read_dicom_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no images/ folder"):
        read_dicom_folder(tmp_path)
    hu, _ = _ct()
    write_series(tmp_path / "flat/images", hu, AFFINES["scanner"])  # slices directly in images/
    catalog = read_dicom_folder(tmp_path / "flat")
    assert catalog.cases == [] and [p.message for p in catalog.problems] == [
        "holds DICOM files itself; put each series in a folder of its own under images/",
        "holds no folders of DICOM files"]
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(DataError, match=r"pip install fedmae\[dicom\]"):
        read_dicom_folder(tmp_path / "flat")


def test_inspect_recognises_a_dicom_folder_and_reports_it(tmp_path):
    # Four series: enough for a train, validation and test split.
    written = [write_series(tmp_path / f"dicom/images/s{i}", _ct(seed=i)[0], AFFINES["scanner"], patient=f"P{i}")
               for i in range(4)]
    write_nifti(tmp_path / "nifti/images/a.nii.gz", _ct()[0], AFFINES["scanner"])
    assert (detect_source(tmp_path / "dicom"), detect_source(tmp_path / "nifti")) == ("dicom", "nifti_folder")
    result = fedmae("data", "inspect", str(tmp_path / "dicom"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(dicom, ct, 3D)" in result.stdout and "spacings (mm): (2.0, 2.0, 3.0) x4" in result.stdout
    assert f"shapes (C, *S): {(1, *SHAPE)} x4" in result.stdout and "no problems found" in result.stdout
    written[2][2].unlink()  # a slice in the middle of series s2
    broken = fedmae("data", "inspect", str(tmp_path / "dicom"), "--quick", cwd=tmp_path)
    assert broken.returncode == 1
    assert any(line.startswith(f"  {tmp_path / 'dicom/images/s2'}: 1 slice(s) missing between")
               for line in broken.stdout.splitlines()), broken.stdout


# ---------------------------------------------------------------- problems, one line each

SMALL = (6, 5, 5)
AXIAL = _affine((0.7, 0.7, 2.0))


def _shift(path: Path, by: tuple[float, float, float]) -> None:
    edit_slice(path, ImagePositionPatient=as_ds(position(path) + by))


# Each fault damages a clean series (its folder, its files in slice order) and returns the path
# its problem names; FAULTS: fault -> (its plant, the message's start, seen by a header-only check).


def _not_dicom(folder: Path, paths: list[Path]) -> Path:
    (folder / "IM0099.dcm").write_text("not an image")
    return folder / "IM0099.dcm"


def _two_series(folder: Path, paths: list[Path]) -> Path:
    write_series(folder, np.zeros(SMALL), AXIAL, suffix=".dcm")  # another SeriesInstanceUID
    return folder


def _missing_slice(folder: Path, paths: list[Path]) -> Path:
    paths[2].unlink()
    return folder


def _uneven(folder: Path, paths: list[Path]) -> Path:
    _shift(paths[3], (0, 0, 0.6))  # 2.6 then 1.4 mm where the others are 2 mm
    return folder


def _repeated(folder: Path, paths: list[Path]) -> Path:
    _shift(paths[3], (0, 0, -2.0))  # onto slice 2
    return max(paths[2], paths[3], key=lambda p: p.name)  # the later of the two by name


def _in_plane(folder: Path, paths: list[Path]) -> Path:
    _shift(paths[2], (1.5, 0, 0))
    return paths[2]


def _edited(**values: object):
    def plant(folder: Path, paths: list[Path]) -> Path:
        edit_slice(paths[1], **values)
        return paths[1]
    return plant


def _truncated(folder: Path, paths: list[Path]) -> Path:
    paths[1].write_bytes(paths[1].read_bytes()[:-20])  # the pixel data is the last element
    return paths[1]


FAULTS = {
    "not DICOM": (_not_dicom, "cannot be read as DICOM", True),
    "two series": (_two_series, "holds 2 series: ", True),
    "missing slice": (_missing_slice, "1 slice(s) missing between ", True),
    "uneven spacing": (_uneven, "slices are unevenly spaced: 1.4 to 2.6 mm apart", True),
    "repeated position": (_repeated, "lies at the same position as ", True),
    "shifted in plane": (_in_plane, "is shifted 1.5 mm in its plane", True),
    "image size": (_edited(pixels=np.zeros((7, 6))), "is 6 x 7 pixels, unlike 6 x 5 of ", True),
    "orientation": (_edited(ImageOrientationPatient=as_ds((1, 0, 0, 0, 0.6, 0.8))),
                    "is oriented [1, 0, 0, 0, 0.6, 0.8], unlike", True),
    "pixel spacing": (_edited(PixelSpacing=as_ds((0.8, 0.7))), "has pixel spacing [0.8, 0.7] mm, unlike [0.7, 0.7]",
                      True),
    "no position": (_edited(ImagePositionPatient=None), "has no ImagePositionPatient (0020,0032)", True),
    "multi-frame": (_edited(pixels=np.zeros((2, 5, 6))), "is a multi-frame image (2 frames)", True),
    "truncated pixel data": (_truncated, "pixel data cannot be decoded", False),
}


def _scan_one(folder: Path, full: bool):
    catalog = read_dicom_folder(folder.parent.parent)
    return catalog, scan(catalog, full=full)


@pytest.mark.parametrize("full", [True, False], ids=["full", "quick"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_problem_is_one_line_naming_the_file_or_folder(tmp_path, fault, full):
    plant, fragment, seen_quick = FAULTS[fault]
    folder = tmp_path / "images" / "case"
    paths = write_series(folder, np.arange(np.prod(SMALL)).reshape(SMALL) - 500, AXIAL)
    at_fault = plant(folder, paths)
    catalog, result = _scan_one(folder, full)
    problems = catalog.problems + result.problems
    if not full and not seen_quick:
        assert problems == [] and result.stats["case"].shape == (1, *SMALL)
        return
    assert len(problems) == 1, problems
    (problem,) = problems
    assert (problem.case_id, problem.path) == ("case", str(at_fault))
    assert fragment in problem.message, problem.message
    assert "\n" not in str(problem) and len(str(problem)) < 400


def test_a_real_truncated_file_is_reported_with_its_name(tmp_path):
    folder = tmp_path / "images" / "mr"
    folder.mkdir(parents=True)
    shutil.copy(get_testdata_file("MR_truncated.dcm", download=False), folder / "MR_truncated.dcm")
    catalog, result = _scan_one(folder, full=True)
    (problem,) = result.problems
    assert problem.path == str(folder / "MR_truncated.dcm") and problem.case_id == "mr"
    assert problem.message.startswith("pixel data cannot be decoded (") and "damaged" in problem.message
    assert "\n" not in problem.message


def test_clean_series_pass_the_checks_with_their_statistics_and_label(tmp_path):
    hu, label = _ct()
    write_series(tmp_path / "images/a", hu, AFFINES["oblique"])
    write_nifti(tmp_path / "labels/a.nii.gz", label, read_series(tmp_path / "images/a", full=False).affine)
    write_series(tmp_path / "images/b", hu, AFFINES["oblique"])
    write_nifti(tmp_path / "labels/b.nii.gz", label, AFFINES["scanner"])  # made on another grid
    catalog = read_dicom_folder(tmp_path)
    result = scan(catalog, num_classes=3)
    stats = result.stats["a"]
    assert stats.shape == (1, *SHAPE) and stats.spacing == (0.9, 0.7, 2.0)
    assert (stats.minimum, stats.maximum) == (float(hu.min()), float(hu.max())) and stats.label_values == (0, 1, 2)
    (problem,) = result.problems
    assert problem.case_id == "b" and problem.message.startswith("label affine differs from the image's")
    quick = scan(catalog, full=False).stats["a"]
    assert quick.shape == (1, *SHAPE) and quick.minimum is None


# ---------------------------------------------------------------- training on a DICOM folder


def _two_hospitals(root: Path, cases_per_site: int = 5) -> Path:
    affine = AFFINES["scanner"]
    for s, site in enumerate(("hospA", "hospB")):
        for i in range(cases_per_site):
            hu, label = _ct((32, 32, 16), seed=10 * s + i)
            write_series(root / site / "images" / f"case{i}", hu, affine, patient=f"{site}-{i}", seed=i)
            write_nifti(root / site / "labels" / f"case{i}.nii.gz", label, affine)
    return root


@pytest.mark.slow
def test_dicom_folder_pretrains_and_finetunes_from_a_yaml(tmp_path):
    _two_hospitals(tmp_path / "data")
    raw = tiny_raw(3, "segmentation", **BUDGET, data={"source": "dicom", "root": "data", "num_sites": 2},
                   task={"class_names": CLASSES})
    report = run_pretrain_and_finetune(tmp_path, raw)
    assert set(report["sites"]) == {"hospA", "hospB"}
    assert set(report["pooled"]["per_class"]["dice"]) == {"liver", "spleen"}
