"""Tests of the ChestX-ray14 and MedMNIST readers on small data sets written by tests/data/builders.py."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fedmae.data.catalog import DataError
from fedmae.data.chestxray14 import FINDINGS, read_chestxray14
from fedmae.data.medmnist import CLASS_NAMES, flavour_of, read_medmnist
from tests.data.builders import CXR_FINDINGS, cxr_image_name, write_chestxray14, write_medmnist


def _messages(catalog) -> list[str]:
    return [p.message for p in catalog.problems]


def _edit_csv(root: Path, edit) -> None:
    """Rewrite Data_Entry_2017.csv's rows (lists of fields) through ``edit``."""
    path = root / "Data_Entry_2017.csv"
    header, *rows = path.read_text().splitlines()
    rows = edit([next(csv.reader([line])) for line in rows])
    with open(path, "w", newline="") as f:
        f.write(header + "\n")
        csv.writer(f, lineterminator="\n").writerows(rows)


@pytest.fixture(scope="module")
def cxr(tmp_path_factory) -> Path:
    return write_chestxray14(tmp_path_factory.mktemp("cxr"), size=16)


# ---------------------------------------------------------------- ChestX-ray14


def test_findings_are_the_nih_fourteen_in_order():
    assert FINDINGS == CXR_FINDINGS and len(FINDINGS) == 14


def test_chestxray14_catalog(cxr):
    catalog = read_chestxray14(cxr)
    assert catalog.problems == []
    assert (catalog.source, catalog.modality, catalog.spatial_dims, catalog.channels) == ("chestxray14", "xray", 2, 1)
    assert catalog.findings == FINDINGS and not catalog.exclusive
    assert catalog.root == str(cxr.resolve())
    assert len(catalog.cases) == 12
    first = catalog.cases[0]
    assert first.case_id == "00000001_000.png" and first.patient == "1" and first.site == ""
    assert {c.patient for c in catalog.cases} == {str(p) for p in range(1, 7)}
    # The index found both release folders.
    folders = {Path(c.image).parent.parent.name for c in catalog.cases}
    assert folders == {"images_001", "images_002"}
    assert all(Path(c.image).is_absolute() and Path(c.image).name == c.case_id for c in catalog.cases)


def test_chestxray14_multi_hot(cxr):
    by_id = {c.case_id: c for c in read_chestxray14(cxr).cases}
    no_finding, single, double = (by_id[cxr_image_name(1, 0)], by_id[cxr_image_name(1, 1)], by_id[cxr_image_name(2, 0)])
    assert no_finding.findings.dtype == np.float32 and no_finding.findings.shape == (14,)
    assert not no_finding.findings.any()  # "No Finding"
    assert single.findings.tolist() == [float(k == FINDINGS.index("Cardiomegaly")) for k in range(14)]
    # "Effusion|Nodule": index 2, and (2 + 5) % 14 = 7 -> Pneumothorax
    assert np.flatnonzero(double.findings).tolist() == [FINDINGS.index("Effusion"), FINDINGS.index("Pneumothorax")]


def test_chestxray14_official_test_split(cxr):
    catalog = read_chestxray14(cxr)
    test = {c.patient for c in catalog.cases if c.split == "test"}
    assert test == {"5", "6"}
    assert all(c.split is None for c in catalog.cases if c.patient not in test)


def test_chestxray14_without_lists_and_with_v2020_csv_and_site(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=3, size=8, split_lists=False, sites=("north", "south"))
    (root / "Data_Entry_2017.csv").rename(root / "Data_Entry_2017_v2020.csv")
    catalog = read_chestxray14(root)
    assert catalog.problems == [] and len(catalog.cases) == 6
    assert all(c.split is None for c in catalog.cases)
    assert [c.site for c in catalog.cases] == ["north", "north", "south", "south", "north", "north"]


def test_chestxray14_missing_image_is_a_problem_and_no_case(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=3, size=8)
    gone = cxr_image_name(2, 1)
    (root / "images_002" / "images" / gone).unlink()
    catalog = read_chestxray14(root)
    assert gone not in {c.case_id for c in catalog.cases} and len(catalog.cases) == 5
    [problem] = catalog.problems
    assert problem.case_id == gone and problem.path == str(root.resolve() / "Data_Entry_2017.csv")
    assert problem.message == f"{gone} listed in Data_Entry_2017.csv but not found under {root.resolve()}"


def test_chestxray14_unknown_finding_keeps_the_case(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=3, size=8)
    name = cxr_image_name(1, 1)

    def edit(rows):
        rows[1][1] = "Cardiomegaly|Tuberculosis"
        rows[2][1] = "pleural thickening"  # case and spacing forgiven
        rows[3][1] = ""  # no labels: unlabelled
        return rows

    _edit_csv(root, edit)
    catalog = read_chestxray14(root)
    [problem] = catalog.problems
    assert problem.case_id == name and "unknown finding 'Tuberculosis'" in problem.message
    by_id = {c.case_id: c for c in catalog.cases}
    assert np.flatnonzero(by_id[name].findings).tolist() == [FINDINGS.index("Cardiomegaly")]
    assert np.flatnonzero(by_id[cxr_image_name(2, 0)].findings).tolist() == [FINDINGS.index("Pleural_Thickening")]
    unlabelled = by_id[cxr_image_name(2, 1)]
    assert unlabelled.findings is None and not catalog.labelled(unlabelled, "classification")


def test_chestxray14_list_problems(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=3, size=8)
    both = cxr_image_name(1, 0)
    with open(root / "test_list.txt", "a") as f:
        f.write(f"{both}\n99999999_000.png\n")
    catalog = read_chestxray14(root)
    assert len(catalog.cases) == 6
    assert sorted(_messages(catalog)) == [
        "00000001_000.png is in both train_val_list.txt and test_list.txt; kept in test",
        "99999999_000.png is listed here but not in the label CSV",
    ]
    assert {p.path for p in catalog.problems} == {str(root.resolve() / "test_list.txt")}
    assert next(c for c in catalog.cases if c.case_id == both).split == "test"


def test_chestxray14_stray_and_duplicate_pngs(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=3, size=8)
    stray = root / "images_001" / "images" / "12345678_000.png"
    stray.write_bytes(b"not read")
    copy = root / "extra" / cxr_image_name(1, 0)
    copy.parent.mkdir()
    copy.write_bytes((root / "images_001" / "images" / cxr_image_name(1, 0)).read_bytes())
    (root / "images_001" / "images" / "._00000001_000.png").write_bytes(b"macOS resource fork")
    catalog = read_chestxray14(root)
    assert len(catalog.cases) == 6 and "12345678_000.png" not in {c.case_id for c in catalog.cases}
    problems = {p.path: p.message for p in catalog.problems}
    assert problems[str(stray.resolve())] == "PNG not listed in Data_Entry_2017.csv; ignored"
    # "extra" sorts before "images_001", so the copy there is the one indexed first.
    assert len(problems) == 2
    assert any(m.startswith(f"second copy of {cxr_image_name(1, 0)}") for m in problems.values())


def test_chestxray14_fatal_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        read_chestxray14(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no Data_Entry_2017\.csv \(or Data_Entry_2017_v2020\.csv\)"):
        read_chestxray14(tmp_path)
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Follow-up #\nx.png,No Finding,0\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv: missing column\(s\) Patient ID"):
        read_chestxray14(tmp_path)
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\n\n")
    with pytest.raises(DataError, match=r"Data_Entry_2017\.csv: no rows"):
        read_chestxray14(tmp_path)


# ---------------------------------------------------------------- MedMNIST


def test_flavour_from_file_name():
    assert flavour_of("/x/organmnist3d_64.npz") == "organmnist3d"
    assert flavour_of("PathMNIST_224.npz") == "pathmnist"
    assert flavour_of("chestmnist.npz") == "chestmnist"


def test_medmnist_2d_grey_multi_class(tmp_path):
    path = write_medmnist(tmp_path / "pathmnist.npz", num_classes=9)
    catalog = read_medmnist(path)
    assert catalog.problems == []
    assert (catalog.source, catalog.modality, catalog.spatial_dims, catalog.channels) == ("medmnist", "other", 2, 1)
    assert catalog.exclusive and catalog.findings == CLASS_NAMES["pathmnist"] and len(catalog.findings) == 9
    assert [sum(c.split == s for c in catalog.cases) for s in ("train", "val", "test")] == [12, 4, 4]
    case = catalog.cases[3]
    assert case.case_id == "train-00003" and case.label is None and case.site == case.patient == ""
    assert case.in_memory and case.image.dtype == np.float32 and case.image.shape == (1, 28, 28)
    assert case.findings.tolist() == [float(k == 3) for k in range(9)]  # one-hot of class 3
    with np.load(path) as raw:
        np.testing.assert_allclose(case.image[0], raw["train_images"][3] / 255.0, rtol=1e-6)
    assert all(0.0 <= c.image.min() and c.image.max() <= 1.0 for c in catalog.cases)


def test_medmnist_2d_rgb_is_channels_first(tmp_path):
    path = write_medmnist(tmp_path / "dermamnist.npz", rgb=True, size=8, n=(3, 2, 2))
    catalog = read_medmnist(path)
    assert catalog.channels == 3 and catalog.spatial_dims == 2 and len(catalog.findings) == 7
    with np.load(path) as raw:
        np.testing.assert_allclose(catalog.cases[-1].image, raw["test_images"][-1].transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_medmnist_3d_with_size_suffix(tmp_path):
    catalog = read_medmnist(write_medmnist(tmp_path / "organmnist3d_64.npz", dims=3, size=6, n=(3, 2, 2)))
    assert catalog.spatial_dims == 3 and catalog.channels == 1
    assert catalog.findings == CLASS_NAMES["organmnist3d"]
    assert catalog.cases[0].image.shape == (1, 6, 6, 6)


def test_medmnist_multi_label(tmp_path):
    path = write_medmnist(tmp_path / "chestmnist.npz", multi_label=True, size=8)
    catalog = read_medmnist(path)
    assert not catalog.exclusive and catalog.findings == FINDINGS
    with np.load(path) as raw:
        np.testing.assert_array_equal(catalog.cases[-1].findings, raw["test_labels"][-1].astype(np.float32))
    assert catalog.cases[-1].findings.dtype == np.float32


def test_medmnist_unknown_flavour_names_classes_from_labels(tmp_path):
    multi_class = read_medmnist(write_medmnist(tmp_path / "mymnist.npz", num_classes=5, size=8))
    assert multi_class.exclusive and multi_class.findings == tuple(f"class_{k}" for k in range(5))
    multi_label = read_medmnist(write_medmnist(tmp_path / "othermnist.npz", multi_label=True, size=8))
    assert not multi_label.exclusive and multi_label.findings == tuple(f"class_{k}" for k in range(14))


def _rewrite(path: Path, **changes) -> Path:
    with np.load(path) as raw:
        arrays = dict(raw)
    arrays.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del arrays[key]
    np.savez(path, **arrays)
    return path


def test_medmnist_float_images_kept_and_non_finite_skipped(tmp_path):
    path = write_medmnist(tmp_path / "pneumoniamnist.npz", size=4, n=(3, 2, 2))
    train = np.full((3, 4, 4), 0.25, dtype=np.float64)
    train[1, 2, 2] = np.nan
    catalog = read_medmnist(_rewrite(path, train_images=train))
    assert [c.case_id for c in catalog.cases if c.split == "train"] == ["train-00000", "train-00002"]
    assert catalog.cases[0].image.dtype == np.float32 and np.all(catalog.cases[0].image == 0.25)
    [problem] = catalog.problems
    assert problem.case_id == "train-00001" and "NaN or infinite" in problem.message


def test_medmnist_label_out_of_range_for_known_flavour(tmp_path):
    path = write_medmnist(tmp_path / "pneumoniamnist.npz", size=4, n=(3, 2, 2))
    catalog = read_medmnist(_rewrite(path, val_labels=np.array([[1], [5]], dtype=np.uint8)))
    assert len(catalog.cases) == 6
    [problem] = catalog.problems
    assert problem.case_id == "val-00001"
    assert problem.message == "val-00001: label 5 is outside 0..1 (pneumoniamnist has 2 classes); skipped"


def test_medmnist_fatal_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_medmnist(tmp_path / "pathmnist.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(DataError, match=r"text\.npz: not a MedMNIST \.npz \(neither a zip archive"):
        read_medmnist(tmp_path / "text.npz")
    path = write_medmnist(tmp_path / "pathmnist.npz", size=4, n=(3, 2, 2))
    with pytest.raises(DataError, match=r"pathmnist\.npz: missing array\(s\) val_labels"):
        read_medmnist(_rewrite(path, val_labels=None))
    path = write_medmnist(tmp_path / "pathmnist.npz", size=4, n=(3, 2, 2))
    with pytest.raises(DataError, match="test_images has 2 images but test_labels has 3 rows"):
        read_medmnist(_rewrite(path, test_labels=np.zeros((3, 1), np.uint8)))
    path = write_medmnist(tmp_path / "pathmnist.npz", size=4, n=(3, 2, 2))
    with pytest.raises(DataError, match="images have rank 5"):
        read_medmnist(_rewrite(path, train_images=np.zeros((3, 2, 2, 2, 2), np.uint8)))
    with pytest.raises(DataError, match="2D, but the name says 3D"):
        read_medmnist(write_medmnist(tmp_path / "nodulemnist3d.npz", size=4, n=(3, 2, 2)))
    with pytest.raises(DataError, match="labels have 1 column"):
        read_medmnist(write_medmnist(tmp_path / "chestmnist.npz", size=4, n=(3, 2, 2)))


class _Payload:
    """Unpickling this would create ``marker``: proof that pickle code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_medmnist_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"
    path = write_medmnist(tmp_path / "pathmnist.npz", size=4, n=(3, 2, 2))
    evil = np.empty(3, dtype=object)
    evil[:] = [_Payload(marker)] * 3
    _rewrite(path, train_labels=evil)
    with pytest.raises(DataError, match=r"pathmnist\.npz: cannot read its arrays"):
        read_medmnist(path)
    assert not marker.exists()
