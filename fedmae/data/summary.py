"""Per-site summaries and the `fedmae data inspect` report: what the data are, and what is wrong."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmae.data.catalog import SPLITS, UNLABELLED, Case, Catalog, Problem
from fedmae.data.checks import CaseStats, ScanResult, summarise_intensity

if TYPE_CHECKING:
    from fedmae.data.cohort import Cohort


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


def site_summary(cohort: Cohort) -> list[dict[str, Any]]:
    """One row per site: cases per split, label histogram, intensity statistics (as stored)."""
    rows = []
    for site in cohort.sites:
        everything = [*site.train, *site.val, *site.test, *site.unlabelled]
        rows.append({
            "site": site.name,
            **{split: len(site.split(split)) for split in (*SPLITS, UNLABELLED)},
            "labels": label_counts([*site.train, *site.val, *site.test], cohort.catalog, cohort.checked.stats),
            "intensity": summarise_intensity([cohort.checked.stats[c.case_id] for c in everything if c.case_id in cohort.checked.stats]),
        })
    return rows


def format_site_table(cohort: Cohort) -> str:
    rows = site_summary(cohort)
    classes = list(dict.fromkeys(name for row in rows for name in row["labels"]))
    headers = ["site", *SPLITS, UNLABELLED, "intensity mean (sd) [min, max]", *classes]
    body = [
        [row["site"], *[str(row[s]) for s in (*SPLITS, UNLABELLED)], _intensity(row["intensity"]),
         *[str(row["labels"].get(c, 0)) for c in classes]]
        for row in rows
    ]
    return _table(headers, body)


def inspect_report(catalog: Catalog, checked: ScanResult, cohort: Cohort | None, problems: Sequence[Problem]) -> str:
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
    if cohort is not None:
        lines += ["", "sites:", format_site_table(cohort)]
    lines.append("")
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append("no problems found")
    return "\n".join(lines)


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
