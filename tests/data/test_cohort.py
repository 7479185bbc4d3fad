"""Cohorts from real layouts: sites, splits, split files, bad cases, preprocessing, label safety."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmae.config import config_from_dict
from fedmae.data.badfiles import BAD_CASES
from fedmae.data.catalog import UNLABELLED, DataError
from fedmae.data.cohort import load_cohort
from fedmae.data.datasets import finetuning_dataset, pretraining_dataset
from fedmae.data.report import SPLITS_JSON, SUMMARY
from fedmae.engine.pretrain import pretrain, site_images
from tests.data.builders import write_chestxray14, write_decathlon, write_medmnist
from tests.tiny import tiny_raw


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory) -> Path:
    return write_decathlon(tmp_path_factory.mktemp("ct"), num_training=8, num_test=2)


@pytest.fixture(scope="module")
def cxr_root(tmp_path_factory) -> Path:
    return write_chestxray14(tmp_path_factory.mktemp("cxr"), num_patients=12, images_per_patient=2)


def ct_config(root: Path, task: str = "segmentation", **data):
    return config_from_dict(tiny_raw(3, task, data={"source": "decathlon", "root": str(root), "num_sites": 1, **data}))


def cxr_config(root: Path, **data):
    raw = tiny_raw(2, data={"source": "chestxray14", "root": str(root), "num_sites": 1, **data})
    return config_from_dict(raw)


def ids(cases) -> set[str]:
    return {c.case_id for c in cases}


# ---------------------------------------------------------------------------------------------
# splits


def test_decathlon_splits_keep_unlabelled_images_for_pretraining_only(ct_root):
    cohort = load_cohort(ct_config(ct_root))
    (site,) = cohort.sites
    assert site.name == "decathlon"
    assert len(site.train) + len(site.val) + len(site.test) == 8 and site.val and site.test
    assert ids(site.unlabelled) == {"abdomen_008", "abdomen_009"}  # imagesTs
    pretraining = site_images(cohort.sites, "train")
    assert len(pretraining) == len(site.train) + 2
    assert all(isinstance(p, str) and "labelsTr" not in p for p in pretraining)

    without = load_cohort(ct_config(ct_root, use_unlabelled=False))
    assert not without.sites[0].unlabelled


def test_official_test_list_is_kept_and_validation_is_drawn_from_train_val(cxr_root):
    cohort = load_cohort(cxr_config(cxr_root, val_fraction=0.2))
    (site,) = cohort.sites
    official_test = set((cxr_root / "test_list.txt").read_text().split())
    assert ids(site.test) == official_test
    assert site.val and not ids(site.val) & official_test


def test_a_patient_never_straddles_splits_or_sites(cxr_root):
    for partition in ("iid", "quantity", "dirichlet"):
        cfg = cxr_config(cxr_root, partition=partition, num_sites=2, partition_beta=1.0)
        cohort = load_cohort(cfg)
        where = {}
        for site in cohort.sites:
            for split in ("train", "val", "test"):
                for case in site.split(split):
                    where.setdefault(case.patient, set()).add((site.name, split))
        assert all(len(places) == 1 for places in where.values()), partition
        assert [s.name for s in cohort.sites] == ["site-0", "site-1"]


def test_partitions_are_reproducible_from_the_seed(cxr_root):
    def layout(seed):
        cfg = cxr_config(cxr_root, partition="iid", num_sites=2)
        cfg = config_from_dict({**cfg.to_dict(), "seed": seed})
        return [(s.name, sorted(ids(s.train)), sorted(ids(s.val))) for s in load_cohort(cfg).sites]

    assert layout(0) == layout(0)
    assert layout(0) != layout(1)


def test_natural_partition_from_a_site_column(tmp_path):
    root = write_chestxray14(tmp_path, num_patients=8, sites=["north", "south"])
    cohort = load_cohort(cxr_config(root, num_sites=5))  # natural: the data's own sites, whatever num_sites says
    assert sorted(s.name for s in cohort.sites) == ["north", "south"]


def test_natural_partition_without_sites_asks_what_to_do(cxr_root):
    with pytest.raises(DataError, match="name no sites; set data.partition to iid, dirichlet or quantity"):
        load_cohort(cxr_config(cxr_root, num_sites=3))


def test_too_many_sites_is_a_clear_error(cxr_root):
    with pytest.raises(DataError, match="data.partition iid: .* use fewer sites"):
        load_cohort(cxr_config(cxr_root, partition="iid", num_sites=12))


def test_dirichlet_needs_classification_labels(ct_root):
    with pytest.raises(DataError, match="dirichlet skews classification labels"):
        load_cohort(ct_config(ct_root, partition="dirichlet", num_sites=2))


def test_split_file_is_written_then_reused(cxr_root, tmp_path):
    split_file = tmp_path / "splits.json"
    first = load_cohort(cxr_config(cxr_root, partition="iid", num_sites=2, split_file=str(split_file)))
    assert split_file.is_file()
    saved = json.loads(split_file.read_text())
    assert set(saved["sites"]) == {"site-0", "site-1"}
    # Another seed and partition would draw differently, but the file decides.
    cfg = cxr_config(cxr_root, partition="quantity", num_sites=2, split_file=str(split_file))
    second = load_cohort(config_from_dict({**cfg.to_dict(), "seed": 5}))
    assert [(s.name, ids(s.train), ids(s.val), ids(s.test)) for s in first.sites] == [
        (s.name, ids(s.train), ids(s.val), ids(s.test)) for s in second.sites
    ]


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["sites"]["site-0"]["train"].pop(), "does not place case"),
    (lambda c: c["sites"]["site-0"]["train"].append("ghost.png"), "lists case ghost.png which the data set does not have"),
    (lambda c: c["sites"]["site-0"].update(holdout=[]), "unknown split 'holdout'"),
    (lambda c: c.pop("sites"), "not a fedmae split file"),
])
def test_a_split_file_that_does_not_fit_is_refused(cxr_root, tmp_path, edit, message):
    split_file = tmp_path / "splits.json"
    cfg = cxr_config(cxr_root, partition="iid", num_sites=2, split_file=str(split_file))
    load_cohort(cfg)
    content = json.loads(split_file.read_text())
    edit(content)
    split_file.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message):
        load_cohort(cfg)


def test_reports_are_written_next_to_the_run(ct_root, tmp_path):
    cohort = load_cohort(ct_config(ct_root), report_dir=tmp_path)
    summary = json.loads((tmp_path / SUMMARY).read_text())
    (row,) = summary["sites"]
    assert row["train"] == len(cohort.sites[0].train) and row[UNLABELLED] == 2
    assert row["labels"] == {"background": 8, "liver": 8, "spleen": 8}
    assert row["intensity"]["min"] < -900 and row["intensity"]["max"] > 50  # stored HU, before windowing
    splits = json.loads((tmp_path / SPLITS_JSON).read_text())
    assert sorted(splits["sites"]["decathlon"]["test"]) == sorted(ids(cohort.sites[0].test))


# ---------------------------------------------------------------------------------------------
# bad cases


@pytest.fixture
def ct_missing_one(tmp_path) -> Path:
    root = write_decathlon(tmp_path / "ct", num_training=8, num_test=0)
    (root / "imagesTr" / "abdomen_003.nii.gz").unlink()
    return root


def test_a_bad_case_stops_the_run_with_one_line_naming_the_file(ct_missing_one):
    with pytest.raises(DataError) as err:
        load_cohort(ct_config(ct_missing_one))
    message = str(err.value)
    assert "\n" not in message
    assert "abdomen_003.nii.gz: image listed in dataset.json" in message
    assert "fedmae data inspect" in message and "data.skip_bad_cases" in message


def test_skipping_bad_cases_reports_each_one(ct_missing_one, tmp_path):
    cohort = load_cohort(ct_config(ct_missing_one, skip_bad_cases=True), report_dir=tmp_path / "run")
    everything = ids(cohort.cases("train") + cohort.cases("val") + cohort.cases("test"))
    assert len(everything) == 7 and "abdomen_003" not in everything
    with (tmp_path / "run" / BAD_CASES).open() as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["abdomen_003"]
    assert rows[0]["file"].endswith("abdomen_003.nii.gz") and "does not exist" in rows[0]["problem"]


def test_dimension_mismatch_is_a_data_error(ct_root):
    raw = tiny_raw(2, data={"source": "decathlon", "root": str(ct_root), "num_sites": 1})
    with pytest.raises(DataError, match="the images are 3D but model.name vit_tiny_patch8_2d is 2D"):
        load_cohort(config_from_dict(raw))


def test_classification_of_a_segmentation_set_fails_only_when_fine_tuning(ct_root):
    cohort = load_cohort(ct_config(ct_root, "classification"))  # pre-training needs no labels
    with pytest.raises(DataError, match="no classification labels; set task.type: segmentation"):
        cohort.task


# ---------------------------------------------------------------------------------------------
# preprocessing and targets


def test_ct_is_reoriented_resampled_windowed_and_cropped(ct_root):
    cfg = ct_config(ct_root)
    cohort = load_cohort(cfg)
    assert cohort.prep.spacing == (1.5, 1.5, 2.0) and cohort.prep.normalize == "window"
    whole = finetuning_dataset(cohort.sites[0].val, cohort.task, cfg, cohort.prep, train=False)[0]
    image, label = whole["image"], whole["label"]
    # 40 x 40 x 24 voxels of 2 x 2 x 3 mm resample to about 53 x 53 x 36, then the body is cropped.
    assert image.shape[0] == 1 and 40 <= image.shape[1] <= 54 and 34 <= image.shape[3] <= 37
    assert image.shape == label.shape and type(image) is torch.Tensor
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert set(label.unique().tolist()) == {0, 1, 2}
    crop = pretraining_dataset(site_images(cohort.sites, "train"), cfg, cohort.prep)[0]["image"]
    assert crop.shape == (1, 32, 32, 32)


def test_mri_channels_are_standardised_over_the_brain_and_regions_become_channels(tmp_path):
    root = write_decathlon(tmp_path / "mri", num_training=5, num_test=0, mri=True)
    raw = tiny_raw(3, "segmentation", data={"source": "decathlon", "root": str(root), "num_sites": 1},
                   task={"regions": {"TC": [2, 3], "WT": [1, 2, 3], "ET": [3]}})
    raw["model"]["in_channels"] = 4
    cfg = config_from_dict(raw)
    cohort = load_cohort(cfg)
    assert cohort.catalog.modality == "mri" and cohort.prep.normalize == "zscore_nonzero"
    assert cohort.task.class_names == ("TC", "WT", "ET") and cohort.task.multi_label
    item = finetuning_dataset(cohort.sites[0].val, cohort.task, cfg, cohort.prep, train=False)[0]
    image, target = item["image"], item["label"]
    assert image.shape[0] == 4 and target.shape == (3, *image.shape[1:])
    brain = image[0] != 0
    assert abs(float(image[0][brain].mean())) < 0.05 and abs(float(image[0][brain].std()) - 1) < 0.05
    tc, wt, et = target
    assert bool((et <= tc).all()) and bool((tc <= wt).all())  # ET inside TC inside WT
    assert float(et.sum()) > 0


def test_radiographs_are_grey_resized_and_standardised(cxr_root):
    cfg = cxr_config(cxr_root, image_size=[48, 48])
    cohort = load_cohort(cfg)
    item = finetuning_dataset(cohort.sites[0].val, cohort.task, cfg, cohort.prep, train=False)[0]
    assert item["image"].shape == (1, 32, 32)  # centre crop of the 48 x 48 resize
    assert item["label"].shape == (14,)
    whole = pretraining_dataset([cohort.sites[0].train[0].image], cfg, cohort.prep, train=True)[0]["image"]
    assert whole.shape == (1, 32, 32) and abs(float(whole.mean())) < 1.0


def test_medmnist_multiclass_targets_are_class_indices(tmp_path):
    path = write_medmnist(tmp_path / "pathmnist.npz", dims=2, rgb=True, num_classes=9, size=32)
    raw = tiny_raw(2, data={"source": "medmnist", "root": str(path), "num_sites": 1})
    raw["model"]["in_channels"] = 3
    cfg = config_from_dict(raw)
    cohort = load_cohort(cfg)
    assert not cohort.task.multi_label and cohort.task.num_outputs == 9
    case = cohort.sites[0].train[0]
    item = finetuning_dataset([case], cohort.task, cfg, cohort.prep, train=False)[0]
    assert item["label"].shape == () and int(item["label"]) == int(np.argmax(case.findings))
    assert item["image"].shape == (3, 32, 32)


def test_disk_cache_is_reused_and_keyed_by_the_preprocessing(ct_root, tmp_path):
    cfg = ct_config(ct_root, cache="disk", cache_dir=str(tmp_path / "cache"))
    cohort = load_cohort(cfg)
    images = site_images(cohort.sites, "val")
    first = pretraining_dataset(images, cfg, cohort.prep, train=False)[0]["image"]
    folders = list((tmp_path / "cache").iterdir())
    assert [f.name for f in folders] == [cohort.prep.key()] and list(folders[0].glob("*.pt"))
    # The cropped volume is stored, not the whole pre-crop volume it was a view of.
    (stored,) = folders[0].glob("*.pt")
    cached = torch.load(stored, weights_only=True)["image"]
    assert stored.stat().st_size < 1.1 * cached.numel() * 4 + 4096
    again = pretraining_dataset(images, cfg, cohort.prep, train=False)[0]["image"]
    assert torch.equal(first, again)
    other = load_cohort(ct_config(ct_root, cache="disk", cache_dir=str(tmp_path / "cache"), window=[-100.0, 200.0]))
    assert other.prep.key() != cohort.prep.key()


def test_pretraining_from_files_never_opens_a_label_file(tmp_path):
    root = write_decathlon(tmp_path / "ct", num_training=6, num_test=1)
    cfg = ct_config(root, "segmentation")
    cfg = config_from_dict({**cfg.to_dict(), "pretrain": {**cfg.to_dict()["pretrain"], "epochs": 1, "warmup_epochs": 0}})
    cohort = load_cohort(cfg)  # checks read the label maps once, to validate them ...
    for label in (root / "labelsTr").iterdir():
        label.unlink()  # ... and pre-training must not need them at all
    result = pretrain(cfg, tmp_path / "run", cohort=cohort)
    assert result.metrics["epoch"] == 1


def test_a_subset_of_the_findings_becomes_the_task(cxr_root):
    raw = tiny_raw(2, data={"source": "chestxray14", "root": str(cxr_root), "num_sites": 1, "image_size": [32, 32]},
                   task={"findings": ["Effusion", "Atelectasis"]})
    cohort = load_cohort(config_from_dict(raw))
    everything = load_cohort(config_from_dict(tiny_raw(2, data=raw["data"])))
    assert cohort.task.class_names == ("Effusion", "Atelectasis")
    columns = [everything.task.class_names.index(name) for name in ("Effusion", "Atelectasis")]
    dataset = finetuning_dataset(cohort.cases("train"), cohort.task, config_from_dict(raw), cohort.prep, train=False)
    for case, item in zip(cohort.cases("train"), dataset):
        np.testing.assert_array_equal(np.asarray(item["label"]), np.asarray(case.findings, dtype=np.float32)[columns])
    raw["task"]["findings"] = ["Effusion", "Fracture of the moon"]
    with pytest.raises(DataError, match="task.findings: 'Fracture of the moon' is not one of the data's findings"):
        _ = load_cohort(config_from_dict(raw)).task
