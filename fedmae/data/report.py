"""Reports on the data: per-site summaries, the run's record of its data, and the inspect report.

A run writes ``splits.json`` (the splits it used, a split file), ``data_summary.json`` (per site:
cases per split, labels, intensities) and ``bad_cases.csv`` (the cases left out) to its folder and
logs the sites as a table; `fedmae data inspect` prints the same table within its report of what
the data are and what is wrong with them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmae.data.badfiles import BAD_CASES, DURING_TRAINING, read_problems, write_problems
from fedmae.data.catalog import SPLITS, UNLABELLED, Case, Catalog, Problem
from fedmae.data.checks import CaseStats, ScanResult
from fedmae.data.splits import SiteData, write_split_file
from fedmae.files import atomic_write_json

SUMMARY = "data_summary.json"
SPLITS_JSON = "splits.json"


def label_counts(cases: Sequence[Case], catalog: Catalog, stats: dict[str, CaseStats]) -> dict[str, int]:
    """Cases showing each class: findings present, or label values found in the map (full checks)."""
    counts: Counter[str] = Counter()
    for case in cases:
        if case.findings is not None and catalog.findings:
            positive = np.flatnonzero(np.asarray(case.findings) > 0.5)
            counts.update(catalog.findings[i] for i in positive)
            if not positive.size and not catalog.exclusive:
                counts["no finding"] += 1
        found = stats.get(case.case_id).label_values if case.case_id in stats else None
        if found is not None:
            names = catalog.seg_classes
            counts.update(names[v] if 0 <= v < len(names) else f"label {v}" for v in found)
    order = [*catalog.findings, "no finding", *catalog.seg_classes]
    return dict(sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def summarise_intensity(stats: Sequence[CaseStats]) -> dict[str, float | None]:
    """Intensity range and mean over cases (from full checks), for per-site summaries."""
    known = [s for s in stats if s.mean is not None]
    if not known:
        return {"min": None, "max": None, "mean": None, "std": None}
    return {
        "min": min(s.minimum for s in known),
        "max": max(s.maximum for s in known),
        "mean": float(np.mean([s.mean for s in known])),
        "std": float(np.mean([s.std for s in known])),
    }


def site_summary(sites: Sequence[SiteData], catalog: Catalog, stats: dict[str, CaseStats]) -> list[dict[str, Any]]:
    """One row per site: cases per split, label histogram, intensity statistics (as stored)."""
    rows = []
    for site in sites:
        everything = [*site.train, *site.val, *site.test, *site.unlabelled]
        rows.append({
            "site": site.name,
            **{split: len(site.split(split)) for split in (*SPLITS, UNLABELLED)},
            "labels": label_counts([*site.train, *site.val, *site.test], catalog, stats),
            "intensity": summarise_intensity([stats[c.case_id] for c in everything if c.case_id in stats]),
        })
    return rows


def format_site_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`site_summary` as a plain-text table."""
    classes = list(dict.fromkeys(name for row in rows for name in row["labels"]))
    headers = ["site", *SPLITS, UNLABELLED, "intensity mean (sd) [min, max]", *classes]
    body = [
        [row["site"], *[str(row[s]) for s in (*SPLITS, UNLABELLED)], _intensity(row["intensity"]),
         *[str(row["labels"].get(c, 0)) for c in classes]]
        for row in rows
    ]
    return _table(headers, body)


# ---------------------------------------------------------------------------------------------
# a run's record of its data


def write_reports(folder: Path, split_file: Mapping[str, Any], catalog: Catalog, sites: Sequence[SiteData],
                  checked: ScanResult, skipped: Sequence[Problem]) -> None:
    """The run's record of its data: the splits used (``split_file``: a split file's content), the
    per-site summary, the cases left out (``skipped``)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_split_file(folder / SPLITS_JSON, split_file)
    summary = {"source": catalog.source, "root": catalog.root, "sites": site_summary(sites, catalog, checked.stats)}
    atomic_write_json(folder / SUMMARY, summary, indent=1)
    # The checks' problems, and those this run (resumed) met while training (fedmae.data.badfiles).
    path = folder / BAD_CASES
    during_training = [p for p in read_problems(path) if p.message.endswith(DURING_TRAINING)]
    problems = [*skipped, *(p for p in during_training if p not in skipped)]
    if problems:
        write_problems(path, problems)
    else:
        path.unlink(missing_ok=True)  # from an earlier attempt whose files have been fixed since


# ---------------------------------------------------------------------------------------------
# `fedmae data inspect`


def inspect_report(catalog: Catalog, checked: ScanResult, sites: Sequence[SiteData] | None,
                   problems: Sequence[Problem]) -> str:
    """Counts, shapes, spacings, intensity ranges, label histogram, per-site table, every problem."""
    stats = list(checked.stats.values())
    splits = Counter(c.split or "unassigned" for c in catalog.cases)
    lines = [
        f"data set: {catalog.root} ({catalog.source}, {catalog.modality}, {catalog.spatial_dims}D)",
        f"cases: {len(catalog.cases)} listed, {len(stats)} readable; official splits: "
        + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())),
    ]
    if catalog.channel_names:
        lines.append(f"channels: {', '.join(catalog.channel_names)}")
    if stats:
        lines.append(f"shapes (C, *S): {_spread([s.shape for s in stats])}")
        spacings = [s.spacing for s in stats if s.spacing is not None]
        if spacings:
            lines.append(f"spacings (mm): {_spread(spacings)}")
        intensity = summarise_intensity(stats)
        if intensity["mean"] is not None:
            lines.append(f"intensity: {_intensity(intensity)}")
    labels = label_counts(catalog.cases, catalog, checked.stats)
    if labels:
        lines.append("labels (cases showing each): " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    if sites is not None:
        lines += ["", "sites:", format_site_table(site_summary(sites, catalog, checked.stats))]
    lines.append("")
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


def what_a_run_would_do(problems: list[Problem], skip_bad_cases: bool, sites_shown: bool) -> str:
    """One line on what training would do with these problems (inspection itself changes nothing)."""
    bad = len({p.case_id for p in problems if p.case_id})
    if not bad:
        skipping = "go on despite these problems (none of them belongs to one case)"
    elif sites_shown:
        skipping = f"leave these {bad} case(s) out (as the sites table above does) and list them in bad_cases.csv"
    else:
        skipping = f"leave these {bad} case(s) out, list them in bad_cases.csv, and then stop at the last problem above"
    only = "inspect itself only reports and writes no bad_cases.csv"
    if skip_bad_cases:
        return f"this config has data.skip_bad_cases: true, so a run would {skipping}; {only}"
    return f"a run would stop at the first problem; with data.skip_bad_cases: true it would {skipping}; {only}"


def _spread(values: Sequence[tuple]) -> str:
    """The most common values with their counts, e.g. '(1, 64, 64, 40) x3, (1, 64, 64, 36) x1'."""
    common = Counter(tuple(v) for v in values).most_common()
    shown = ", ".join(f"{tuple(v)} x{n}" for v, n in common[:4])
    return shown + (f", and {len(common) - 4} more" if len(common) > 4 else "")


def _intensity(s: dict[str, float | None]) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.4g} ({s['std']:.3g}) [{s['min']:.4g}, {s['max']:.4g}]"


def _table(headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *body]) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [headers, *body])
