"""Tests of the up-front data checks (fedmae.data.checks) on clean and deliberately damaged data sets."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmae.data.catalog import Case, Catalog, nifti_stem
from fedmae.data.checks import check_case, scan
from fedmae.data.chestxray14 import read_chestxray14
from fedmae.data.decathlon import read_decathlon
from fedmae.data.report import summarise_intensity
from tests.data.builders import plant_faults, write_chestxray14, write_decathlon, write_nifti

SHAPE = (12, 10, 8)  # distinct axes, so a transposed shape would show
SPACING = (0.8, 0.75, 2.5)

# Which planted faults a quick scan (headers only) still sees; the others need the voxels.
QUICK = {
    "imagesTr/abdomen_000.nii.gz": True,  # deleted: the reader's problem
    "imagesTr/abdomen_001.nii.gz": False,  # truncated: the header is intact
    "labelsTr/abdomen_002.nii.gz": True,  # label shape
    "labelsTr/abdomen_003.nii.gz": True,  # label affine
    "labelsTr/abdomen_004.nii.gz": False,  # label value 7
    "labelsTr/abdomen_005.nii.gz": True,  # not NIfTI: no header to read
    "imagesTs/abdomen_006.nii.gz": False,  # NaN voxels
}


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return write_decathlon(tmp_path_factory.mktemp("clean"), num_training=3, num_test=1, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = write_decathlon(tmp_path_factory.mktemp("planted"))  # 6 training + 2 test, (40, 40, 24)
    return root, plant_faults(root)


def _all_problems(root: Path, **options):
    """The reader's problems followed by the scan's, as the loader sees them."""
    catalog = read_decathlon(root)
    result = scan(catalog, num_classes=len(catalog.seg_classes), **options)
    return catalog, result, catalog.problems + result.problems


# ---------------------------------------------------------------- clean data


def test_clean_ct_set_has_no_problems_and_true_statistics(clean):
    catalog = read_decathlon(clean)
    result = scan(catalog, channels=1, num_classes=3)
    assert result.problems == [] and result.bad_cases() == set()
    assert set(result.stats) == {c.case_id for c in catalog.cases} and len(result.stats) == 4
    for case in catalog.cases:
        stats = result.stats[case.case_id]
        hu = np.asanyarray(nib.load(case.image).dataobj)
        assert stats.case_id == case.case_id
        assert stats.shape == (1, *SHAPE)
        assert stats.spacing == SPACING  # from the header (the affine stores them negated for x and y)
        assert (stats.minimum, stats.maximum) == (float(hu.min()), float(hu.max()))
        assert stats.minimum < -900 and 0 < stats.maximum < 300  # Hounsfield units: air to soft tissue
        assert stats.mean == pytest.approx(float(hu.mean()), rel=1e-5)
        assert stats.std == pytest.approx(float(hu.std()), rel=1e-4)
        if case.label is None:
            assert stats.label_values is None
        else:
            assert stats.label_values == (0, 1, 2)
    summary = summarise_intensity(list(result.stats.values()))
    assert summary["min"] == min(s.minimum for s in result.stats.values())
    assert summary["max"] == max(s.maximum for s in result.stats.values())


def test_quick_scan_of_clean_set_reads_headers_only(clean):
    result = scan(read_decathlon(clean), full=False, num_classes=3)
    assert result.problems == []
    for stats in result.stats.values():
        assert stats.shape == (1, *SHAPE) and stats.spacing == SPACING
        assert stats.minimum is stats.maximum is stats.mean is stats.std is stats.label_values is None


def test_scan_reports_progress_and_honours_a_case_subset(clean):
    catalog = read_decathlon(clean)
    calls = []
    result = scan(catalog, catalog.cases[1:3], workers=1, progress=lambda done, total: calls.append((done, total)))
    assert list(result.stats) == [c.case_id for c in catalog.cases[1:3]]
    assert calls == [(1, 2), (2, 2)]


# ---------------------------------------------------------------- planted faults


def test_plant_faults_contract(planted):
    root, faults = planted
    assert set(faults) == set(QUICK)
    assert len({nifti_stem(k) for k in faults}) == 7  # one case per fault
    assert not (root / "imagesTr" / "abdomen_000.nii.gz").exists()
    assert (root / "labelsTr" / "abdomen_005.nii.gz").read_text() == "not a nifti"


def test_full_scan_finds_each_planted_fault_once(planted):
    root, faults = planted
    catalog, result, problems = _all_problems(root)
    assert len(problems) == len(faults), "\n".join(map(str, problems))
    by_path = {p.path: p for p in problems}
    for file, fragment in faults.items():
        problem = by_path[str(root / file)]
        assert fragment in problem.message, (file, problem.message)
        assert problem.case_id == nifti_stem(file)
    # The reader already dropped the case whose image is gone; every other case was scanned.
    assert "abdomen_000" not in {c.case_id for c in catalog.cases}
    assert len(catalog.cases) == 7
    assert result.bad_cases() == {nifti_stem(f) for f in faults} - {"abdomen_000"}
    # Clean cases (and damaged cases whose damage lies in the label) still have statistics.
    assert {"abdomen_007", "abdomen_002", "abdomen_003", "abdomen_004", "abdomen_005"} <= set(result.stats)
    assert "abdomen_001" not in result.stats  # unreadable image: nothing to report
    assert result.stats["abdomen_004"].label_values == (0, 1, 2, 7)
    nan_stats = result.stats["abdomen_006"]
    assert np.isfinite([nan_stats.minimum, nan_stats.maximum, nan_stats.mean]).all()  # NaN left out


def test_planted_messages_name_the_problem(planted):
    root, _ = planted
    _, _, problems = _all_problems(root)
    messages = {Path(p.path).relative_to(root).as_posix(): p.message for p in problems}
    assert messages["labelsTr/abdomen_002.nii.gz"] == "label shape [20, 40, 24] does not match image shape [40, 40, 24]"
    assert messages["labelsTr/abdomen_003.nii.gz"] == (
        "label affine differs from the image's by up to 5 mm (not on the same voxel grid)")
    assert messages["labelsTr/abdomen_004.nii.gz"] == "label values [7] are outside the declared classes 0..2"
    assert messages["imagesTs/abdomen_006.nii.gz"] == "has 3 NaN/Inf intensity value(s)"
    for damaged in ("imagesTr/abdomen_001.nii.gz", "labelsTr/abdomen_005.nii.gz"):
        assert messages[damaged].startswith("cannot be read as NIfTI (")
        assert messages[damaged].endswith("); the file is damaged or not NIfTI")


def test_label_values_need_num_classes(planted):
    root, _ = planted
    catalog = read_decathlon(root)
    case = next(c for c in catalog.cases if c.case_id == "abdomen_004")
    stats, problems = check_case(case, catalog)
    assert problems == [] and stats.label_values == (0, 1, 2, 7)
    stats, problems = check_case(case, catalog, num_classes=8)
    assert problems == []


def test_quick_scan_sees_headers_not_voxels(planted):
    root, faults = planted
    _, result, problems = _all_problems(root, full=False)
    found = {Path(p.path).relative_to(root).as_posix(): p.message for p in problems}
    assert len(found) == len(problems)
    assert set(found) == {f for f, quick in QUICK.items() if quick}
    for file in found:
        assert faults[file] in found[file]
    # Truncation, NaN and a stray label value are only in the voxels, which a quick scan does not read.
    for case_id in ("abdomen_001", "abdomen_004", "abdomen_006"):
        stats = result.stats[case_id]
        assert stats.minimum is None and stats.label_values is None
    assert result.stats["abdomen_001"].shape == (1, 40, 40, 24)


# ---------------------------------------------------------------- channels and multi-file images


def test_channel_count_is_checked(tmp_path):
    root = write_decathlon(tmp_path, num_training=2, num_test=1, shape=(8, 8, 6), mri=True)
    catalog = read_decathlon(root)
    result = scan(catalog, channels=1, num_classes=4)
    assert len(result.problems) == 3
    for problem, case in zip(result.problems, catalog.cases):
        assert (problem.path, problem.case_id) == (case.image, case.case_id)
        assert problem.message == "has 4 channel(s) but model.in_channels is 1"
    # The channel-last 4-D volumes are read channel-first, statistics and all.
    assert all(s.shape == (4, 8, 8, 6) and s.minimum is not None for s in result.stats.values())
    assert scan(catalog, channels=4, num_classes=4).problems == []


def test_multi_file_images_stack_channels(tmp_path):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for name in ("a_t1", "a_t2", "b_t1"):
        write_nifti(tmp_path / f"{name}.nii.gz", np.full((6, 5, 4), 3, np.int16), affine)
    write_nifti(tmp_path / "b_t2.nii.gz", np.zeros((6, 5, 3), np.int16), affine)
    write_nifti(tmp_path / "a_seg.nii.gz", np.ones((6, 5, 4), np.uint8), affine)
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "T1", "1": "T2"}, "training": [
        {"image": ["a_t1.nii.gz", "a_t2.nii.gz"], "label": "a_seg.nii.gz", "case_id": "a"},
        {"image": ["b_t1.nii.gz", "b_t2.nii.gz"], "case_id": "b"},
    ]}))
    catalog = read_decathlon(tmp_path)
    result = scan(catalog, channels=2)
    assert result.stats["a"].shape == (2, 6, 5, 4) and result.stats["a"].spacing == (1.5, 1.5, 2.0)
    assert result.stats["a"].label_values == (1,) and result.stats["a"].minimum == 3.0
    [problem] = result.problems
    assert problem.path == str(tmp_path / "b_t2.nii.gz") and problem.case_id == "b"
    assert problem.message == f"channel file has shape [6, 5, 3], unlike [6, 5, 4] of {tmp_path / 'b_t1.nii.gz'}"


@pytest.mark.parametrize(
    ("label", "message"),
    [
        (np.full((6, 5, 4), 0.5, np.float32), "label map has non-integer values"),
        (np.where(np.eye(6, 5)[..., None] > 0, np.nan, 1.0).repeat(4, -1).astype(np.float32), "label map has NaN/Inf values"),
        (np.zeros((6, 5, 4, 2), np.uint8), "label map has 2 channels; expected one map of class values"),
    ],
    ids=["non-integer", "nan", "two-channels"],
)
def test_label_content_problems(tmp_path, label, message):
    write_nifti(tmp_path / "img.nii.gz", np.zeros((6, 5, 4), np.int16))
    write_nifti(tmp_path / "seg.nii.gz", label)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "img.nii.gz", "label": "seg.nii.gz"}]}))
    [problem] = scan(read_decathlon(tmp_path)).problems
    assert (problem.path, problem.message, problem.case_id) == (str(tmp_path / "seg.nii.gz"), message, "img")


def test_wrong_spatial_rank_is_reported(tmp_path):
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((6, 5), np.int16))
    write_nifti(tmp_path / "deep.nii.gz", np.zeros((4, 4, 4, 2, 2), np.int16))
    (tmp_path / "dataset.json").write_text(json.dumps({"training": ["flat.nii.gz", "deep.nii.gz"]}))
    problems = {p.case_id: p.message for p in scan(read_decathlon(tmp_path), full=False).problems}
    assert problems == {
        "flat": "has shape [6, 5]; expected 3 spatial axes and optionally channels last",
        "deep": "has shape [4, 4, 4, 2, 2]; expected 3 spatial axes and optionally channels last",
    }


# ---------------------------------------------------------------- in-memory cases


def _memory_catalog(cases: list[Case]) -> Catalog:
    return Catalog(source="synthetic", root="", modality="other", spatial_dims=2, cases=cases, findings=("a", "b"))


def test_in_memory_cases():
    good = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    nan = good.copy()
    nan[0, 2, 3] = np.nan
    nan[0, 5, 5] = np.inf
    cases = [
        Case("good", good, label=np.zeros((8, 8), np.int64), findings=np.array([1.0, 0.0])),
        Case("nan", nan, findings=np.array([0.0, 1.0])),
        Case("long", good, findings=np.array([1.0, 0.0, 1.0])),
        Case("soft", good, findings=np.array([0.5, 0.0])),
        Case("flat", good[0, 0][None]),
        Case("label", good, label=np.zeros((8, 7), np.int64)),
        Case("grey", np.repeat(good, 3, axis=0)),
    ]
    result = scan(_memory_catalog(cases), channels=1)
    problems = [(p.path, p.case_id, p.message) for p in result.problems]
    assert problems == [
        ("<synthetic:nan>", "nan", "has 2 NaN/Inf intensity value(s)"),
        ("<synthetic:long>", "long", "findings must be 2 values of 0 or 1, got [1.0, 0.0, 1.0]"),
        ("<synthetic:soft>", "soft", "findings must be 2 values of 0 or 1, got [0.5, 0.0]"),
        ("<synthetic:flat>", "flat", "has 1 spatial dimensions, expected 2"),
        ("<label of label>", "label", "label shape [8, 7] does not match image shape [8, 8]"),
        ("<synthetic:grey>", "grey", "has 3 channel(s) but model.in_channels is 1"),
    ]
    assert result.stats["good"].shape == (1, 8, 8) and result.stats["good"].spacing is None
    assert (result.stats["good"].minimum, result.stats["good"].maximum) == (0.0, 63.0)
    assert result.stats["good"].label_values == (0,)
    finite = nan[np.isfinite(nan)]
    assert (result.stats["nan"].minimum, result.stats["nan"].maximum) == (float(finite.min()), float(finite.max()))
    assert "flat" not in result.stats


# ---------------------------------------------------------------- 2-D pictures


def test_truncated_png_is_reported_as_damaged(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=2, images_per_patient=1, size=32)
    catalog = read_chestxray14(root)
    victim = catalog.cases[0]
    data = Path(victim.image).read_bytes()
    Path(victim.image).write_bytes(data[: len(data) // 2])
    result = scan(catalog)
    [problem] = result.problems
    assert (problem.path, problem.case_id) == (victim.image, victim.case_id)
    assert problem.message.startswith("cannot be read as an image (")
    assert problem.message.endswith("); the file is damaged or truncated")
    assert set(result.stats) == {catalog.cases[1].case_id}
    assert result.stats[catalog.cases[1].case_id].shape == (1, 32, 32)
    # The PNG header survives, so a quick scan still opens it.
    quick = scan(catalog, full=False)
    assert quick.problems == [] and quick.stats[victim.case_id].shape == (1, 32, 32)


def test_png_that_is_not_an_image_and_missing_png(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=2, images_per_patient=1, size=16)
    catalog = read_chestxray14(root)
    Path(catalog.cases[0].image).write_text("not a png")
    Path(catalog.cases[1].image).unlink()  # gone after indexing
    for full in (True, False):
        problems = {p.case_id: p.message for p in scan(catalog, full=full).problems}
        assert problems[catalog.cases[0].case_id].endswith("the file is damaged or truncated")
        assert problems[catalog.cases[1].case_id] == "file not found"
