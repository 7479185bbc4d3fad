"""`fedmae compare`: every pre-training arm, then one fine-tuning protocol, per seed; resumable.

Layout of the output folder::

    config.yaml                    the resolved experiment (a rerun must match it)
    seed-<S>/                      splits.json, data_summary.json of that seed's data
    seed-<S>/<arm>/                the arm's runs (pre-training, fine-tuning) and result.json
    results.json, results.csv, report.md, plots/

An arm whose ``result.json`` exists is finished and is not run again; an arm that was stopped
resumes its runs from their last checkpoints. Each seed is a full replicate: its own splits,
initial weights and training randomness.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fedmae.checkpoint import atomic_write_text
from fedmae.comparison import arms, plots
from fedmae.comparison.arms import ARM_TITLES
from fedmae.comparison.report import main_table, summarise, write_report
from fedmae.config import ExperimentConfig
from fedmae.data.cohort import Cohort, load_cohort
from fedmae.engine.finetune import finetune
from fedmae.engine.runs import check_resume_config
from fedmae.evaluation import finite_or_null, weighted_mean
from fedmae.federated.site import scalar_metrics

log = logging.getLogger(__name__)

class ProgressLine:
    """One line per event on stderr: which seed, arm, round or epoch and site is running."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.started = stream, time.monotonic()
        self.where = ""

    def at(self, seed: int, arm: str) -> Callable[[str], None]:
        self.where = f"seed {seed} | {ARM_TITLES[arm]}"
        return self

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed // 60:3.0f}:{elapsed % 60:02.0f}] {self.where} | {message}", file=self.stream, flush=True)


def run_comparison(cfg: ExperimentConfig, config_path: Path, overrides: list[str], out: Path) -> Path:
    """Every arm (resuming), then the report and plots; prints the table; returns report.md."""
    out = Path(out).absolute()
    cohorts: dict[int, Cohort] = {}
    results = compare(cfg, config_path, overrides, out, cohorts=cohorts)
    figures = {
        "Pre-training loss": plots.pretraining_curves(results, out / "plots" / "pretrain_loss.png"),
        "Downstream metric per site and arm": plots.downstream(results, cfg, out / "plots" / "downstream.png"),
    }
    first = dataclasses.replace(cfg, seed=cfg.compare.seeds[0])
    if cfg.compare.reconstructions:
        cohort = cohorts.get(first.seed) or load_cohort(first)  # loaded and checked once when an arm ran
        figure = plots.reconstruction_figure(first, cohort, out / f"seed-{first.seed}", out / "plots" / "reconstructions.png")
        if figure is not None:
            figures["MAE reconstructions"] = figure
    report = write_report(out, results, cfg, figures)
    print()
    print(main_table(summarise(results, cfg)))
    print()
    print(f"report: {report} (results.json, results.csv, plots/)")
    return report


def compare(cfg: ExperimentConfig, config_path: Path, overrides: list[str], out: Path,
            progress: ProgressLine | None = None, cohorts: dict[int, Cohort] | None = None) -> list[dict[str, Any]]:
    """Run (or finish) every arm for every seed; returns one result per (seed, arm). ``cohorts``
    receives each seed's data where it had to be loaded."""
    cohorts = {} if cohorts is None else cohorts
    progress = progress or ProgressLine()
    out = Path(out).absolute()
    _claim(out, cfg)
    results = []
    for seed in cfg.compare.seeds:
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        seed_dir = out / f"seed-{seed}"
        for arm in cfg.compare.arms:
            done = seed_dir / arm / "result.json"
            report = progress.at(seed, arm)
            if done.is_file():
                report("finished earlier; skipped")
                results.append(json.loads(done.read_text()))
                continue
            if seed not in cohorts:
                cohorts[seed] = load_cohort(seed_cfg, report_dir=seed_dir)
            result = run_arm(arm, seed_cfg, cohorts[seed], seed_dir / arm, config_path, overrides, report)
            atomic_write_text(done, json.dumps(result, indent=2, allow_nan=False))
            report(f"done: test {result['main']} {_fmt(result['pooled'][result['main']])} (pooled over sites)")
            results.append(result)
    return results


def run_arm(arm: str, cfg: ExperimentConfig, cohort: Cohort, folder: Path, config_path: Path, overrides: list[str],
            progress: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    protocol = cfg.compare.finetune
    if arm == "federated":
        pre = arms.federated(cfg, cohort, folder, progress, config_path, overrides)
    else:
        pre = getattr(arms, arm)(cfg, cohort, folder, progress)
    pretrain_seconds = time.monotonic() - started
    if protocol == "local":
        per_site = _finetune_locally(cfg, cohort, pre.encoders, folder / "finetune", progress)
    else:
        per_site = _finetune_federated(arm, cfg, cohort, pre.encoders, folder, config_path, overrides, progress)
    pooled = weighted_mean(per_site.values())
    main = next(k for k in pooled if k not in ("main", "num-examples") and "/" not in k)
    return finite_or_null({
        "arm": arm, "seed": cfg.seed, "finetune": protocol, "main": main,
        "sites": per_site, "pooled": pooled,
        "pretrain_curve": pre.curve,
        "final_val_loss": pre.curve[-1]["val_loss"] if pre.curve else None,
        "seconds": {"pretrain": round(pretrain_seconds, 1), "total": round(time.monotonic() - started, 1)},
    })


def _finetune_locally(cfg: ExperimentConfig, cohort: Cohort, encoders: dict[str, Path | None], folder: Path,
                      progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """Each site fine-tunes its encoder on its own labels, selects on its validation cases and
    reports its own test cases: the same as a Flower site's ``finetune-local``."""
    per_site = {}
    epochs = cfg.finetune.epochs
    for site in cohort.sites:
        def on_epoch(epoch: int, record: dict[str, Any], name: str = site.name) -> None:
            if epoch % max(1, epochs // 5) == 0 or epoch == epochs:
                key, value = next((k, v) for k, v in record.items() if k.startswith("val_"))
                progress(f"{name} fine-tuning on its own labels, epoch {epoch}/{epochs}: {key} {_fmt(value)}")

        result = finetune(cfg, folder / site.name, encoder=encoders[site.name], resume=True,
                          cohort=arms.single_site(cohort, site.name), on_epoch_end=on_epoch)
        per_site[site.name] = {**scalar_metrics(result.metrics["pooled"]), "num-examples": float(len(site.test))}
    return per_site


def _finetune_federated(arm: str, cfg: ExperimentConfig, cohort: Cohort, encoders: dict[str, Path | None], folder: Path,
                        config_path: Path, overrides: list[str], progress: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """FedAvg of the whole fine-tune model on Flower's simulation engine, starting from the arm's
    encoder (the federated arm fine-tunes in the same Flower run that pre-trained it)."""
    from fedmae.federated.simulate import simulate

    if arm == "federated":
        summary = folder / "flower" / "summary.json"
    else:
        (start,) = set(encoders.values())  # validated: federated fine-tuning needs one encoder for all sites
        run = folder / "flower-finetune"
        summary = run / "summary.json"
        if not summary.is_file():
            progress("federated fine-tuning on Flower's simulation engine")
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "flower.log").open("ab") as stream:
                status = simulate(config_path, [*overrides, f"seed={cfg.seed}", "federated.finetune=federated",
                                                f"federated.start_from={start or 'random'}"],
                                  cfg, len(cohort.sites), run, resume=(run / "global").exists(), stream=stream)
            if status != 0 or not summary.is_file():
                raise RuntimeError(f"federated fine-tuning of the {arm} arm failed (exit status {status}); see {folder / 'flower.log'}")
    test = json.loads(summary.read_text())["finetune"]["test"]["sites"]
    return {site: {k: (float("nan") if v is None else float(v)) for k, v in metrics.items()} for site, metrics in test.items()}


def _claim(out: Path, cfg: ExperimentConfig) -> None:
    """Record the config, or check that a rerun uses the one the comparison started with."""
    stored = out / "config.yaml"
    if stored.is_file():
        check_resume_config(yaml.safe_load(stored.read_text()), cfg, stored)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"
