"""Real layouts through the command line: a YAML pointing at the data is all a user writes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.data.builders import plant_faults, write_chestxray14, write_decathlon
from tests.command_line import fedmae, write_config
from tests.tiny import tiny_raw

BUDGET = {"pretrain": {"epochs": 2, "warmup_epochs": 1, "batch_size": 4},
          "finetune": {"epochs": 2, "warmup_epochs": 1, "batch_size": 4}}


def run_pretrain_and_finetune(tmp_path: Path, raw: dict) -> dict:
    config = write_config(tmp_path, raw)
    pre = fedmae("pretrain", "--config", str(config), "--output", "pre", cwd=tmp_path)
    assert pre.returncode == 0, pre.stderr
    assert (tmp_path / "pre/checkpoint_last.pt").is_file() and (tmp_path / "pre/splits.json").is_file()
    ft = fedmae("finetune", "--config", str(config), "--encoder", "pre/checkpoint_last.pt", "--output", "ft", cwd=tmp_path)
    assert ft.returncode == 0, ft.stderr
    assert "best checkpoint (selected on validation)" in ft.stdout
    # Fine-tuning drew the same splits as pre-training (same seed, same data).
    assert json.loads((tmp_path / "pre/splits.json").read_text()) == json.loads((tmp_path / "ft/splits.json").read_text())
    return json.loads((tmp_path / "ft/test_metrics.json").read_text())


@pytest.mark.slow
def test_decathlon_folder_pretrains_and_finetunes_from_a_yaml(tmp_path):
    write_decathlon(tmp_path / "data" / "Task09_Abdomen", num_training=8, num_test=2)
    raw = tiny_raw(3, "segmentation", **BUDGET,
                   data={"source": "decathlon", "root": "data/Task09_Abdomen", "num_sites": 1,
                         "rotate_prob": 0.2, "intensity_prob": 0.1})
    report = run_pretrain_and_finetune(tmp_path, raw)
    assert set(report["pooled"]["per_class"]["dice"]) == {"liver", "spleen"}
    assert list(report["sites"]) == ["decathlon"]


@pytest.mark.slow
def test_chestxray14_folder_pretrains_and_finetunes_from_a_yaml(tmp_path):
    write_chestxray14(tmp_path / "cxr", num_patients=12, images_per_patient=2, size=48)
    raw = tiny_raw(2, "classification", **BUDGET,
                   data={"source": "chestxray14", "root": str(tmp_path / "cxr"), "partition": "iid", "num_sites": 2,
                         "image_size": [40, 40]})
    report = run_pretrain_and_finetune(tmp_path, raw)
    assert len(report["pooled"]["per_class"]["auc"]) == 14
    assert set(report["sites"]) == {"site-0", "site-1"}


def test_inspect_reports_every_planted_fault(tmp_path):
    root = write_decathlon(tmp_path / "broken")
    planted = plant_faults(root)
    result = fedmae("data", "inspect", str(root), "--problems", str(tmp_path / "problems.csv"), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    for where, fragment in planted.items():
        lines = [line for line in result.stdout.splitlines() if where in line and fragment in line]
        assert lines, f"inspect did not report {where}: {fragment}\n{result.stdout}"
    with (tmp_path / "problems.csv").open() as f:
        assert len(list(csv.DictReader(f))) >= len(planted)


def test_inspect_on_a_clean_set_exits_zero_and_describes_it(tmp_path):
    root = write_decathlon(tmp_path / "ct", num_training=4, num_test=1)
    result = fedmae("data", "inspect", str(root), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "decathlon, ct, 3D" in out and "spacings (mm): (2.0, 2.0, 3.0) x5" in out
    assert "labels (cases showing each): background 4, liver 4, spleen 4" in out
    assert "no problems found" in out


def test_inspect_a_config_shows_its_sites_and_a_broken_set_stops_training(tmp_path):
    root = write_decathlon(tmp_path / "ct", num_training=8, num_test=0)
    raw = tiny_raw(3, "segmentation", **BUDGET, data={"source": "decathlon", "root": str(root),
                                                      "partition": "iid", "num_sites": 2})
    config = write_config(tmp_path, raw)
    result = fedmae("data", "inspect", str(config), cwd=tmp_path)
    assert result.returncode == 0 and "site-0" in result.stdout and "site-1" in result.stdout

    (root / "imagesTr" / "abdomen_002.nii.gz").write_bytes(b"not a nifti")
    pre = fedmae("pretrain", "--config", str(config), "--output", "pre", cwd=tmp_path)
    assert pre.returncode == 2
    (error,) = [line for line in pre.stderr.splitlines() if line.startswith("fedmae: error:")]
    assert "abdomen_002.nii.gz: cannot be read as NIfTI" in error and "data.skip_bad_cases" in error
    assert not (tmp_path / "pre" / "checkpoint_last.pt").exists()


def test_inspect_reports_faults_planted_in_a_chestxray14_copy(tmp_path):
    root = write_chestxray14(tmp_path / "cxr", num_patients=6, images_per_patient=2)
    pngs = {p.name: p for p in root.rglob("*.png")}
    pngs["00000001_000.png"].unlink()  # listed, missing
    truncated = pngs["00000002_000.png"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    table = root / "Data_Entry_2017.csv"
    lines = table.read_text().splitlines()
    lines[5] = lines[5].replace(lines[5].split(",")[1], "Cardiomegally", 1)  # misspelt finding
    table.write_text("\n".join(lines) + "\n")
    (root / "stray.png").write_bytes(pngs["00000003_000.png"].read_bytes())  # on disk, not in the table
    name_5 = lines[5].split(",")[0]

    result = fedmae("data", "inspect", str(root), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert "00000001_000.png listed in Data_Entry_2017.csv but not found" in out
    assert "00000002_000.png: cannot be read as an image" in out
    assert f"{name_5}: unknown finding 'Cardiomegally'" in out
    assert "stray.png: PNG not listed in Data_Entry_2017.csv" in out


def test_inspect_says_what_a_run_would_do_and_does_none_of_it(tmp_path, monkeypatch, capsys, caplog):
    from fedmae.cli import main

    monkeypatch.chdir(tmp_path)
    root = write_decathlon(tmp_path / "ct", num_training=8, num_test=0)
    (root / "imagesTr" / "abdomen_002.nii.gz").write_bytes(b"not a nifti")
    assert main(["data", "inspect", str(root)]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == (
        "a run would stop at the first problem; with data.skip_bad_cases: true it would leave these 1 case(s) out "
        "(as the sites table above does) and list them in bad_cases.csv; inspect itself only reports and writes no "
        "bad_cases.csv")

    raw = tiny_raw(3, "segmentation", **BUDGET, data={"source": "decathlon", "root": str(root), "partition": "iid",
                                                      "num_sites": 2, "skip_bad_cases": True})
    assert main(["data", "inspect", str(write_config(tmp_path, raw))]) == 1
    assert "this config has data.skip_bad_cases: true, so a run would leave these 1 case(s) out" in capsys.readouterr().out
    # Nothing was left out of anything or written: no warning saying so, no bad_cases.csv, no split file.
    assert not [r for r in caplog.records if "leaving out" in r.getMessage()]
    assert not list(tmp_path.rglob("bad_cases.csv")) and [p.name for p in tmp_path.rglob("*.json")] == ["dataset.json"]


def test_inspect_of_a_folder_honours_set(tmp_path, capsys):
    from fedmae.cli import main

    root = write_decathlon(tmp_path / "ct", num_training=8, num_test=0)
    (root / "imagesTr" / "abdomen_002.nii.gz").write_bytes(b"not a nifti")
    assert main(["data", "inspect", str(root), "--set", "data.skip_bad_cases=true"]) == 1
    assert "this config has data.skip_bad_cases: true" in capsys.readouterr().out
    assert main(["data", "inspect", str(root), "--set", "data.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set data.bogus=1" in err and "unknown key" in err
