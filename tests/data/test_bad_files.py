"""A file that passes the quick checks but fails to load during training never crashes a run.

With data.skip_bad_cases it is left out (one warning, a row in the run's bad_cases.csv) and
training goes on; without, the run stops with one line naming the file, its last checkpoint
resumable. In the training process and in loader workers alike, for pre-training, fine-tuning and
a federated site.
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
from pathlib import Path

import numpy as np

import pytest
import torch
import yaml
from monai.transforms import Compose, LoadImaged

from fedmae.checkpoint import load_checkpoint
from fedmae.cli import main
from fedmae.config import config_from_dict
from fedmae.data.badfiles import BAD_CASES, GuardedLoad, UnloadableFile
from fedmae.data.cohort import load_cohort
from fedmae.engine.finetune import finetune
from fedmae.engine.loop import MetricsLog
from fedmae.engine.pretrain import pretrain
from fedmae.federated.site import SitePretraining
from fedmae.models.factory import build_mae
from fedmae.models.state import encoder_state
from tests.data.builders import write_chestxray14, write_nifti
from tests.tiny import tiny_raw

EPOCHS = 2


def cxr_raw(root: Path, epochs: int = EPOCHS, **data) -> dict:
    return tiny_raw(2, "classification",
                    pretrain={"epochs": epochs, "warmup_epochs": 1, "batch_size": 4},
                    finetune={"epochs": 1, "warmup_epochs": 0, "batch_size": 4},
                    data={"source": "chestxray14", "root": str(root), "partition": "iid", "num_sites": 1,
                          "image_size": [32, 32], "check": "quick", "cache": "none", **data})


@pytest.fixture
def cxr(tmp_path) -> Path:
    return write_chestxray14(tmp_path / "cxr", num_patients=6, images_per_patient=2, size=40)


def truncate(path: str | Path) -> bytes:
    """Cut a PNG in half: its header still reads (data.check: quick passes), its pixels do not."""
    path = Path(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return whole


def image_of(raw: dict, split: str) -> str:
    return load_cohort(config_from_dict(raw)).sites[0].split(split)[0].image


def pretrain_cli(tmp_path: Path, raw: dict, out: str = "pre") -> int:
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(raw))
    return main(["pretrain", "--config", str(config), "--output", str(tmp_path / out)])


def bad_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / BAD_CASES).open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("cache,workers", [("memory", 0), ("disk", 1)])
def test_skip_bad_cases_leaves_the_file_out_and_training_goes_on(tmp_path, cxr, capsys, caplog, cache, workers):
    raw = cxr_raw(cxr, skip_bad_cases=True, cache=cache, cache_dir=str(tmp_path / "cache"), num_workers=workers)
    bad = image_of(raw, "train")
    truncate(bad)
    with caplog.at_level(logging.WARNING, logger="fedmae"):
        assert pretrain_cli(tmp_path, raw) == 0
    captured = capsys.readouterr()
    assert "pre-training done" in captured.out and captured.err == ""
    out = tmp_path / "pre"
    assert [r["epoch"] for r in MetricsLog(out / "metrics.jsonl").read()] == list(range(1, EPOCHS + 1))
    assert load_checkpoint(out / "checkpoint_last.pt")["epoch"] == EPOCHS
    (row,) = bad_rows(out)
    assert row["file"] == bad and row["case_id"] == Path(bad).name
    assert row["problem"].startswith("cannot be read as an image (") and "while loading it for training" in row["problem"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and bad in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings  # once, though every epoch meets it


@pytest.mark.parametrize("workers", [0, 1])
def test_without_skipping_the_run_stops_with_one_line_naming_the_file(tmp_path, cxr, capsys, workers):
    raw = cxr_raw(cxr, num_workers=workers)
    bad = image_of(raw, "train")
    truncate(bad)
    assert pretrain_cli(tmp_path, raw) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith(f"fedmae: error: {bad}: cannot be read as an image (")
    assert "while loading it for training" in captured.err and "--resume" in captured.err
    assert "data.skip_bad_cases: true" in captured.err
    assert not (tmp_path / "pre" / BAD_CASES).exists()


def test_a_file_that_breaks_mid_run_stops_it_resumably(tmp_path, cxr):
    """The run stops at the epoch that meets the file; with the file restored, the resumed run
    ends with the weights of a run that never met it."""
    raw = cxr_raw(cxr)
    cfg = config_from_dict(raw)
    bad = image_of(raw, "train")
    clean = pretrain(cfg, tmp_path / "clean")
    saved: dict[str, bytes] = {}

    def damage(epoch: int, _record: dict) -> None:
        if epoch == 1:
            saved["bytes"] = truncate(bad)

    with pytest.raises(UnloadableFile, match=str(bad)):
        pretrain(cfg, tmp_path / "cut", on_epoch_end=damage)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint_last.pt")["epoch"] == 1
    Path(bad).write_bytes(saved["bytes"])
    resumed = pretrain(cfg, tmp_path / "cut", resume=True)
    assert_same_weights(clean.checkpoint, resumed.checkpoint)


def test_a_run_resumed_while_the_file_is_still_bad_takes_the_uninterrupted_path(tmp_path, cxr):
    raw = cxr_raw(cxr, skip_bad_cases=True)
    cfg = config_from_dict(raw)
    bad = image_of(raw, "train")
    truncate(bad)
    whole = pretrain(cfg, tmp_path / "whole")

    def interrupt(epoch: int, _record: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "cut", on_epoch_end=interrupt)
    resumed = pretrain(cfg, tmp_path / "cut", resume=True)
    assert_same_weights(whole.checkpoint, resumed.checkpoint)
    assert [r["file"] for r in bad_rows(tmp_path / "cut")] == [bad]  # met again after resuming, listed once


def test_finetuning_leaves_a_bad_test_image_out_of_the_metrics(tmp_path, cxr):
    raw = cxr_raw(cxr, skip_bad_cases=True)
    cohort = load_cohort(config_from_dict(raw))
    tests = cohort.sites[0].test
    truncate(tests[0].image)
    result = finetune(config_from_dict(raw), tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "test_metrics.json").read_text())["pooled"]["cases"] == len(tests) - 1
    assert result.metrics["pooled"]["cases"] == len(tests) - 1
    assert [(r["case_id"], r["file"]) for r in bad_rows(tmp_path / "ft")] == [(tests[0].case_id, tests[0].image)]


@pytest.mark.parametrize("skip", [False, True])
def test_a_federated_site_stops_or_goes_on_like_a_centralised_run(tmp_path, cxr, skip):
    cfg = config_from_dict(cxr_raw(cxr, skip_bad_cases=skip))
    cohort = load_cohort(cfg)
    site = cohort.sites[0]
    truncate(site.train[0].image)
    torch.manual_seed(0)
    encoder = encoder_state(build_mae(cfg).state_dict())
    trainer = SitePretraining(cfg, site, cohort.prep, tmp_path / "state")
    if not skip:
        with pytest.raises(UnloadableFile, match=site.train[0].image):
            trainer.train_round(encoder, 1)
        return
    _, metrics = trainer.train_round(encoder, 1)
    assert metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN
    assert [r["file"] for r in bad_rows(tmp_path / "state" / site.name)] == [site.train[0].image]


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_the_loader_names_a_truncated_volume_and_otherwise_the_file_an_error_mentions(tmp_path):
    volume = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    image = write_nifti(tmp_path / "imagesTr" / "case.nii.gz", volume)
    label = write_nifti(tmp_path / "labelsTr" / "case.nii.gz", (volume > 0.5).astype(np.uint8))
    guard = GuardedLoad(Compose([LoadImaged(keys=["image", "label"], image_only=True)]), spatial_dims=3, mark=True)
    assert isinstance(guard({"image": str(image), "label": str(label)}), dict)
    truncate(image)  # the header survives (data.check: quick passes), the voxels do not
    error = guard({"image": str(image), "label": str(label)})
    assert isinstance(error, UnloadableFile) and error.path == str(image)
    assert "cannot be read as NIfTI" in error.reason
    assert pickle.loads(pickle.dumps(error)).args == error.args  # crosses from loader workers intact

    def fails(item):  # both files read fine: the failure is named after the file it mentions
        raise RuntimeError(f"applying transform to {item['label']}") from ValueError("label grid is off")

    good = {"image": str(write_nifti(tmp_path / "imagesTr" / "good.nii.gz", volume)),
            "label": str(write_nifti(tmp_path / "labelsTr" / "good.nii.gz", (volume > 0.5).astype(np.uint8)))}  # same file name
    with pytest.raises(UnloadableFile) as raised:
        GuardedLoad(fails, spatial_dims=3, mark=False)(good)
    assert raised.value.path == good["label"]
    assert raised.value.reason == "failed to load (ValueError: label grid is off)"
