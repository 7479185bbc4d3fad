"""The whole `fedmae demo`, timed: its runs one after another (`compare.parallel: 1`) and at once
(`auto`), and optionally an earlier checkout's demo, in one session, one after another.

Each variant runs the real command in a fresh output folder; the figure is its wall time and the
ratio to the first variant. The pooled test metric of every arm is printed beside it, so a faster
variant that computes something else shows. Nothing else may run meanwhile (2 busy processes on 2
cores slow PyTorch several-fold), and a full set takes about three demo runs.

    python benchmarks/bench_demo.py --baseline /tmp/old   # a worktree of an earlier commit first
    python benchmarks/bench_demo.py --only auto           # just the default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run_demo(repo: Path, out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    command = [sys.executable, "-m", "fedmae.cli", "demo", "--output", str(out)]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {"wall_s": wall, "pooled": {r["arm"]: r["pooled"][r["main"]] for r in runs},
            "pretrain_s": {r["arm"]: r["seconds"]["pretrain"] for r in runs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="an earlier checkout whose demo runs first, as it is")
    parser.add_argument("--only", choices=("1", "auto"), help="just this compare.parallel setting of this checkout")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    variants: list[tuple[str, Path, list[str]]] = []
    if args.baseline:
        variants.append((f"baseline {args.baseline}", args.baseline.resolve(), []))
    for parallel in ([args.only] if args.only else ["1", "auto"]):
        variants.append((f"this checkout, compare.parallel={parallel}", HERE, [f"compare.parallel={parallel}"]))
    results = {}
    work = Path(tempfile.mkdtemp(prefix="fedmae-bench-demo-"))
    try:
        for i, (name, repo, overrides) in enumerate(variants):
            results[name] = run_demo(repo, work / str(i), overrides)
            print(f"{name}: {results[name]['wall_s']:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = next(iter(results.values()))["wall_s"]
    print(f"\n{'variant':52s} {'wall s':>7s} {'ratio':>6s}  pooled test metric per arm")
    for name, r in results.items():
        arms = ", ".join(f"{arm} {value:.3f}" for arm, value in r["pooled"].items())
        print(f"{name:52s} {r['wall_s']:7.0f} {r['wall_s'] / first:6.2f}  {arms}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
