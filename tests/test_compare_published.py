"""`fedmae compare` with ``compare.paper``: the paper's published figures beside the run's."""

from __future__ import annotations

import json

import pytest

from fedmae.comparison.published import PUBLISHED, check_paper
from fedmae.comparison.report import POOLED, cell, summarise, tables
from tests.command_line import fedmae, write_config
from tests.tiny import tiny_config, tiny_raw

PAPER_ROWS = ("no pre-training", "MAE self pre-training (centralised)", "gain")


def paper_rows(text: str) -> dict[str, list[str]]:
    """The rows of the paper's table in ``text`` (report.md or the printed tables): first cell -> the others."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| the paper's figures"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def run(arm: str, seed: int, value: float, main: str) -> dict:
    """One (seed, arm) result as the comparison records it."""
    return {"arm": arm, "seed": seed, "main": main, "sites": {"site-0": {main: value}}, "pooled": {main: value},
            "final_val_loss": None, "seconds": {"pretrain": 0.0, "total": 0.0}}


def test_the_papers_dice_and_gain_stand_beside_the_runs():
    cfg = tiny_config(2, "segmentation", compare={"arms": ["centralised", "none"], "seeds": [0, 1], "paper": "btcv"})
    results = [run("none", 0, 0.50, "mean_dice"), run("none", 1, 0.52, "mean_dice"),
               run("centralised", 0, 0.55, "mean_dice"), run("centralised", 1, 0.56, "mean_dice")]
    summary = summarise(results, cfg)
    assert summary["paper"]["scratch"] == 0.788 and summary["paper"]["mae"] == 0.835
    rows = paper_rows(tables(summary))
    assert list(rows) == list(PAPER_ROWS)
    assert rows["no pre-training"] == ["0.788", cell(summary["arms"]["none"][POOLED]["mean_dice"])] == ["0.788", "0.510 ± 0.014"]
    assert rows["MAE self pre-training (centralised)"] == ["0.835", "0.555 ± 0.007"]
    # Published: 0.835 - 0.788 = +0.047, +6.0 % of 0.788; this run: paired per seed, +0.045 = +8.8 % of 0.510.
    assert rows["gain"] == ["+0.047 (+6.0%)", "+0.045 ± 0.007 (+8.8%)"]
    assert "arXiv 2203.05573" in tables(summary)


def test_chestxray14_has_only_the_stated_gain():
    cfg = tiny_config(2, compare={"arms": ["centralised", "none"], "paper": "chestxray14"})
    summary = summarise([run("none", 0, 0.70, "mean_auc"), run("centralised", 0, 0.77, "mean_auc")], cfg)
    rows = paper_rows(tables(summary))
    assert rows["no pre-training"] == ["not published", "0.700"]
    assert rows["MAE self pre-training (centralised)"] == ["not published", "0.770"]
    assert rows["gain"] == [PUBLISHED["chestxray14"].gain, "+0.070 (+10.0%)"]


def test_no_paper_table_without_compare_paper():
    cfg = tiny_config(2, compare={"arms": ["centralised", "none"]})
    summary = summarise([run("none", 0, 0.70, "mean_auc"), run("centralised", 0, 0.77, "mean_auc")], cfg)
    assert summary["paper"] is None and "the paper's figures" not in tables(summary)


@pytest.mark.parametrize("task_type,compare,expected", [
    ("classification", {"paper": "btcv"}, "compare.paper: btcv's published figures are mean_dice"),
    ("segmentation", {"paper": "chestxray14"}, "compare.paper: chestxray14's published figures are mean_auc"),
    ("segmentation", {"paper": "brats", "arms": ["federated", "local"]}, "add none and centralised to compare.arms"),
])
def test_paper_figures_that_do_not_fit_the_comparison_are_refused(task_type, compare, expected):
    with pytest.raises(ValueError, match=expected) as err:
        check_paper(tiny_config(2, task_type, compare=compare))
    assert "\n" not in str(err.value)


def test_compare_refuses_them_before_writing_anything(tmp_path):
    config = write_config(tmp_path, tiny_raw(2, compare={"arms": ["centralised", "none"], "paper": "brats"}))
    result = fedmae("compare", "--config", str(config), "--output", "cmp", cwd=tmp_path)
    assert result.returncode == 2 and "compare.paper: brats's published figures are mean_dice" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_a_comparison_prints_and_reports_the_papers_figures_beside_its_own(tmp_path):
    raw = tiny_raw(2, "segmentation", data={"num_sites": 2, "cases_per_site": 8}, pretrain={"epochs": 1, "warmup_epochs": 0},
                   finetune={"epochs": 1, "warmup_epochs": 0},
                   compare={"arms": ["centralised", "none"], "paper": "btcv", "reconstructions": 0, "parallel": 1})
    result = fedmae("compare", "--config", str(write_config(tmp_path, raw)), "--output", "cmp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "cmp"
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["paper"]["data"] == "btcv" and summary["paper"]["scratch"] == 0.788
    report, printed = paper_rows((out / "report.md").read_text()), paper_rows(result.stdout)
    assert report == printed
    assert report["no pre-training"] == ["0.788", cell(summary["arms"]["none"][POOLED]["mean_dice"])]
    assert report["MAE self pre-training (centralised)"] == ["0.835", cell(summary["arms"]["centralised"][POOLED]["mean_dice"])]
    assert report["gain"][0] == "+0.047 (+6.0%)"
    assert report["gain"][1].startswith(f"{summary['paired']['centralised-none']['mean']:+.3f}")
