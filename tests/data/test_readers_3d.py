"""Tests of the Decathlon and NIfTI-folder readers on small volumes written by tests/data/builders.py.

The readers index files without reading voxels, so most volumes here are tiny (8 x 8 x 6) and some
are never valid NIfTI at all where only their presence matters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmae.data.catalog import UNLABELLED, DataError
from fedmae.data.decathlon import read_decathlon
from fedmae.data.nifti_folder import read_nifti_folder
from tests.data.builders import CT_LABELS, MRI_LABELS, write_decathlon, write_nifti

SHAPE = (8, 8, 6)


def _volume(path: Path, value: int = 0) -> Path:
    return write_nifti(path, np.full(SHAPE, value, np.int16))


def _messages(catalog) -> list[str]:
    return [p.message for p in catalog.problems]


def _write_index(root: Path, **meta) -> Path:
    """A dataset.json with CT channel and label names unless given; ``meta`` adds or replaces keys."""
    root.mkdir(parents=True, exist_ok=True)
    full = {"modality": {"0": "CT"}, "labels": CT_LABELS, **meta}
    full = {k: v for k, v in full.items() if v is not None}
    (root / "dataset.json").write_text(json.dumps(full))
    return root


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    return write_decathlon(tmp_path_factory.mktemp("ct"), num_training=3, num_test=2, shape=SHAPE)


# ---------------------------------------------------------------- Decathlon


def test_decathlon_ct_catalog(ct):
    catalog = read_decathlon(ct)
    assert catalog.problems == []
    assert (catalog.source, catalog.root, catalog.modality, catalog.spatial_dims) == ("decathlon", str(ct), "ct", 3)
    assert catalog.channels == 1 and catalog.channel_names == ("CT",)
    assert catalog.seg_classes == ("background", "liver", "spleen")
    assert catalog.findings == ()
    assert [c.case_id for c in catalog.cases] == [f"abdomen_{i:03d}" for i in range(5)]
    training, test = catalog.cases[:3], catalog.cases[3:]
    for case in training:
        assert case.image == str(ct / "imagesTr" / f"{case.case_id}.nii.gz")
        assert case.label == str(ct / "labelsTr" / f"{case.case_id}.nii.gz")
        assert case.split is None and case.site == case.patient == ""
        assert catalog.labelled(case, "segmentation")
    for case in test:  # imagesTs entries are bare paths without labels: pre-training only
        assert case.image == str(ct / "imagesTs" / f"{case.case_id}.nii.gz")
        assert case.label is None and case.split == UNLABELLED
        assert not catalog.labelled(case, "segmentation")


def test_decathlon_mri_catalog(tmp_path):
    root = write_decathlon(tmp_path, num_training=2, num_test=1, shape=SHAPE, mri=True)
    catalog = read_decathlon(root)
    assert catalog.problems == [] and catalog.modality == "mri"
    assert catalog.channels == 4 and catalog.channel_names == ("FLAIR", "T1w", "t1gd", "T2w")
    assert catalog.seg_classes == tuple(MRI_LABELS[str(k)] for k in range(4))
    assert [c.case_id for c in catalog.cases] == ["BRATS_000", "BRATS_001", "BRATS_002"]


@pytest.mark.parametrize(
    ("meta", "modality", "names"),
    [
        ({"modality": {"0": "CT"}}, "ct", ("CT",)),
        ({"modality": {"0": "ct", "1": "CT"}}, "ct", ("ct", "CT")),
        ({"modality": {"1": "T1w", "0": "FLAIR"}}, "mri", ("FLAIR", "T1w")),  # ordered by channel number
        ({"modality": {"0": "MRI"}}, "mri", ("MRI",)),
        ({"modality": {"0": "ADC", "1": "T2"}}, "mri", ("ADC", "T2")),
        ({"modality": {"0": "CT", "1": "PET"}}, "other", ("CT", "PET")),
        ({"modality": {"0": "CT", "1": "T2"}}, "other", ("CT", "T2")),
        ({"modality": {"0": "US"}}, "other", ("US",)),
        ({"modality": None, "channel_names": {"0": "T2"}}, "mri", ("T2",)),  # nnU-Net v2 spelling
        ({"modality": None}, "other", ()),
    ],
)
def test_decathlon_channel_names_decide_the_modality(tmp_path, meta, modality, names):
    root = _write_index(tmp_path, training=[], **meta)
    catalog = read_decathlon(root)
    assert catalog.modality == modality and catalog.channel_names == names
    assert catalog.channels == (len(names) or None)


def test_decathlon_channel_order_is_numeric(tmp_path):
    modality = {str(k): f"c{k}" for k in (10, 2, 0, 1, 9, 3, 4, 5, 6, 7, 8)}
    catalog = read_decathlon(_write_index(tmp_path, training=[], modality=modality))
    assert catalog.channel_names == tuple(f"c{k}" for k in range(11))


def test_decathlon_splits_from_lists(tmp_path):
    for name in ("a", "b", "c", "d", "e"):
        _volume(tmp_path / "img" / f"{name}.nii.gz")
        _volume(tmp_path / "lab" / f"{name}.nii.gz")
    root = _write_index(
        tmp_path,
        training=[{"image": "./img/a.nii.gz", "label": "./lab/a.nii.gz"}],
        validation=[{"image": "./img/b.nii.gz", "label": "./lab/b.nii.gz"}, {"image": "./img/e.nii.gz"}],
        test=[{"image": "./img/c.nii.gz", "label": "./lab/c.nii.gz"}, "./img/d.nii.gz"],
    )
    catalog = read_decathlon(root)
    assert catalog.problems == []
    splits = {c.case_id: c.split for c in catalog.cases}
    # Lists are read training, validation, test; an entry without a label is unlabelled wherever listed.
    assert list(splits) == ["a", "b", "e", "c", "d"]
    assert splits == {"a": None, "b": "val", "e": UNLABELLED, "c": "test", "d": UNLABELLED}
    by_id = {c.case_id: c for c in catalog.cases}
    assert by_id["c"].label == str(tmp_path / "lab" / "c.nii.gz")
    assert by_id["d"].label is None and by_id["e"].label is None


def test_decathlon_multi_file_images_site_patient_and_case_id(tmp_path):
    channels = [_volume(tmp_path / "imagesTr" / f"p1_{m}.nii.gz") for m in ("flair", "t1", "t2")]
    _volume(tmp_path / "labelsTr" / "p1.nii.gz")
    _volume(tmp_path / "imagesTr" / "p2_flair.nii.gz")
    _volume(tmp_path / "imagesTr" / "p2_t1.nii.gz")
    _volume(tmp_path / "imagesTr" / "solo.nii")  # uncompressed NIfTI: stem without .nii
    root = _write_index(
        tmp_path,
        training=[
            {"image": [f"imagesTr/{p.name}" for p in channels], "label": "labelsTr/p1.nii.gz",
             "case_id": "patient1", "site": "north", "patient": "P-1"},
            {"image": ["./imagesTr/p2_flair.nii.gz", "./imagesTr/p2_t1.nii.gz"], "site": "south", "patient": 17},
            {"image": str(tmp_path / "imagesTr" / "solo.nii")},  # absolute path
        ],
    )
    catalog = read_decathlon(root)
    assert catalog.problems == []
    first, second, third = catalog.cases
    assert first.case_id == "patient1" and first.image == tuple(str(p) for p in channels)
    assert first.image_files == first.image and first.files == (*first.image, str(tmp_path / "labelsTr" / "p1.nii.gz"))
    assert (first.site, first.patient, first.group) == ("north", "P-1", "P-1")
    # Without a case_id the first channel file names the case.
    assert second.case_id == "p2_flair" and second.image == (
        str(tmp_path / "imagesTr" / "p2_flair.nii.gz"), str(tmp_path / "imagesTr" / "p2_t1.nii.gz"))
    assert (second.site, second.patient) == ("south", "17")
    assert third.case_id == "solo" and third.image == str(tmp_path / "imagesTr" / "solo.nii")
    assert third.site == third.patient == "" and third.group == "solo"


def test_decathlon_null_site_and_patient_mean_unknown(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    _volume(tmp_path / "b.nii.gz")
    root = _write_index(tmp_path, training=[{"image": "a.nii.gz", "site": None, "patient": None},
                                            {"image": "b.nii.gz", "site": None, "patient": None}])
    a, b = read_decathlon(root).cases
    assert a.site == a.patient == "" and a.group != b.group


def test_decathlon_missing_files_are_problems(tmp_path):
    root = write_decathlon(tmp_path, num_training=3, num_test=1, shape=SHAPE)
    (root / "imagesTr" / "abdomen_001.nii.gz").unlink()
    (root / "labelsTr" / "abdomen_002.nii.gz").unlink()
    (root / "imagesTs" / "abdomen_003.nii.gz").unlink()
    catalog = read_decathlon(root)
    assert [c.case_id for c in catalog.cases] == ["abdomen_000"]
    assert [(p.path, p.message, p.case_id) for p in catalog.problems] == [
        (str(root / "imagesTr" / "abdomen_001.nii.gz"), "image listed in dataset.json (training[1]) does not exist", "abdomen_001"),
        (str(root / "labelsTr" / "abdomen_002.nii.gz"), "label listed in dataset.json (training[2]) does not exist", "abdomen_002"),
        (str(root / "imagesTs" / "abdomen_003.nii.gz"), "image listed in dataset.json (test[0]) does not exist", "abdomen_003"),
    ]


def test_decathlon_missing_channel_file_and_both_files(tmp_path):
    _volume(tmp_path / "x_0.nii.gz")
    root = _write_index(tmp_path, training=[
        {"image": ["x_0.nii.gz", "x_1.nii.gz"], "label": "x.nii.gz", "case_id": "x"},
    ])
    catalog = read_decathlon(root)
    assert catalog.cases == []
    assert [(Path(p.path).name, p.message.split(" ")[0], p.case_id) for p in catalog.problems] == [
        ("x_1.nii.gz", "image", "x"), ("x.nii.gz", "label", "x"),
    ]


def test_decathlon_duplicate_case_is_a_problem(tmp_path):
    root = write_decathlon(tmp_path, num_training=2, num_test=1, shape=SHAPE)
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"].append(meta["training"][0]["image"])  # the same image again, now unlabelled
    (root / "dataset.json").write_text(json.dumps(meta))
    catalog = read_decathlon(root)
    assert [c.case_id for c in catalog.cases] == ["abdomen_000", "abdomen_001", "abdomen_002"]
    assert catalog.cases[0].split is None  # the first listing wins
    [problem] = catalog.problems
    assert (problem.path, problem.message, problem.case_id) == (
        str(root / "dataset.json"), "case abdomen_000 is listed twice", "abdomen_000")


def test_decathlon_entry_without_image_is_a_problem(tmp_path):
    _volume(tmp_path / "a.nii.gz")
    root = _write_index(tmp_path, training=[{"label": "a.nii.gz"}, 3, {"image": "a.nii.gz"}])
    catalog = read_decathlon(root)
    assert [c.case_id for c in catalog.cases] == ["a"]
    assert _messages(catalog) == ["training[0] needs an 'image' path (or a list of paths)", "training[1] needs an 'image' path (or a list of paths)"]
    assert {p.path for p in catalog.problems} == {str(tmp_path / "dataset.json")}


@pytest.mark.parametrize("image", [None, [], 5], ids=["null", "empty-list", "number"])
def test_decathlon_malformed_image_is_a_problem(tmp_path, image):
    root = _write_index(tmp_path, training=[{"image": image}])
    catalog = read_decathlon(root)
    assert catalog.cases == [] and _messages(catalog) == ["training[0] needs an 'image' path (or a list of paths)"]


def test_decathlon_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        read_decathlon(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("{}")
    with pytest.raises(DataError, match="not a folder"):
        read_decathlon(tmp_path / "file.txt")


def test_decathlon_no_index(tmp_path):
    with pytest.raises(DataError, match=r"dataset\.json: missing; a Decathlon data set needs its dataset\.json"):
        read_decathlon(tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"training": [', r"dataset\.json: not valid JSON"),
        (b"\xff\xfe{}", r"dataset\.json: not valid JSON"),
        ("{}", r"dataset\.json: needs a 'training' list of cases"),
        ('{"training": null}', "needs a 'training' list"),
        ('{"training": {"image": "a.nii.gz"}}', "needs a 'training' list"),
        ('[{"image": "a.nii.gz"}]', "needs a 'training' list"),
        ('{"training": [], "labels": {"0": "bg", "1": "a", "3": "b"}}',
         r"'labels' values should be 0, 1, \.\.\., 2 with 0 = background, got \[0, 1, 3\]"),
        ('{"training": [], "labels": {"1": "a", "2": "b"}}', r"'labels' values should be 0, 1, \.\.\., 1"),
        ('{"training": [], "labels": {"background": 0, "liver": 1}}', "'labels' keys should be label values"),
        ('{"training": [], "labels": ["background", "liver"]}', "'labels' should map label values to names"),
        ('{"training": [], "modality": ["CT"]}', "'modality' should map channel numbers to names"),
        ('{"training": [], "modality": {"CT": "0"}}', "'modality' keys should be channel numbers"),
    ],
)
def test_decathlon_fatal_index_errors(tmp_path, text, match):
    index = tmp_path / "dataset.json"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=match) as err:
        read_decathlon(tmp_path)
    assert str(err.value).startswith(str(index))


def test_decathlon_labels_and_modality_may_be_absent(tmp_path):
    catalog = read_decathlon(_write_index(tmp_path, training=[], labels=None, modality=None))
    assert catalog.seg_classes == () and catalog.channels is None and catalog.cases == []


# ---------------------------------------------------------------- NIfTI folder


def test_nifti_folder_matches_labels_by_name(tmp_path):
    for name in ("b", "a", "c"):
        _volume(tmp_path / "images" / f"{name}.nii.gz")
    _volume(tmp_path / "labels" / "a.nii.gz")
    _volume(tmp_path / "labels" / "c.nii.gz")
    (tmp_path / "images" / "README.txt").write_text("not an image")
    catalog = read_nifti_folder(tmp_path, modality="ct")
    assert catalog.problems == []
    assert (catalog.source, catalog.root, catalog.modality, catalog.spatial_dims) == ("nifti_folder", str(tmp_path), "ct", 3)
    assert catalog.channels is None and catalog.seg_classes == ()
    assert [c.case_id for c in catalog.cases] == ["a", "b", "c"]  # sorted by file name
    by_id = {c.case_id: c for c in catalog.cases}
    assert by_id["a"].image == str(tmp_path / "images" / "a.nii.gz")
    assert by_id["a"].label == str(tmp_path / "labels" / "a.nii.gz")
    assert by_id["b"].label is None  # images without labels are kept (pre-training)
    assert all(c.split is None and c.site == "" and c.patient == "" for c in catalog.cases)


def test_nifti_folder_default_modality_and_no_labels_folder(tmp_path):
    _volume(tmp_path / "images" / "x.nii")
    catalog = read_nifti_folder(tmp_path)
    assert catalog.modality == "other" and catalog.problems == []
    [case] = catalog.cases
    assert case.case_id == "x" and case.label is None


def test_nifti_folder_nnunet_channel_suffix(tmp_path):
    _volume(tmp_path / "images" / "liver_001_0000.nii.gz")
    _volume(tmp_path / "images" / "liver_002_0000.nii.gz")
    _volume(tmp_path / "labels" / "liver_001.nii.gz")
    _volume(tmp_path / "labels" / "liver_002_0000.nii.gz")  # same full name also matches
    catalog = read_nifti_folder(tmp_path)
    assert catalog.problems == []
    assert [(c.case_id, Path(c.label).name) for c in catalog.cases] == [
        ("liver_001", "liver_001.nii.gz"), ("liver_002", "liver_002_0000.nii.gz"),
    ]


def test_nifti_folder_orphan_label_is_a_problem(tmp_path):
    _volume(tmp_path / "images" / "a.nii.gz")
    _volume(tmp_path / "labels" / "a.nii.gz")
    _volume(tmp_path / "labels" / "ghost.nii.gz")
    catalog = read_nifti_folder(tmp_path)
    assert [c.case_id for c in catalog.cases] == ["a"]
    [problem] = catalog.problems
    assert problem.path == str(tmp_path / "labels" / "ghost.nii.gz") and problem.case_id == "ghost"
    assert problem.message == f"label map has no image of the same name in {tmp_path / 'images'}"


def test_nifti_folder_empty_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("x")
    catalog = read_nifti_folder(tmp_path)
    assert catalog.cases == []
    assert [(p.path, p.message) for p in catalog.problems] == [(str(tmp_path / "images"), "holds no .nii or .nii.gz files")]


def test_nifti_folder_duplicate_stem(tmp_path):
    _volume(tmp_path / "images" / "a.nii")
    _volume(tmp_path / "images" / "a.nii.gz")
    catalog = read_nifti_folder(tmp_path)
    assert [c.image for c in catalog.cases] == [str(tmp_path / "images" / "a.nii")]
    [problem] = catalog.problems
    assert (problem.path, problem.message, problem.case_id) == (
        str(tmp_path / "images" / "a.nii.gz"), "case id a is used twice", "a")


def test_nifti_folder_ignores_macos_resource_forks(tmp_path):
    _volume(tmp_path / "images" / "a.nii.gz")
    (tmp_path / "images" / "._a.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    catalog = read_nifti_folder(tmp_path)
    assert [c.case_id for c in catalog.cases] == ["a"]


def test_nifti_folder_site_folders(tmp_path):
    for site in ("north", "south"):
        _volume(tmp_path / site / "images" / "case1.nii.gz")
        _volume(tmp_path / site / "images" / "case2.nii.gz")
    _volume(tmp_path / "south" / "labels" / "case2.nii.gz")
    _volume(tmp_path / "south" / "labels" / "orphan.nii.gz")
    (tmp_path / "docs").mkdir()  # a folder without images/ is not a site
    (tmp_path / "README.md").write_text("sites")
    catalog = read_nifti_folder(tmp_path)
    assert [(c.case_id, c.site) for c in catalog.cases] == [
        ("north/case1", "north"), ("north/case2", "north"), ("south/case1", "south"), ("south/case2", "south"),
    ]
    by_id = {c.case_id: c for c in catalog.cases}
    assert by_id["south/case2"].label == str(tmp_path / "south" / "labels" / "case2.nii.gz")
    assert by_id["north/case2"].label is None
    assert by_id["north/case1"].image == str(tmp_path / "north" / "images" / "case1.nii.gz")
    [problem] = catalog.problems
    assert problem.path == str(tmp_path / "south" / "labels" / "orphan.nii.gz")
    assert "no image of the same name" in problem.message


def test_nifti_folder_without_images_is_fatal(tmp_path):
    (tmp_path / "scans").mkdir()
    _volume(tmp_path / "scans" / "a.nii.gz")
    with pytest.raises(DataError, match="no images/ folder"):
        read_nifti_folder(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        read_nifti_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="not a folder"):
        read_nifti_folder(tmp_path / "scans" / "a.nii.gz")


@pytest.fixture
def scans(tmp_path) -> Path:
    """Five volumes and two label maps, in folders of the user's own naming."""
    for name in ("s1", "s2", "s3", "s4", "s5"):
        _volume(tmp_path / "vol" / f"{name}.nii.gz")
    for name in ("s1", "s2"):
        _volume(tmp_path / "seg" / f"{name}_seg.nii.gz")
    return tmp_path


def test_nifti_folder_csv_manifest(scans):
    (scans / "manifest.csv").write_text(
        "image,label,site,patient,split\n"
        "vol/s1.nii.gz,seg/s1_seg.nii.gz,north,P1,train\n"
        "vol/s2.nii.gz, seg/s2_seg.nii.gz ,north,P1,val\n"  # spaces around a value are trimmed
        "vol/s3.nii.gz,,south,P2,test\n"
        f"{scans / 'vol' / 's4.nii.gz'},,south,,unlabelled\n"  # absolute path
        "vol/s5.nii.gz,,,,\n"
    )
    catalog = read_nifti_folder(scans, manifest=scans / "manifest.csv", modality="mri")
    assert catalog.problems == [] and catalog.modality == "mri"
    rows = [(c.case_id, c.image, c.label, c.site, c.patient, c.split) for c in catalog.cases]
    vol, seg = scans / "vol", scans / "seg"
    assert rows == [
        ("s1", str(vol / "s1.nii.gz"), str(seg / "s1_seg.nii.gz"), "north", "P1", "train"),
        ("s2", str(vol / "s2.nii.gz"), str(seg / "s2_seg.nii.gz"), "north", "P1", "val"),
        ("s3", str(vol / "s3.nii.gz"), None, "south", "P2", "test"),
        ("s4", str(vol / "s4.nii.gz"), None, "south", "", "unlabelled"),
        ("s5", str(vol / "s5.nii.gz"), None, "", "", None),
    ]


def test_nifti_folder_csv_manifest_case_id_column(scans):
    (scans / "list.csv").write_text("case_id,image\nfirst,vol/s1.nii.gz\n,vol/s2.nii.gz\n")
    catalog = read_nifti_folder(scans, manifest=scans / "list.csv")
    assert [c.case_id for c in catalog.cases] == ["first", "s2"]


def test_nifti_folder_json_manifest(scans):
    rows = [
        {"image": "vol/s1.nii.gz", "label": "seg/s1_seg.nii.gz", "site": "north", "patient": 7, "split": "train"},
        {"image": ["vol/s2.nii.gz", "vol/s3.nii.gz"], "label": "seg/s2_seg.nii.gz", "case_id": "two-channel"},
        {"image": "vol/s4.nii.gz", "label": None, "site": None, "split": None},
    ]
    (scans / "manifest.json").write_text(json.dumps(rows))
    catalog = read_nifti_folder(scans, manifest=scans / "manifest.json")
    assert catalog.problems == []
    first, second, third = catalog.cases
    assert (first.case_id, first.site, first.patient, first.split) == ("s1", "north", "7", "train")
    assert first.label == str(scans / "seg" / "s1_seg.nii.gz")
    assert second.case_id == "two-channel"
    assert second.image == (str(scans / "vol" / "s2.nii.gz"), str(scans / "vol" / "s3.nii.gz"))
    assert (third.case_id, third.label, third.site, third.split) == ("s4", None, "", None)


def test_nifti_folder_manifest_unknown_column_is_fatal(scans):
    (scans / "m.csv").write_text("image,label,sex\nvol/s1.nii.gz,,F\n")
    with pytest.raises(DataError, match=r"m\.csv: unknown column\(s\) \['sex'\]"):
        read_nifti_folder(scans, manifest=scans / "m.csv")
    (scans / "m.json").write_text(json.dumps([{"image": "vol/s1.nii.gz", "mask": "seg/s1_seg.nii.gz"}]))
    with pytest.raises(DataError, match=r"m\.json: unknown column\(s\) \['mask'\]"):
        read_nifti_folder(scans, manifest=scans / "m.json")


def test_nifti_folder_manifest_row_problems(scans):
    (scans / "manifest.csv").write_text(
        "image,label,split\n"
        "vol/s1.nii.gz,seg/s1_seg.nii.gz,validation\n"
        "vol/missing.nii.gz,,\n"
        "vol/s2.nii.gz,seg/missing_seg.nii.gz,train\n"
        ",seg/s2_seg.nii.gz,\n"
        "vol/s3.nii.gz,,TEST\n"
        "vol/s4.nii.gz,,train\n"
    )
    catalog = read_nifti_folder(scans, manifest=scans / "manifest.csv")
    assert [c.case_id for c in catalog.cases] == ["s4"]
    manifest = str(scans / "manifest.csv")
    assert [(p.path, p.message, p.case_id) for p in catalog.problems] == [
        (manifest, "manifest.csv row 1: split must be one of train, val, test, unlabelled, got 'validation'", "s1"),
        (str(scans / "vol" / "missing.nii.gz"), "image listed in manifest.csv row 2 does not exist", "missing"),
        (str(scans / "seg" / "missing_seg.nii.gz"), "label listed in manifest.csv row 3 does not exist", "s2"),
        (manifest, "manifest.csv row 4 has no image", ""),
        (manifest, "manifest.csv row 5: split must be one of train, val, test, unlabelled, got 'TEST'", "s3"),
    ]


def test_nifti_folder_manifest_duplicate_case_id(scans):
    (scans / "m.json").write_text(json.dumps([{"image": "vol/s1.nii.gz"}, {"image": "vol/s1.nii.gz"}]))
    catalog = read_nifti_folder(scans, manifest=scans / "m.json")
    assert len(catalog.cases) == 1 and _messages(catalog) == ["case id s1 is used twice"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("absent.csv", None, r"absent\.csv: manifest not found"),
        ("m.csv", "path,label\nvol/s1.nii.gz,\n", "needs a header row with an 'image' column"),
        ("m.csv", "", "needs a header row with an 'image' column"),
        ("m.json", "[{", r"m\.json: not valid JSON"),
        ("m.json", '{"image": "vol/s1.nii.gz"}', "must be a list of objects with an 'image' key"),
        ("m.json", '["vol/s1.nii.gz"]', "must be a list of objects"),
    ],
)
def test_nifti_folder_manifest_fatal_errors(scans, name, content, match):
    if content is not None:
        (scans / name).write_text(content)
    with pytest.raises(DataError, match=match):
        read_nifti_folder(scans, manifest=scans / name)
