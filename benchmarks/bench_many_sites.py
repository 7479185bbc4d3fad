"""Many sites on Flower's simulation engine: does the run complete, and does its memory stay bounded?

Runs ``fedmae simulate`` (the real SuperLink, Ray and ClientApp processes) on N built-in sites
for R pre-training rounds of a tiny model, while sampling the memory of the whole process tree
(this process and every descendant: SuperLink, ``flwr run``, Ray's workers) twice a second. The
memory is summed PSS (proportional set size: shared pages counted once across processes) from
``/proc/PID/smaps_rollup``. It reports the peak, the tree's memory when round 5 and the last
round were averaged and their ratio (the growth target: < 1.10), and the wall time per round.

    python benchmarks/bench_many_sites.py --sites 71 --rounds 20
    python benchmarks/bench_many_sites.py --sites 8 --rounds 20 --demo-model

``--demo-model`` uses configs/demo.yaml's model instead of the tiny one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import yaml  # noqa: E402

from fedmae.config import config_from_dict  # noqa: E402
from fedmae.federated.simulate import simulate  # noqa: E402
from fedmae.federated.watchdog import descendants  # noqa: E402

TINY_MODEL = {"name": "vit_tiny_patch8_2d", "img_size": [32, 32], "embed_dim": 32, "depth": 4, "num_heads": 2,
              "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def experiment(sites: int, rounds: int, demo_model: bool, live_sites: int) -> dict:
    model = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())["model"] if demo_model else TINY_MODEL
    return {
        "name": f"many-sites-{sites}", "seed": 0, "device": "cpu", "model": model,
        "data": {"num_sites": sites, "cases_per_site": 8, "num_workers": 0},
        "task": {"type": "classification"},
        "pretrain": {"epochs": rounds, "warmup_epochs": 1, "batch_size": 4},
        "finetune": {"epochs": 1, "warmup_epochs": 0, "batch_size": 4},
        "federated": {"min_sites": 1, "round_timeout": 1800, "finetune": "none", "live_sites": live_sites},
    }


def pss_kib(pid: int) -> int:
    """A process's PSS in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """The tree's memory twice a second, and the moment each round's summary line appears."""

    def __init__(self, rounds_log: Path):
        super().__init__(daemon=True)
        self.rounds_log, self.stop = rounds_log, threading.Event()
        self.peak_kib, self.at_round, self.round_seen = 0, {}, {}

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.wait(0.5):
            tree = sum(pss_kib(pid) for pid in [me, *descendants(me)])
            self.peak_kib = max(self.peak_kib, tree)
            if self.rounds_log.is_file():
                for line in self.rounds_log.read_text().splitlines():
                    record = json.loads(line)
                    if "usable" in record and record["round"] not in self.round_seen:
                        self.round_seen[record["round"]] = time.monotonic()
                        self.at_round[record["round"]] = tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=71)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--demo-model", action="store_true")
    parser.add_argument("--live-sites", type=int, default=8, help="federated.live_sites")
    parser.add_argument("--output", type=Path, default=None, help="where the run goes (default: a temp folder)")
    args = parser.parse_args()
    cfg = config_from_dict(experiment(args.sites, args.rounds, args.demo_model, args.live_sites))
    out = args.output or Path(tempfile.mkdtemp(prefix="fedmae-many-sites-")) / "run"
    sampler = Sampler(out / "rounds.jsonl")
    started = time.monotonic()
    sampler.start()
    with open(os.devnull, "wb") as quiet:
        status = simulate(cfg, args.sites, out, stream=quiet)
    wall = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    seen = sampler.round_seen
    done = sorted(seen)
    per_round = [seen[r] - seen[r - 1] for r in done if r - 1 in seen]
    last = done[-1] if done else 0
    result = {
        "sites": args.sites, "rounds": args.rounds, "model": "demo" if args.demo_model else "tiny",
        "live_sites": args.live_sites, "exit_status": status, "completed_rounds": len(done),
        "summary_written": (out / "summary.json").is_file(), "wall_s": round(wall, 1),
        "peak_tree_pss_mib": round(sampler.peak_kib / 1024, 1),
        "pss_mib_after_round_5": round(sampler.at_round.get(5, 0) / 1024, 1),
        f"pss_mib_after_round_{last}": round(sampler.at_round.get(last, 0) / 1024, 1),
        "growth_round_5_to_last": (round(sampler.at_round[last] / sampler.at_round[5], 3)
                                   if 5 in sampler.at_round and sampler.at_round[5] else None),
        "round_s_median": round(sorted(per_round)[len(per_round) // 2], 2) if per_round else None,
        "round_s_max": round(max(per_round), 2) if per_round else None,
        "output": str(out),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
