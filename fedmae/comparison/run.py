"""`fedmae compare`: every pre-training arm, then one fine-tuning protocol, per seed; resumable.

Layout of the output folder::

    config.yaml                    the resolved experiment (a rerun must match it)
    seed-<S>/                      splits.json, data_summary.json of that seed's data
    seed-<S>/<arm>/                the arm's runs (pre-training, fine-tuning) and result.json
    results.json, results.csv, report.md, plots/
    tensorboard/ or mlruns/        with tracking: the outcome (mlruns/: every run of the comparison;
                                   TensorBoard's runs keep theirs in their own folders)

An arm whose ``result.json`` exists is finished and is not run again; an arm that was stopped
resumes its runs from their last checkpoints. Each seed is a full replicate: its own splits,
initial weights and training randomness. The runs of the arms (and of each site in the local arm
and in local fine-tuning) are independent and may run at once (``compare.parallel``).
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

from fedmae.comparison import arms, plots
from fedmae.comparison.arms import ARM_TITLES
from fedmae.comparison.published import check_paper
from fedmae.comparison.report import summarise, tables, write_report
from fedmae.comparison.schedule import Task, resolve_parallel, run_tasks, worker_cores
from fedmae.config import ExperimentConfig, validate_federated
from fedmae.data.cohort import Cohort, load_cohort
from fedmae.engine.finetune import finetune
from fedmae.engine.runs import check_output_dir, check_resume_config, claim_output_dir
from fedmae.federated.run_record import failure, finished_summary
from fedmae.federated.settings import check_site_count
from fedmae.files import atomic_write_json
from fedmae.metrics import Metrics, finite_or_null, format_value, main_metric
from fedmae.tracking import check_tracking, for_nested_run, log_comparison, open_tracker, prepare_store

log = logging.getLogger(__name__)

class ProgressLine:
    """One line per event on stderr: which seed, arm, round or epoch and site is running.

    The clock counts from ``started`` (``time.monotonic()``, the same clock in every process of
    the machine), so the lines of runs in worker processes share the comparison's clock."""

    def __init__(self, stream=None, started: float | None = None, where: str = ""):
        self.stream, self.started, self.where = stream, time.monotonic() if started is None else started, where

    def at(self, seed: int, arm: str) -> ProgressLine:
        """A progress line for one arm of one seed, on the same clock."""
        return ProgressLine(self.stream, self.started, f"seed {seed} | {ARM_TITLES[arm]}")

    def __call__(self, message: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        stream = self.stream or sys.stderr
        stream.write(f"[{minutes:3d}:{seconds:02d}] {self.where} | {message}\n")  # one write: lines from workers do not interleave
        stream.flush()


def run_comparison(cfg: ExperimentConfig, config_path: Path, out: Path, force: bool = False) -> Path:
    """Every arm (resuming), then the report and plots; prints the table; returns report.md.
    ``force``: start over in ``out`` instead of resuming (see :func:`claim`)."""
    out = Path(out).absolute()
    validate_federated(cfg, config_path, pretrain="federated" in cfg.compare.arms, finetune=cfg.compare.finetune == "federated")
    check_paper(cfg)  # before any run: the paper's figures must fit this comparison
    check_tracking(cfg)  # a missing package, before anything is written
    claim(out, cfg, force)
    cohorts: dict[int, Cohort] = {}
    results = compare(cfg, out, cohorts=cohorts)
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
    summary = summarise(results, cfg)
    with open_tracker(cfg, out, "compare", resume=True) as tracker:  # each arm's runs tracked themselves
        log_comparison(tracker, summary, tables(summary), figures)
    print()
    print(tables(summary))
    print()
    print(f"report: {report} (results.json, results.csv, plots/)")
    return report


def compare(cfg: ExperimentConfig, out: Path,
            progress: ProgressLine | None = None, cohorts: dict[int, Cohort] | None = None,
            threads: int | None = None) -> list[dict[str, Any]]:
    """Run (or finish) every arm for every seed; returns one result per (seed, arm). ``cohorts``
    receives each seed's data where it had to be loaded.

    The runs are independent: ``compare.parallel`` runs them in worker processes at once
    (:mod:`fedmae.comparison.schedule`), each with ``threads`` PyTorch threads (default: an equal
    share of the cores); 1 runs them here, one after another."""
    cohorts = {} if cohorts is None else cohorts
    progress = progress or ProgressLine()
    out = Path(out).absolute()
    check_tracking(cfg)
    claim(out, cfg)
    prepare_store(cfg, out)  # MLflow: the comparison's runs share its store
    finished: dict[tuple[int, str], dict[str, Any]] = {}
    tasks: list[Task] = []
    for seed in cfg.compare.seeds:
        seed_cfg = for_nested_run(dataclasses.replace(cfg, seed=seed), f"seed-{seed}", root=out)
        seed_dir = out / f"seed-{seed}"
        for arm in cfg.compare.arms:
            done = seed_dir / arm / "result.json"
            if done.is_file():
                progress.at(seed, arm)("finished earlier; skipped")
                finished[seed, arm] = json.loads(done.read_text())
                continue
            if seed not in cohorts:
                cohorts[seed] = load_cohort(seed_cfg, report_dir=seed_dir)
                if uses_flower(cfg):  # impossible federation settings end here, not after the other arms ran
                    check_site_count(seed_cfg, len(cohorts[seed].sites))
            tasks += arm_tasks(arm, seed_cfg, cohorts[seed], seed_dir / arm, progress)
    workers, share = resolve_parallel(cfg.compare.parallel, len(tasks))
    if workers > 1:
        log.info("running %d independent runs in %d worker processes with %d thread(s) each", len(tasks), workers,
                 threads or share)
    outputs: dict[Any, Any] = {}

    def on_done(task: Task, output: Any) -> None:
        outputs[task.key] = output
        seed, arm = task.key[:2]
        if all(t.key in outputs for t in tasks if t.key[:2] == (seed, arm)):
            result = arm_result(arm, dataclasses.replace(cfg, seed=seed), cohorts[seed], outputs)
            atomic_write_json(out / f"seed-{seed}" / arm / "result.json", result, allow_nan=False)
            progress.at(seed, arm)(f"done: test {result['main']} {format_value(result['pooled'][result['main']])} (pooled over sites)")
            finished[seed, arm] = result

    run_tasks(tasks, workers, threads or share, on_done)
    return [finished[seed, arm] for seed in cfg.compare.seeds for arm in cfg.compare.arms]


def arm_tasks(arm: str, cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: ProgressLine) -> list[Task]:
    """The runs of one arm of one seed: its pre-training (one per site for the local arm), then
    the fine-tuning protocol (one run per site, or one Flower run), each after what it starts from."""
    report = progress.at(cfg.seed, arm)
    key = (cfg.seed, arm)
    sites = [site.name for site in cohort.sites]

    def named(run: str) -> ExperimentConfig:  # tracked as <run name>/seed-S/<arm>/<run>, <run> its folder here
        return for_nested_run(cfg, f"{arm}/{run}")

    if arm == "local":
        pretraining = [Task((*key, "pretrain", s), arms.local_site, (named(f"pretrain/{s}"), cohort, s, folder, report))
                       for s in sites]
    elif arm == "federated":
        pretraining = [Task((*key, "pretrain"), _federated_pretraining, (named("flower"), cohort, folder, report))]
    elif arm == "centralised":
        pretraining = [Task((*key, "pretrain"), arms.centralised, (named("pretrain"), cohort, folder, report))]
    else:
        pretraining = []
    encoders = {s: arms.encoder_checkpoint(arm, folder, s) for s in sites}
    if cfg.compare.finetune == "local":
        def after(site: str) -> tuple:
            return tuple(t.key for t in pretraining if t.key[3:] in ((), (site,)))

        finetuning = [Task((*key, "finetune", s), finetune_site,
                           (named(f"finetune/{s}"), cohort, s, encoders[s], folder / "finetune", report),
                           after=after(s)) for s in sites]
    else:
        finetuning = [Task((*key, "finetune"), _finetune_federated,
                           (arm, named("flower-finetune"), cohort, encoders, folder, report),
                           after=tuple(t.key for t in pretraining))]
    return [*pretraining, *finetuning]


def arm_result(arm: str, cfg: ExperimentConfig, cohort: Cohort, outputs: dict[Any, Any]) -> dict[str, Any]:
    """An arm's result.json from the outputs of its runs."""
    key = (cfg.seed, arm)
    if arm == "local":
        pre = arms.local(cohort, {site.name: outputs[(*key, "pretrain", site.name)] for site in cohort.sites})
    else:
        pre = outputs.get((*key, "pretrain"), arms.Pretrained([]))  # none: no pre-training
    if cfg.compare.finetune == "local":
        per_site = {site.name: outputs[(*key, "finetune", site.name)][0] for site in cohort.sites}
        finetune_seconds = sum(outputs[(*key, "finetune", site.name)][1] for site in cohort.sites)
    else:
        per_site, finetune_seconds = outputs[(*key, "finetune")]
    main = main_metric(cohort.task)
    pooled = Metrics.mean(Metrics.from_flat(flat, main) for flat in per_site.values())
    return finite_or_null({
        "arm": arm, "seed": cfg.seed, "finetune": cfg.compare.finetune, "main": main,
        "sites": per_site, "pooled": pooled.flat(),
        "pretrain_curve": pre.curve,
        "final_val_loss": pre.curve[-1]["val_loss"] if pre.curve else None,
        # Each run's own time (their sum when several ran at once), so arms compare in work done.
        "seconds": {"pretrain": round(pre.seconds, 1), "total": round(pre.seconds + finetune_seconds, 1)},
    })


def _federated_pretraining(cfg: ExperimentConfig, cohort: Cohort, folder: Path, progress: ProgressLine) -> arms.Pretrained:
    started = time.monotonic()
    pre = arms.federated(cfg, cohort, folder, progress, cpus=worker_cores())
    # The whole simulation, Flower's start-up included, as a user waits for it (a rerun that
    # finds the run finished reports the run's own time).
    return dataclasses.replace(pre, seconds=max(pre.seconds, time.monotonic() - started))


def finetune_site(cfg: ExperimentConfig, cohort: Cohort, site: str, encoder: Path | None, folder: Path,
                  progress: Callable[[str], None]) -> tuple[dict[str, float], float]:
    """One site fine-tunes its arm's encoder on its own labels, selects on its validation cases and
    reports its own test cases (the same as a Flower site's ``finetune-local``): (its test metrics,
    seconds)."""
    epochs = cfg.finetune.epochs

    def on_epoch(epoch: int, record: dict[str, Any]) -> None:
        if epoch % max(1, epochs // 5) == 0 or epoch == epochs:
            key, value = next(((k, v) for k, v in record.items() if k.startswith("val_")), (None, None))
            if key is not None:
                progress(f"{site} fine-tuning on its own labels, epoch {epoch}/{epochs}: {key} {format_value(value)}")

    own = arms.single_site(cohort, site)
    result = finetune(cfg, folder / site, encoder=encoder, resume=True, cohort=own, on_epoch_end=on_epoch,
                      track=True)
    # Its weight is its number of test cases (a file left out as bad still counts), as in a Flower site's reply.
    flat = {**Metrics.from_json(result.metrics["pooled"]).flat(), "num-examples": float(len(own.sites[0].test))}
    return flat, result.seconds


def _finetune_federated(arm: str, cfg: ExperimentConfig, cohort: Cohort, encoders: dict[str, Path | None], folder: Path,
                        progress: Callable[[str], None]) -> tuple[dict[str, dict[str, float]], float]:
    """FedAvg of the whole fine-tune model on Flower's simulation engine, starting from the arm's
    encoder (the federated arm fine-tunes in the same Flower run that pre-trained it): (per-site
    test metrics, seconds)."""
    from fedmae.federated.simulate import simulate

    started = time.monotonic()
    if arm == "federated":
        summary = finished_summary(folder / "flower")
    else:
        (start,) = set(encoders.values())  # validated: federated fine-tuning needs one encoder for all sites
        run = folder / "flower-finetune"
        summary = finished_summary(run)
        if summary is None:
            progress("federated fine-tuning on Flower's simulation engine")
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / "flower.log").open("ab") as stream:
                fed = dataclasses.replace(cfg.federated, finetune="federated", start_from=str(start or "random"))
                status = simulate(dataclasses.replace(cfg, federated=fed), len(cohort.sites), run,
                                  resume=(run / "global").exists(), stream=stream, cpus=worker_cores())
            summary = finished_summary(run)
            if summary is None:  # flwr run exits 0 even when the ServerApp raised: fedmae's record decides
                raise RuntimeError(f"federated fine-tuning of the {arm} arm failed "
                                   f"({failure(run) or f'exit status {status}'}); see {folder / 'flower.log'}")
    test = summary["finetune"]["test"]["sites"]
    per_site = {site: {k: (float("nan") if v is None else float(v)) for k, v in metrics.items()} for site, metrics in test.items()}
    return per_site, time.monotonic() - started


def claim(out: Path, cfg: ExperimentConfig, force: bool = False) -> None:
    """Check the folder and that a rerun uses the config the comparison started with; only then
    record the config. ``force``: start the comparison over (its seeds, results and plots go)."""
    stored = out / "config.yaml"
    check_output_dir(out, "compare", cfg, holds_run=stored.is_file(), resume=not force, force=force)
    if stored.is_file() and not force:
        check_resume_config(yaml.safe_load(stored.read_text()), cfg, stored)
    previous = [p.name for p in out.glob("seed-*")] + ["results.json", "results.csv", "report.md", "plots", "tensorboard",
                                                       "mlruns"]
    claim_output_dir(out, "compare", cfg, force=force, previous_outputs=previous)


def uses_flower(cfg: ExperimentConfig) -> bool:
    return "federated" in cfg.compare.arms or cfg.compare.finetune == "federated"
