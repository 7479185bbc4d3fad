"""`fedmae compare` end to end on tiny budgets: every arm, the report, resuming a stopped comparison."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import statistics
from pathlib import Path

import pytest
from PIL import Image

from fedmae.checkpoint import load_checkpoint
from fedmae.comparison.arms import ARM_TITLES
from fedmae.comparison.report import PAIRS, cell
from tests.command_line import fedmae, flower_processes, write_config
from tests.tiny import tiny_raw


def comparison_config(tmp_path: Path, tracking: dict | None = None, **compare) -> Path:
    raw = tiny_raw(2, data={"num_sites": 2, "cases_per_site": 10}, pretrain={"epochs": 2, "warmup_epochs": 1},
                   finetune={"epochs": 2, "warmup_epochs": 1}, federated={"min_sites": 2, "round_timeout": 300},
                   compare={"reconstructions": 2, **compare}, **({"tracking": tracking} if tracking else {}))
    return write_config(tmp_path, raw)


def table_rows(report: str, table: int = 0) -> dict[str, list[str]]:
    """One of the report's tables (0: the main table, 1: the paired differences): first cell -> the others."""
    tables, previous = [], ""
    for line in report.splitlines():
        if line.startswith("| "):
            if not previous.startswith("| "):
                tables.append([])
            tables[-1].append([c.strip() for c in line.strip("|").split("|")])
        previous = line
    return {cells[0]: cells[1:] for cells in tables[table][2:]}


def check_report(out: Path, arms: list[str], seeds: list[int]) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["seed"], r["arm"]) for r in results["runs"]) == sorted((s, a) for s in seeds for a in arms)
    summary = results["summary"]
    main, sites = summary["main"], summary["sites"]
    assert main == "mean_auc" and sites == ["site-0", "site-1"]
    # The table shows exactly the numbers in results.json.
    rows = table_rows((out / "report.md").read_text())
    titles = {"centralised": "centralised", "federated": "federated (FedAvg)", "local": "local only", "none": "no pre-training"}
    assert set(rows) == {titles[a] for a in arms}
    for arm in arms:
        entry, shown = summary["arms"][arm], rows[titles[arm]]
        assert shown[0] == cell(entry["pooled"][main])
        assert shown[1:3] == [cell(entry["sites"][s][main]) for s in sites]
        assert shown[3] == cell(entry["final_val_loss"], digits=4)
        runs = [r["pooled"][main] for r in results["runs"] if r["arm"] == arm]
        if entry["pooled"][main]["mean"] is not None:
            assert float(shown[0].split(" ")[0]) == pytest.approx(sum(runs) / len(runs), abs=5e-4)
        assert (len(seeds) > 1) == ("±" in shown[0])
    assert (out / "report.md").read_text().count("![") == 3
    check_paired_differences(out, results, seeds)
    # Every run's figures are in the CSV, one row per seed, arm, site and metric.
    with (out / "results.csv").open() as f:
        rows_csv = list(csv.DictReader(f))
    for r in results["runs"]:
        value = next(row["value"] for row in rows_csv if (row["seed"], row["arm"], row["site"], row["metric"]) ==
                     (str(r["seed"]), r["arm"], "pooled", main))
        assert value == "" if r["pooled"][main] is None else float(value) == pytest.approx(r["pooled"][main])
    for name in ("pretrain_loss", "downstream", "reconstructions"):
        with Image.open(out / "plots" / f"{name}.png") as image:
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200
    return results


def check_paired_differences(out: Path, results: dict, seeds: list[int]) -> None:
    """results.json and report.md hold the per-seed differences between arms, computed from the
    per-seed pooled results, their mean +- std, the seeds agreeing in sign, and a reading that calls
    a difference beyond the seed spread only when it is."""
    main = results["summary"]["main"]
    pooled = {(r["seed"], r["arm"]): r["pooled"][main] for r in results["runs"]}
    arms = {r["arm"] for r in results["runs"]}
    paired = results["summary"]["paired"]
    expected = [(a, b) for a, b in PAIRS if {a, b} <= arms]
    assert sorted(paired) == sorted(f"{a}-{b}" for a, b in expected)
    report = (out / "report.md").read_text()
    paired_rows = table_rows(report, table=1)
    for a, b in expected:
        p = paired[f"{a}-{b}"]
        diffs = [pooled[s, a] - pooled[s, b] for s in seeds]
        assert [p["per_seed"][str(s)] for s in seeds] == pytest.approx(diffs)
        assert p["mean"] == pytest.approx(statistics.fmean(diffs)) and p["n"] == len(seeds)
        assert p["std"] == pytest.approx(statistics.stdev(diffs) if len(seeds) > 1 else 0.0)
        agree = sum(1 for d in diffs if d * p["mean"] > 0)
        assert p["agree"] == agree
        beyond = len(seeds) > 1 and agree == len(seeds) and abs(p["mean"]) > p["std"]
        assert p["beyond_spread"] == beyond
        row = paired_rows[f"{ARM_TITLES[a]} − {ARM_TITLES[b]}"]
        assert row[:len(seeds)] == [f"{d:+.3f}" for d in diffs]
        assert row[len(seeds)].startswith(f"{p['mean']:+.3f}") and row[-1] == f"{agree}/{len(seeds)}"
    if ("centralised", "none") in expected:
        sentence = re.search(r"Centralised pre-training minus no pre-training: [^(]*\(([^)]*)\)", report).group(1)
        if len(seeds) == 1:
            assert "single seed" in sentence
        else:
            assert ("beyond the seed spread" in sentence) == paired["centralised-none"]["beyond_spread"]
            assert ("within the seed spread" in sentence) != paired["centralised-none"]["beyond_spread"]


@pytest.mark.slow
def test_compare_runs_every_arm_with_flower_writes_the_report_and_tracks_it_all_in_one_mlflow_store(tmp_path, capfd):
    """Every arm, two at a time (one per core), the federated one on Flower; with MLflow tracking,
    which the arms' worker processes and Flower's ServerApp all write into the comparison's one
    store. (One comparison for both: each pays a Flower start.)"""
    before = flower_processes()
    config = comparison_config(tmp_path, tracking={"backend": "mlflow"})
    result = fedmae("compare", "--config", str(config), "--output", "cmp", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "cmp"
    results = check_report(out, ["centralised", "federated", "local", "none"], [0])
    # The federated arm ran on Flower: global checkpoints per round, each site's rounds logged.
    assert (out / "seed-0/federated/flower/global/pretrain_last.pt").is_file()
    rounds = [json.loads(line) for line in (out / "seed-0/federated/flower/rounds.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"]) for r in rounds if r.get("status") == "ok"} == {
        (1, "site-0"), (1, "site-1"), (2, "site-0"), (2, "site-1")}
    federated = next(r for r in results["runs"] if r["arm"] == "federated")
    assert [p["epoch"] for p in federated["pretrain_curve"]] == [1, 2]
    assert "none" in [r["arm"] for r in results["runs"]] and next(
        r for r in results["runs"] if r["arm"] == "none")["pretrain_curve"] == []
    # The progress display; the comparison's worker processes print it on the process's stderr.
    assert re.search(r"seed 0 \| federated \(FedAvg\) \| pre-training round 2/2", result.stderr + capfd.readouterr().err)
    assert "| centralised |" in result.stdout and "report:" in result.stdout
    assert flower_processes() == before, "a Flower or Ray process outlived the comparison"
    check_tracked_in_mlflow(out, result.stdout, tmp_path)


def check_tracked_in_mlflow(out: Path, printed: str, tmp_path: Path) -> None:
    """Every run of the comparison is in its one MLflow store, finished: each arm's pre-training
    (the federated arm's is its ServerApp's, which ran in Flower's process) and each site's
    fine-tuning; and the outcome: each arm's test figure, the table and the figures."""
    from tests.tracking.reading import artifacts, history, runs_by_name, store

    client = store(out / "mlruns")
    runs = runs_by_name(client, "tiny2d")
    sites = ("site-0", "site-1")
    arms = ("centralised", "federated", "local", "none")
    assert set(runs) == {"tiny2d/compare", "tiny2d/seed-0/centralised/pretrain", "tiny2d/seed-0/federated/flower",
                         *(f"tiny2d/seed-0/local/pretrain/{s}" for s in sites),
                         *(f"tiny2d/seed-0/{arm}/finetune/{s}" for arm in arms for s in sites)}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    flower = runs["tiny2d/seed-0/federated/flower"].info.run_id
    assert set(history(client, flower, "pretrain-sites/site-1/update_norm")) == {1, 2}
    assert [p.relative_to(out) for p in out.rglob("mlflow.db")] == [Path("mlruns/mlflow.db")]  # one store for all
    summary = json.loads((out / "results.json").read_text())["summary"]
    outcome = runs["tiny2d/compare"].info.run_id
    for arm in arms:  # at step 4: the runs summarised (4 arms, 1 seed)
        assert history(client, outcome, f"compare/{arm}/test_mean_auc") == {
            4: pytest.approx(summary["arms"][arm]["pooled"]["mean_auc"]["mean"])}
    assert {"compare/table.md", "compare/reconstructions.png", "compare/pretrain_loss.png",
            "compare/downstream.png"} <= artifacts(client, outcome)
    table = Path(client.download_artifacts(outcome, "compare/table.md", str(tmp_path))).read_text()
    assert "| federated (FedAvg) |" in table and table in printed


@pytest.mark.slow
def test_several_seeds_give_mean_and_std_and_a_stopped_comparison_resumes(tmp_path):
    config = comparison_config(tmp_path, arms=["centralised", "local", "none"], seeds=[0, 1])
    first = fedmae("compare", "--config", str(config), "--output", "cmp", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "cmp"
    check_report(out, ["centralised", "local", "none"], [0, 1])
    # Stop it "during" seed 1's local arm: that arm's result is gone, its checkpoints remain.
    (out / "seed-1/local/result.json").unlink()
    (out / "seed-1/none/result.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    again = fedmae("compare", "--config", str(config), "--output", "cmp", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier; skipped") == 4
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished arms were not redone
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # the stopped arm resumed, nothing retrained
    assert (out / "seed-1/local/result.json").is_file() and (out / "seed-1/none/result.json").is_file()
    check_report(out, ["centralised", "local", "none"], [0, 1])
    # A rerun with a different experiment is refused in one line; adding a seed is not a different experiment.
    changed = fedmae("compare", "--config", str(config), "--output", "cmp", "--set", "pretrain.epochs=3", cwd=tmp_path)
    assert changed.returncode == 2 and "pretrain.epochs" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1


def test_compare_config_mistakes_are_one_line(tmp_path):
    config = comparison_config(tmp_path)
    for setting, expected in (("compare.finetune=federated", "compare.finetune: federated fine-tuning starts"),
                              ("compare.arms=[central]", "compare.arms: needs distinct arms from centralised"),
                              ("compare.seeds=[1, 1]", "compare.seeds: needs one or more distinct seeds")):
        result = fedmae("compare", "--config", str(config), "--output", "cmp", "--set", setting, cwd=tmp_path)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_federated_fine_tuning_protocol_runs_every_arm_on_flower(tmp_path, capfd):
    config = comparison_config(tmp_path, arms=["federated", "none"], finetune="federated", reconstructions=0)
    result = fedmae("compare", "--config", str(config), "--output", "cmp", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "cmp"
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"]: r["finetune"] for r in results["runs"]} == {"federated": "federated", "none": "federated"}
    # The federated arm fine-tuned in its own Flower run; the none arm from a random encoder in another.
    assert (out / "seed-0/federated/flower/global/finetune_best.pt").is_file()
    none_run = json.loads((out / "seed-0/none/flower-finetune/summary.json").read_text())
    assert none_run["pretrain"] == {"start_from": "random"} and not list((out / "seed-0/none/flower-finetune/global").glob("pretrain_*"))
    for r in results["runs"]:
        assert set(r["sites"]) == {"site-0", "site-1"}
    assert "fine-tuning round 2/2" in result.stderr + capfd.readouterr().err  # from a worker process
    assert "MAE reconstructions" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_runs_in_worker_processes_give_the_sequential_results_to_the_bit(tmp_path):
    # One thread per run both ways, so each run computes exactly the same; the local arm's sites and
    # every site's fine-tuning run at once in the parallel comparison.
    import torch

    from fedmae.comparison.run import compare
    from fedmae.config import load_config

    config = comparison_config(tmp_path, arms=["centralised", "local", "none"], reconstructions=0)
    cfg = load_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sequential = compare(dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, parallel=1)),
                             tmp_path / "sequential")
    finally:
        torch.set_num_threads(threads)
    parallel = compare(dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, parallel=2)),
                       tmp_path / "parallel", threads=1)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in sequential]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in parallel]
    for checkpoint in (tmp_path / "sequential").rglob("checkpoint_*.pt"):
        twin = tmp_path / "parallel" / checkpoint.relative_to(tmp_path / "sequential")
        a, b = load_checkpoint(checkpoint)["model"], load_checkpoint(twin)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), checkpoint


def test_progress_clock_counts_whole_minutes_and_seconds(monkeypatch):
    import io
    import time

    from fedmae.comparison.run import ProgressLine

    stream = io.StringIO()
    line = ProgressLine(stream, started=1000.0).at(0, "local")
    for now in (1659.7, 1660.2):
        monkeypatch.setattr(time, "monotonic", lambda now=now: now)
        line("x")
    assert stream.getvalue().splitlines() == ["[ 10:59] seed 0 | local only | x", "[ 11:00] seed 0 | local only | x"]


@pytest.mark.slow
def test_demo_runs_several_seeds_and_reports_paired_differences(tmp_path):
    # The demo's pipeline (`fedmae demo`) on a tiny config with two seeds: the printed tables are
    # results.json's, and the paired differences are computed from the per-seed results.
    raw = tiny_raw(2, "segmentation", pretrain={"epochs": 2}, finetune={"epochs": 2},
                   compare={"arms": ["centralised", "none"], "seeds": [0, 1], "reconstructions": 1})
    result = fedmae("demo", "--config", str(write_config(tmp_path, raw)), "--output", "demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    results = json.loads((out / "results.json").read_text())
    for arm, title in (("centralised", "centralised"), ("none", "no pre-training")):
        score = results["summary"]["arms"][arm]["pooled"]["mean_dice"]
        shown = next(line for line in result.stdout.splitlines() if line.startswith(f"| {title} |"))
        assert f"{score['mean']:.3f} ± {score['std']:.3f}" in shown
    check_paired_differences(out, results, [0, 1])
    assert "| centralised − no pre-training |" in result.stdout  # the paired table is printed too
    assert f"report: {out / 'report.md'}" in result.stdout

