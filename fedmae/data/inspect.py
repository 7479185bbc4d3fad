"""`fedmae data inspect`: read and check a data set as a run would, without training or writing.

The checks are :mod:`fedmae.data.checks`, the sites and splits :mod:`fedmae.data.cohort`, the text
:mod:`fedmae.data.report`; this module runs them for a config or for a folder given on the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

from fedmae.config import ExperimentConfig, config_from_dict
from fedmae.data.catalog import Catalog, DataError, Problem
from fedmae.data.checks import ScanResult
from fedmae.data.cohort import build_cohort, read_and_check
from fedmae.data.report import inspect_report, what_a_run_would_do
from fedmae.data.sources import detect_source
from fedmae.data.tasks import TaskSpec


def inspect_config(cfg: ExperimentConfig, quick: bool = False) -> tuple[str, list[Problem]]:
    """Report on the data an experiment would use, as it would use them (sites, splits)."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, check="quick" if quick else cfg.data.check))
    catalog, task, checked = read_and_check(cfg)
    extra = [Problem(catalog.root, task)] if isinstance(task, str) else []
    return _report(cfg, catalog, task, checked, extra)


def inspect_path(path: Path, modality: str | None = None, quick: bool = False, overrides: Iterable[str] = ()
                 ) -> tuple[str, list[Problem]]:
    """Report on a data set on disk, read with the reader its layout calls for, as one site.
    ``overrides`` (``--set key=value``): settings of the data and task, e.g. ``data.check=quick``."""
    source = detect_source(path)
    dims = _spatial_dims(path, source)
    raw = {
        "model": {"name": f"vit_tiny_patch16_{dims}d", "img_size": [32] * dims},
        "data": {"source": source, "root": str(path.absolute()), "num_sites": 1, "modality": modality or "auto",
                 "check": "quick" if quick else "full"},
    }
    if source == "nifti_folder" and modality is None:
        raw["data"]["modality"] = "other"
    cfg = config_from_dict(raw, source=str(path), overrides=overrides)
    catalog, task, checked = read_and_check(cfg, channels=None)
    return _report(cfg, catalog, task, checked, [])


def _report(cfg: ExperimentConfig, catalog: Catalog, task: TaskSpec | str, checked: ScanResult,
            extra: list[Problem]) -> tuple[str, list[Problem]]:
    """Sites and splits as a run would make them (bad cases left out), and every problem."""
    problems = [*checked.problems, *extra]
    try:
        # Inspection changes nothing: a missing split file is drawn but not saved, and no bad_cases.csv
        # is written, so the run's warning "leaving out ... see bad_cases.csv" is not shown.
        with _quiet(logging.getLogger(build_cohort.__module__), "leaving out"):
            cohort = build_cohort(cfg, catalog, task, checked, skip_bad_cases=True, write_split_file=False)
    except DataError as err:
        cohort = None
        problems.append(Problem(catalog.root, str(err)))
    report = inspect_report(catalog, checked, None if cohort is None else cohort.sites, problems)
    if checked.problems:
        report += "\n" + what_a_run_would_do(checked.problems, cfg.data.skip_bad_cases, cohort is not None)
    return report, problems


@contextlib.contextmanager
def _quiet(logger: logging.Logger, prefix: str):
    """Drop ``logger``'s records whose message starts with ``prefix`` for the duration."""
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _spatial_dims(path: Path, source: str) -> int:
    if source == "chestxray14":
        return 2
    if source == "medmnist":
        from fedmae.data.medmnist import flavour_of

        return 3 if flavour_of(path).endswith("3d") else 2
    return 3
