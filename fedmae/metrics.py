"""Task metrics as one type, :class:`Metrics`, and the forms it takes on its way.

- JSON (:meth:`Metrics.to_json`): what ``test_metrics.json``, ``evaluation_<split>.json`` and a
  fine-tuning checkpoint's ``val`` hold: ``{"main": name, "cases": n, name: value, "per_class":
  {kind: {class: value}}, ...}``, undefined values as null.
- flat (:meth:`Metrics.flat`): what a site sends to the server and the server logs (Flower's
  metric records hold numbers only): ``{"main": value, name: value, "kind/class": value, ...,
  "num-examples": n}``, undefined values as NaN. The name of the main metric does not travel: the
  reader knows the task, and with it the name (:func:`main_metric`).
- a table (:func:`metrics_table`) for the command line.

Pure Python (no torch): the server and the reports import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmae.data.tasks import TaskSpec

WEIGHT = "num-examples"  # a site's weight in the mean over sites, in the flat form


def main_metric(task: TaskSpec) -> str:
    """The metric used for model selection and headline reporting."""
    if task.type == "segmentation":
        return "mean_dice"
    return "mean_auc" if task.multi_label else "accuracy"


@dataclass(frozen=True)
class Metrics:
    """Task metrics over some cases; a value that is undefined (AUC of a class without positives)
    is None."""

    main: str  # the metric that selects models, e.g. "mean_auc"
    values: Mapping[str, float | None]  # headline values, the main one among them: {"mean_dice": 0.8, "mean_hd95": 3.1}
    per_class: Mapping[str, Mapping[str, float | None]]  # by kind, then class: {"dice": {"liver": 0.9}}
    cases: int  # the cases scored: a site's weight in the mean over sites

    @property
    def main_value(self) -> float | None:
        return self.values.get(self.main)

    def to_json(self) -> dict[str, Any]:
        """The JSON form: the main metric, its per-class scores, then the other headline values."""
        others = {name: value for name, value in self.values.items() if name != self.main}
        return {"main": self.main, "cases": self.cases, self.main: self.main_value,
                "per_class": {kind: dict(scores) for kind, scores in self.per_class.items()}, **others}

    @classmethod
    def from_json(cls, report: Mapping[str, Any]) -> Metrics:
        values = {name: value for name, value in report.items() if name not in ("main", "cases", "per_class")}
        per_class = {kind: dict(scores) for kind, scores in report.get("per_class", {}).items()}
        return cls(report["main"], values, per_class, report["cases"])

    def flat(self) -> dict[str, float]:
        """The flat form (the main value twice: as "main" and under its name; the other headline
        values stay at the site)."""
        main = _nan(self.main_value)
        flat = {"main": main, self.main: main}
        for kind, scores in self.per_class.items():
            for name, value in scores.items():
                flat[f"{kind}/{name}"] = _nan(value)
        flat[WEIGHT] = float(self.cases)
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, float | None], main: str) -> Metrics:
        """Read a flat form whose main metric is ``main``. NaN and None (a flat form read back from
        JSON) are undefined. A site without cases of the split sends only ``num-examples: 0``:
        its metrics are undefined and weigh nothing."""
        if WEIGHT not in flat:
            raise ValueError(f"flat metrics without {WEIGHT!r}: {sorted(flat)}")
        cases = int(flat[WEIGHT])
        if main not in flat and cases:
            raise ValueError(f"flat metrics of {cases} cases without their main metric {main!r}: {sorted(flat)}")
        per_class: dict[str, dict[str, float | None]] = {}
        for key, value in flat.items():
            if "/" in key:
                kind, name = key.split("/", 1)
                per_class.setdefault(kind, {})[name] = _defined(value)
        return cls(main, {main: _defined(flat.get(main))}, per_class, cases)

    @classmethod
    def mean(cls, per_site: Iterable[Metrics]) -> Metrics:
        """Each value's mean over the sites weighted by their cases, over the sites where it is
        defined (as :func:`weighted_mean` does for flat forms); names and classes sorted."""
        sites = list(per_site)
        mains = {m.main for m in sites}
        if len(mains) != 1:
            raise ValueError(f"metrics to average need one main metric; got {sorted(mains) or 'no metrics'}")
        weights = [float(m.cases) for m in sites]

        def mean_of(values: Iterable[float | None]) -> float | None:
            return _weighted_average(zip(values, weights))

        names = sorted({name for m in sites for name in m.values})
        kinds = sorted({kind for m in sites for kind in m.per_class})
        per_class = {
            kind: {name: mean_of(m.per_class.get(kind, {}).get(name) for m in sites)
                   for name in sorted({n for m in sites for n in m.per_class.get(kind, {})})}
            for kind in kinds
        }
        return cls(mains.pop(), {name: mean_of(m.values.get(name) for m in sites) for name in names}, per_class,
                   sum(m.cases for m in sites))


def weighted_mean(per_site: Iterable[Mapping[str, float]], weight: str = WEIGHT) -> dict[str, float]:
    """Each scalar's mean over sites weighted by their examples, skipping sites where it is NaN: for
    any flat per-site numbers (losses, timings, flat task metrics)."""
    per_site = list(per_site)
    names = {k for metrics in per_site for k in metrics if k != weight}
    result = {}
    for name in sorted(names):
        mean = _weighted_average((m[name], m.get(weight, 1.0)) for m in per_site if name in m)
        result[name] = math.nan if mean is None else mean
    result[weight] = float(sum(m.get(weight, 0.0) for m in per_site))
    return result


def finite_or_null(value: Any) -> Any:
    """NaN (a metric undefined at a site, e.g. AUC without positives) becomes None (null): strict JSON."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def format_value(value: float | None, digits: int = 3) -> str:
    """'0.612'; 'n/a' for an undefined value (None or NaN)."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Text cells as a table: columns padded to their widest cell, or (``markdown``) a Markdown table."""
    if markdown:
        return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


def metrics_table(rows: Mapping[str, Metrics], split: str = "test") -> str:
    """One row per entry (pooled, each site): the first entry's main metric, then the per-class
    scores of its first kind."""
    first = next(iter(rows.values()))
    main = first.main
    kind, classes = next(iter(first.per_class.items()), ("", {}))
    header = ["", f"{split} {main}", *[f"{kind} {c}" for c in classes]]
    body = [[name, format_value(m.values.get(main)), *[format_value(m.per_class.get(kind, {}).get(c)) for c in classes]]
            for name, m in rows.items()]
    return format_table(header, body)


def _weighted_average(pairs: Iterable[tuple[float | None, float]]) -> float | None:
    """sum(v * w) / sum(w) over the pairs whose value is finite; None when no weight is left."""
    defined = [(v, w) for v, w in pairs if v is not None and math.isfinite(v)]
    total = sum(w for _, w in defined)
    return sum(v * w for v, w in defined) / total if total else None


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _defined(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
