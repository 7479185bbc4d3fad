"""How long a fedmae process takes to exit, with and without the final garbage collection.

Each trial starts a fresh interpreter that imports what a deployed site's ClientApp process
imports (``sites.app``: torch, timm, MONAI, Flower) and exits at once; the time from the end of
its imports to the end of the process is its exit. ``skip``: the process calls
:func:`fedmae.process_exit.skip_final_collection` (what ``sites.app`` does on import), ``collect``:
that call is undone, so CPython's last collection runs. Trials alternate between the two, so
drift on a shared machine hits both alike. The ratio is what to compare across machines.

    python benchmarks/process_exit.py                 # 7 trials each
    python benchmarks/process_exit.py --trials 3 --module monai
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import atexit, gc, sys, time
import {module}
import fedmae.process_exit as process_exit
process_exit.skip_final_collection()
if sys.argv[1] == "collect":
    atexit.unregister(gc.freeze)
print(time.time(), flush=True)
"""


def one_exit(module: str, mode: str) -> float:
    """Seconds from the end of the child's imports to the end of the child."""
    child = subprocess.run([sys.executable, "-c", CHILD.format(module=module), mode], cwd=ROOT, capture_output=True,
                           text=True, check=True)
    ended = time.time()
    return ended - float(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--module", default="sites.app", help="what the child imports (default: sites.app)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"collect": [], "skip": []}
    for _ in range(args.trials):
        for mode in times:
            times[mode].append(one_exit(args.module, mode))
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    print(json.dumps({"module": args.module, "trials": args.trials,
                      "exit_seconds_median": {m: round(v, 3) for m, v in medians.items()},
                      "exit_seconds_all": {m: [round(v, 3) for v in values] for m, values in times.items()},
                      "ratio_skip_to_collect": round(medians["skip"] / medians["collect"], 3)}, indent=1))


if __name__ == "__main__":
    main()
