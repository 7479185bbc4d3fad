"""The comparison's report: results.json and results.csv with every figure, and report.md with the
main table (arm x site, mean +- std over seeds), the paired per-seed differences between arms, a
reading generated from the numbers, and plots."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import statistics
from pathlib import Path
from typing import Any

from fedmae.comparison.arms import ARM_TITLES
from fedmae.comparison.published import PAPER_ARMS, PUBLISHED, SOURCE
from fedmae.config import ExperimentConfig
from fedmae.files import atomic_write_json, atomic_write_text
from fedmae.metrics import finite_or_null, format_table, format_value

POOLED = "pooled"
# The paired comparisons the report makes, (a, b) for "a minus b": how close federation comes to
# pooling the data, what pre-training is worth, and what federating adds over each site alone.
PAIRS = (("federated", "centralised"), ("centralised", "none"), ("federated", "none"), ("federated", "local"),
         ("local", "none"))


def summarise(results: list[dict[str, Any]], cfg: ExperimentConfig) -> dict[str, Any]:
    """Mean and std over seeds of every metric, per arm and site (and pooled over the sites)."""
    main = results[0]["main"]
    arms = [a for a in cfg.compare.arms if any(r["arm"] == a for r in results)]
    sites = sorted({s for r in results for s in r["sites"]})
    summary: dict[str, Any] = {}
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        metrics = sorted({k for r in runs for k in r["pooled"] if k != "num-examples"})
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in runs], POOLED: {}, "sites": {}}
        for metric in metrics:
            entry[POOLED][metric] = _stats([r["pooled"].get(metric) for r in runs])
            for site in sites:
                entry["sites"].setdefault(site, {})[metric] = _stats([r["sites"].get(site, {}).get(metric) for r in runs])
        entry["final_val_loss"] = _stats([r["final_val_loss"] for r in runs])
        entry["pretrain_seconds"] = _stats([r["seconds"]["pretrain"] for r in runs])
        entry["total_seconds"] = _stats([r["seconds"]["total"] for r in runs])
        summary[arm] = entry
    return {"main": main, "finetune": cfg.compare.finetune, "seeds": list(cfg.compare.seeds), "sites": sites,
            "arms": summary, "paired": paired_differences(results, main), "paper": _published(cfg.compare.paper)}


def paired_differences(results: list[dict[str, Any]], main: str) -> dict[str, dict[str, Any]]:
    """Per-seed differences of the pooled test metric between two arms of the same seed (same data,
    splits and test cases, so the noise they share cancels), their mean and std over seeds, and how
    many seeds agree with the mean's sign. "beyond_spread": the mean difference is larger than the
    spread of the per-seed differences and every seed agrees in sign (needs two or more seeds)."""
    pooled = {(r["seed"], r["arm"]): r["pooled"].get(main) for r in results}
    seeds = sorted({r["seed"] for r in results})
    paired: dict[str, dict[str, Any]] = {}
    for a, b in PAIRS:
        per_seed = {seed: pooled[seed, a] - pooled[seed, b] for seed in seeds
                    if _finite(pooled.get((seed, a))) and _finite(pooled.get((seed, b)))}
        if not per_seed:
            continue
        stats = _stats(list(per_seed.values()))
        sign = math.copysign(1.0, stats["mean"]) if stats["mean"] else 0.0
        agree = sum(1 for d in per_seed.values() if d * sign > 0)
        paired[f"{a}-{b}"] = {"a": a, "b": b, "per_seed": {str(s): d for s, d in per_seed.items()}, **stats,
                              "agree": agree,
                              "beyond_spread": stats["n"] > 1 and agree == stats["n"] and abs(stats["mean"]) > stats["std"]}
    return paired


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def write_report(out: Path, results: list[dict[str, Any]], cfg: ExperimentConfig, plots: dict[str, Path]) -> Path:
    out = Path(out)
    summary = summarise(results, cfg)
    atomic_write_json(out / "results.json", finite_or_null({"summary": summary, "runs": results, "config": cfg.to_dict()}),
                      allow_nan=False)
    atomic_write_text(out / "results.csv", _csv(results))
    lines = [
        f"# fedmae comparison: {cfg.name}",
        "",
        _setup(cfg, summary),
        "",
        tables(summary),
        "",
        _reading(summary),
        "",
    ]
    for title, path in plots.items():
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(out).as_posix()})", ""]
    lines += ["Every figure: `results.json` (means, stds, each run and its pre-training curve) and `results.csv` "
              "(one row per seed, arm, site and metric). Each arm's runs and checkpoints: `seed-<S>/<arm>/`.", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def tables(summary: dict[str, Any]) -> str:
    """The main table, then (when two arms can be paired) the paired differences, then (with
    compare.paper) the paper's figures beside the run's: what the report and the command's output show."""
    text = main_table(summary) + (f"\n\n{paired_table(summary)}" if summary["paired"] else "")
    return text + (f"\n\n{paper_table(summary)}" if summary.get("paper") else "")


def _published(paper: str) -> dict[str, Any] | None:
    if paper == "none":
        return None
    return {"data": paper, **dataclasses.asdict(PUBLISHED[paper]), "source": SOURCE}


def paper_table(summary: dict[str, Any]) -> str:
    """Markdown: the paper's centralised figures (from scratch, after MAE self pre-training, the
    gain) beside this run's none and centralised arms (pooled test metric, mean +- std over seeds),
    then where the paper's figures come from."""
    figures, main, arms = PUBLISHED[summary["paper"]["data"]], summary["main"], summary["arms"]
    scratch, mae = (arms[arm][POOLED][main] if arm in arms else {} for arm in PAPER_ARMS)
    gain = summary["paired"].get("centralised-none")
    run_gain = "n/a" if gain is None else _signed(gain)
    if gain is not None and scratch.get("mean"):
        run_gain += f" ({gain['mean'] / scratch['mean']:+.1%})"
    rows = [["no pre-training", _figure(figures.scratch), cell(scratch)],
            ["MAE self pre-training (centralised)", _figure(figures.mae), cell(mae)],
            ["gain", figures.gain_text(), run_gain]]
    table = format_table([f"the paper's figures, {figures.title} (test {main})", "published", "this run"], rows,
                         markdown=True)
    return (f"{table}\n\nPublished: {SOURCE}: \"{figures.quote}\". The paper pre-trains and fine-tunes on one site's "
            f"whole training set; this run's figures are pooled over its {len(summary['sites'])} site(s), so the two "
            "should agree only with the paper's data, split and budgets (configs/paper/).")


def _figure(value: float | None) -> str:
    return "not published" if value is None else format_value(value)


def main_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per arm; the main test metric pooled and per site, mean +- std over seeds."""
    main, sites = summary["main"], summary["sites"]
    header = ["arm", f"test {main}, pooled", *[f"{site}" for site in sites], "final val recon. loss", "pre-training s"]
    rows = []
    for arm, entry in summary["arms"].items():
        rows.append([ARM_TITLES[arm], cell(entry[POOLED][main]), *[cell(entry["sites"][s][main]) for s in sites],
                     cell(entry["final_val_loss"], digits=4), cell(entry["pretrain_seconds"], digits=0, std=False)])
    return format_table(header, rows, markdown=True)


def cell(stats: dict[str, Any], digits: int = 3, std: bool = True) -> str:
    """'0.612 ± 0.010' (std over seeds; none shown for one seed); 'n/a' when undefined."""
    text = format_value(stats.get("mean"), digits)
    if std and stats.get("n", 0) > 1 and stats.get("std") is not None:
        text += f" ± {format_value(stats['std'], digits)}"
    return text


def _setup(cfg: ExperimentConfig, summary: dict[str, Any]) -> str:
    protocol = ("each site fine-tunes its arm's encoder on its own labels and is tested on its own test cases"
                if cfg.compare.finetune == "local" else
                "the sites fine-tune the whole model together (FedAvg on Flower) from the arm's encoder")
    seeds = summary["seeds"]
    return (f"{len(summary['sites'])} sites, {cfg.spatial_dims}D {cfg.task.type}, model {cfg.model.name}; "
            f"pre-training budget {cfg.pretrain.epochs} epochs for every arm (federated: {cfg.pretrain_rounds} rounds of "
            f"{cfg.federated.local_epochs} local epoch(s), {cfg.federated.strategy}); fine-tuning: {protocol}, "
            f"{cfg.finetune.epochs} epochs, {cfg.finetune.label_fraction:.0%} of the training labels, model chosen on "
            f"validation, reported on test. Pooled = sites' test metrics weighted by their test cases. "
            f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))})" + (": mean ± std." if len(seeds) > 1 else "."))


def paired_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per paired difference, each seed's value, mean +- std, seeds agreeing in sign."""
    paired, seeds = summary["paired"], summary["seeds"]
    header = [f"paired difference (pooled test {summary['main']})", *[f"seed {s}" for s in seeds], "mean ± std",
              "seeds agreeing in sign"]
    rows = [[f"{ARM_TITLES[p['a']]} − {ARM_TITLES[p['b']]}",
             *[f"{p['per_seed'][str(s)]:+.3f}" if str(s) in p["per_seed"] else "n/a" for s in seeds],
             _signed(p), f"{p['agree']}/{p['n']}"] for p in paired.values()]
    return format_table(header, rows, markdown=True)


def _signed(p: dict[str, Any]) -> str:
    return f"{p['mean']:+.3f}" + (f" ± {p['std']:.3f}" if p["n"] > 1 else "")


def _reading(summary: dict[str, Any]) -> str:
    """One paragraph that says what the tables say, computed from them: the ranking, then each
    paired difference and whether it is beyond the seed spread."""
    main, arms, paired = summary["main"], summary["arms"], summary["paired"]
    pooled = {arm: e[POOLED][main] for arm, e in arms.items() if e[POOLED][main].get("mean") is not None}
    if not pooled:
        return f"No arm produced a test {main}."
    ranked = sorted(pooled, key=lambda a: -pooled[a]["mean"])
    best = ranked[0]
    sentences = [f"On pooled test {main}, the {ARM_TITLES[best]} arm scores best ({cell(pooled[best])})"
                 + (f", then {', '.join(f'{ARM_TITLES[a]} ({cell(pooled[a])})' for a in ranked[1:])}." if len(ranked) > 1 else ".")]

    def size(p: dict[str, Any]) -> str:
        if p["n"] < 2:
            return "from a single seed, so the size of the noise is unknown"
        where = "beyond the seed spread" if p["beyond_spread"] else "within the seed spread"
        return f"{p['agree']} of {p['n']} seeds agree in sign; {where}"

    for key, what in (("federated-centralised", "Federated minus centralised"),
                      ("centralised-none", "Centralised pre-training minus no pre-training"),
                      ("federated-none", "Federated pre-training minus no pre-training"),
                      ("federated-local", "Federated minus each site pre-training alone"),
                      ("local-none", "Local-only pre-training minus no pre-training")):
        if key in paired:
            sentences.append(f"{what}: {_signed(paired[key])} ({size(paired[key])}).")
    gain, recovered = paired.get("centralised-none"), paired.get("federated-none")
    if gain and recovered:
        if gain["mean"] > 0 and (gain["beyond_spread"] or gain["n"] < 2):
            sentences.append(f"Federation recovers {recovered['mean'] / gain['mean']:.0%} of the centralised gain over "
                             "no pre-training.")
        elif gain["mean"] > 0:
            sentences.append("The centralised gain over no pre-training is within the seed spread, so the share of it "
                             "that federation recovers is not meaningful here.")
        else:
            sentences.append("Centralised pre-training does not beat no pre-training here, so there is no centralised "
                             "gain for federation to recover.")
    return " ".join(sentences)


def _stats(values: list[float | None]) -> dict[str, Any]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "n": len(finite)}


def _csv(results: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["seed", "arm", "site", "metric", "value"])
    for r in results:
        for site, metrics in [*sorted(r["sites"].items()), (POOLED, r["pooled"])]:
            for metric, value in sorted(metrics.items()):
                writer.writerow([r["seed"], r["arm"], site, metric, "" if value is None else value])
        writer.writerow([r["seed"], r["arm"], POOLED, "final_val_loss", "" if r["final_val_loss"] is None else r["final_val_loss"]])
        for phase, seconds in r["seconds"].items():
            writer.writerow([r["seed"], r["arm"], POOLED, f"seconds_{phase}", seconds])
    return buffer.getvalue()
