"""A cohort: the configured data set, checked, divided into sites and split per site.

Order of work, all before any training step:
1. read the source's index (:func:`fedmae.data.sources.read_catalog`);
2. open every file (:mod:`fedmae.data.checks`); a problem stops here with one line naming the
   file, unless ``data.skip_bad_cases`` leaves those cases out and lists them in ``bad_cases.csv``
   (files that pass these checks but fail to load during training: :mod:`fedmae.data.badfiles`);
3. divide the cases into sites: the data's own sites (natural) or a simulated partition (IID,
   Dirichlet label skew, quantity skew), keeping each patient's cases together;
4. split each site into train / validation / test: official splits are kept, the rest drawn from
   the seed; the result is written to a split file and, when the file exists, read back instead
   (:mod:`fedmae.data.splits`).
A run also records and logs the data it uses (:mod:`fedmae.data.report`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmae.data import partition
from fedmae.data.badfiles import BAD_CASES
from fedmae.data.catalog import SPLITS, UNLABELLED, Case, Catalog, DataError, Problem
from fedmae.data.checks import ScanResult, scan
from fedmae.data.preprocess import Preprocessing, resolve_preprocessing
from fedmae.data.report import format_site_table, site_summary, write_reports
from fedmae.data.sources import read_catalog
from fedmae.data.splits import SiteData, read_split_file, split_file_content, split_indices, write_split_file
from fedmae.data.tasks import TaskSpec, resolve_task

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    catalog: Catalog
    sites: list[SiteData]
    prep: Preprocessing
    checked: ScanResult  # every case's statistics and problems
    skipped: list[Problem]
    task_or_problem: TaskSpec | str  # what fine-tuning predicts, or why this data cannot be fine-tuned on

    @property
    def task(self) -> TaskSpec:
        if isinstance(self.task_or_problem, str):
            raise DataError(self.task_or_problem)
        return self.task_or_problem

    def cases(self, split: str) -> list[Case]:
        return [case for site in self.sites for case in site.split(split)]


def load_cohort(cfg: ExperimentConfig, report_dir: str | Path | None = None) -> Cohort:
    """Read, check, partition and split the configured data; write the reports to ``report_dir``."""
    catalog, task, checked = read_and_check(cfg)
    return build_cohort(cfg, catalog, task, checked, report_dir=report_dir)


def read_and_check(cfg: ExperimentConfig, channels: int | None = -1) -> tuple[Catalog, TaskSpec | str, ScanResult]:
    """The catalogue, its task and the checks of every case (``channels=None``: any channel count)."""
    catalog = read_catalog(cfg)
    if catalog.spatial_dims != cfg.spatial_dims:
        raise DataError(
            f"{catalog.root}: the images are {catalog.spatial_dims}D but model.name {cfg.model.name} is {cfg.spatial_dims}D"
        )
    if not catalog.cases and not catalog.problems:
        raise DataError(f"{catalog.root}: the data set has no cases")
    task = resolve_task(cfg, catalog)
    # Label values must be among the declared classes, whatever the task at hand.
    classes = task.seg_classes if isinstance(task, TaskSpec) and task.type == "segmentation" else catalog.seg_classes
    num_classes = len(classes) or None
    full = cfg.data.check == "full"
    log.info("checking %d cases of %s (%s) ...", len(catalog.cases), catalog.root, "every voxel" if full else "headers")
    checked = scan(
        catalog,
        full=full,
        channels=cfg.model.in_channels if channels == -1 else channels,
        num_classes=num_classes,
        progress=_progress_logger(len(catalog.cases)),
    )
    checked.problems[:0] = catalog.problems  # index problems first, in the order found
    return catalog, task, checked


def build_cohort(
    cfg: ExperimentConfig,
    catalog: Catalog,
    task: TaskSpec | str,
    checked: ScanResult,
    *,
    report_dir: str | Path | None = None,
    skip_bad_cases: bool | None = None,
    write_split_file: bool = True,
) -> Cohort:
    """Sites and splits from checked cases. Problems stop here unless bad cases are skipped."""
    problems = checked.problems
    skip = cfg.data.skip_bad_cases if skip_bad_cases is None else skip_bad_cases
    if problems and not skip:
        affected = len({p.case_id or p.path for p in problems})
        raise DataError(
            f"{problems[0]} ({len(problems)} problem(s) in {affected} case(s) or file(s); "
            "`fedmae data inspect` lists them all; data.skip_bad_cases: true leaves those cases out)"
        )
    bad = {p.case_id for p in problems if p.case_id}
    cases = [c for c in catalog.cases if c.case_id not in bad]
    if problems:
        log.warning("leaving out %d case(s) with problems (data.skip_bad_cases); see %s", len(bad), BAD_CASES)
    if not cases:
        raise DataError(f"{catalog.root}: no usable cases" + (f" ({len(bad)} left out with problems)" if bad else ""))
    cases = _mark_unlabelled(cases, cfg.data.use_unlabelled)
    assignment = _assign(cases, catalog, cfg, skipped_ids=bad, write=write_split_file)
    cohort = Cohort(catalog, _sites(cases, assignment), resolve_preprocessing(cfg, catalog), checked, problems, task)
    if report_dir is not None:  # a run: record and show the data it uses
        split_file = split_file_content(assignment, catalog, cfg)
        write_reports(Path(report_dir), split_file, catalog, cohort.sites, checked, problems)
        log.info("sites:\n%s", format_site_table(site_summary(cohort.sites, catalog, checked.stats)))
    return cohort


def _progress_logger(total: int):
    step = max(1, total // 10)

    def report(done: int, _: int) -> None:
        if total >= 50 and (done % step == 0 or done == total):
            log.info("checked %d/%d cases", done, total)

    return report


def _mark_unlabelled(cases: list[Case], use_unlabelled: bool) -> list[Case]:
    """Cases without annotations in a data set that has some are for pre-training only."""
    annotated = [c.label is not None or c.findings is not None for c in cases]
    if any(annotated):
        for case, has in zip(cases, annotated):
            if not has and case.split is None:
                case.split = UNLABELLED
    if not use_unlabelled:
        dropped = sum(c.split == UNLABELLED for c in cases)
        if dropped:
            log.info("not using %d unlabelled image(s) (data.use_unlabelled: false)", dropped)
        cases = [c for c in cases if c.split != UNLABELLED]
    return cases


# ---------------------------------------------------------------------------------------------
# sites and splits


def _assign(
    cases: list[Case], catalog: Catalog, cfg: ExperimentConfig, skipped_ids: set[str], write: bool
) -> dict[str, tuple[str, str]]:
    """case id -> (site, split): from the split file when it exists, else partitioned and drawn."""
    d = cfg.data
    if d.split_file is not None and Path(d.split_file).is_file():
        return read_split_file(Path(d.split_file), cases, skipped_ids)
    groups = _groups(cases)
    site_of_group = _partition(groups, catalog, cfg)
    official = {c.split for c in cases if c.split in SPLITS}
    val_fraction = 0.0 if "val" in official else d.val_fraction
    test_fraction = 0.0 if "test" in official else d.test_fraction
    assignment: dict[str, tuple[str, str]] = {}
    for site in dict.fromkeys(site_of_group.values()):
        site_groups = [g for g, s in site_of_group.items() if s == site]
        free = [g for g in site_groups if _group_split(groups[g]) is None]
        for g in site_groups:
            if (split := _group_split(groups[g])) is not None:
                for case in groups[g]:
                    assignment[case.case_id] = (site, split)
        if not free:
            continue
        try:
            drawn = split_indices(len(free), val_fraction, test_fraction, cfg.seed, site)
        except ValueError as err:
            raise DataError(f"{catalog.root}: {err}; use fewer sites or more data") from None
        for split, indices in (("train", drawn.train), ("val", drawn.val), ("test", drawn.test)):
            for i in indices:
                for case in groups[free[i]]:
                    assignment[case.case_id] = (site, split)
    if d.split_file is not None and write:
        write_split_file(Path(d.split_file), split_file_content(assignment, catalog, cfg))
        log.info("wrote the splits to %s; later runs reuse them", d.split_file)
    return assignment


def _groups(cases: list[Case]) -> dict[str, list[Case]]:
    """Cases per patient, in first-seen order: a patient never straddles sites or splits."""
    groups: dict[str, list[Case]] = {}
    for case in cases:
        groups.setdefault(case.group, []).append(case)
    return groups


def _group_split(cases: list[Case]) -> str | None:
    splits = {c.split for c in cases if c.split is not None}
    if len(splits) > 1:
        raise DataError(f"patient {cases[0].patient}: cases in several official splits ({', '.join(sorted(splits))})")
    return splits.pop() if splits else None


def _partition(groups: dict[str, list[Case]], catalog: Catalog, cfg: ExperimentConfig) -> dict[str, str]:
    d = cfg.data
    names = list(groups)
    if d.partition == "natural":
        site_of = {g: groups[g][0].site for g in names}
        straddling = next((g for g in names if len({c.site for c in groups[g]}) > 1), None)
        if straddling is not None:
            raise DataError(f"{catalog.root}: patient {straddling} has cases at several sites")
        if not any(site_of.values()):
            if d.num_sites != 1:
                raise DataError(
                    f"{catalog.root}: data.partition is natural but the data name no sites; set data.partition "
                    f"to iid, dirichlet or quantity to simulate data.num_sites={d.num_sites} sites, or data.num_sites: 1"
                )
            return {g: catalog.source for g in names}
        unnamed = [g for g, s in site_of.items() if not s]
        if unnamed:
            raise DataError(f"{catalog.root}: case {groups[unnamed[0]][0].case_id} has no site while others do")
        return site_of
    need = 1 + (d.val_fraction > 0) + (d.test_fraction > 0)
    try:
        if d.partition == "iid":
            parts = partition.partition_iid(len(names), d.num_sites, cfg.seed, min_per_site=need)
        elif d.partition == "quantity":
            parts = partition.partition_quantity_skew(len(names), d.num_sites, d.partition_beta, cfg.seed, need)
        else:
            labels = [_primary_label(groups[g], catalog) for g in names]
            if all(label == UNLABELLED for label in labels):
                raise DataError(
                    f"{catalog.root}: data.partition dirichlet skews classification labels, which these data lack; "
                    "use iid or quantity"
                )
            parts = partition.partition_label_skew(labels, d.num_sites, d.partition_beta, cfg.seed, need)
    except ValueError as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{catalog.root}: data.partition {d.partition}: {err}") from None
    return {names[i]: f"site-{k}" for k, part in enumerate(parts) for i in part}


def _primary_label(cases: list[Case], catalog: Catalog) -> str:
    """One class per patient for label skew: the first finding present, 'none', or unlabelled."""
    findings = cases[0].findings
    if findings is None:
        return UNLABELLED
    positive = np.flatnonzero(np.asarray(findings) > 0.5)
    return catalog.findings[positive[0]] if positive.size else "none"


def _sites(cases: list[Case], assignment: dict[str, tuple[str, str]]) -> list[SiteData]:
    # Sites in the order the partition (or split file) gives them; cases in catalogue order.
    sites = {name: SiteData(name, [], [], []) for name, _ in assignment.values()}
    for case in cases:
        site, split = assignment[case.case_id]
        sites[site].split(split).append(case)
    for site in sites.values():
        if not site.train and not site.unlabelled:
            raise DataError(f"site {site.name}: no training cases; use fewer sites or smaller val/test fractions")
    return list(sites.values())
