"""What 8-bit transport costs on the demo: the federated arm of `fedmae demo` (configs/demo.yaml,
three hospitals, three seeds fixed in advance) with fp32 and with int8 weights on the wire, on
Flower's simulation engine, then each hospital's fine-tuning and test as in the demo.

Reported per seed and as paired per-seed differences (int8 - fp32, same data, splits and initial
weights): the final validation reconstruction loss and the pooled downstream test metric. The
bytes per site per round are measured by ``benchmarks/bench_federated.py``.

    python benchmarks/bench_transport.py [--transports fp32 int8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(transport: str, out: Path) -> dict[int, dict]:
    """The demo's federated arm with ``transport``: per seed, final val loss and pooled metric."""
    folder = out / transport
    sets = ["compare.arms=[federated]", "compare.reconstructions=0", f"federated.transport={transport}"]
    command = [sys.executable, "-m", "fedmae.cli", "compare", "--config", str(REPO / "configs/demo.yaml"),
               "--output", str(folder)] + [arg for s in sets for arg in ("--set", s)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{transport} failed:\n{done.stderr[-3000:]}")
    results = json.loads((folder / "results.json").read_text())
    main = results["summary"]["main"]
    return {r["seed"]: {"val_loss": r["final_val_loss"], main: r["pooled"][main], "main": main} for r in results["runs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="fedmae-transport-"))
    runs = {t: run(t, out) for t in args.transports}
    reference, seeds = args.transports[0], sorted(runs[args.transports[0]])
    main_metric = runs[reference][seeds[0]]["main"]
    print(f"demo, federated arm, seeds {seeds}; {main_metric} is the pooled test metric after each hospital's fine-tuning")
    for transport, per_seed in runs.items():
        cells = "  ".join(f"seed {s}: loss {per_seed[s]['val_loss']:.5f} {main_metric} {per_seed[s][main_metric]:.3f}"
                          for s in seeds)
        print(f"  {transport:5s} {cells}")
    for transport in args.transports[1:]:
        for key in ("val_loss", main_metric):
            differences = [runs[transport][s][key] - runs[reference][s][key] for s in seeds]
            spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
            print(f"  {transport} - {reference}, {key}: per seed {', '.join(f'{d:+.5f}' for d in differences)}; "
                  f"mean {statistics.fmean(differences):+.5f} +- {spread:.5f}")
    (out / "transport.json").write_text(json.dumps(runs, indent=2))
    print(f"results: {out / 'transport.json'}")


if __name__ == "__main__":
    main()
