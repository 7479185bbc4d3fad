"""Where a federated round's time goes, against a centralised epoch of the same work.

In-process (the real ServerApp and ClientApp through the in-process grid, sites one after
another): every stage of a round is timed by wrapping the function that does it (exclusive time:
a stage nested in another is not counted twice), e.g. a site's training epochs, its state on
disk, the global checkpoint, the reply checks and FedAvg. The wrappers cost microseconds per call,
so, unlike a sampling profiler, they leave the run's speed as it is. The centralised run of the
same samples and epochs is timed the same way.

With ``--flower``: `fedmae simulate` on Flower's simulation engine, its output timestamped line by
line: start-up (imports and data checks, SuperLink, Ray, the site actors' first answer), the
rounds (each round's wall time at the server, and the sites' training time inside it), shut-down.

    python benchmarks/profile_round.py                      # 3 built-in sites, 40 epochs, in-process
    python benchmarks/profile_round.py --flower             # and the same on Flower's simulation engine
    python benchmarks/profile_round.py --set federated.checkpoint_every=5   # a setting changed on both sides

Run with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.bench_federated import experiment  # noqa: E402

# (stage, "module:attribute path") of the functions whose time is the stage's. Order is display order.
FEDERATED_STAGES = [
    ("site: training epochs", "fedmae.federated.site:pretrain_epoch"),
    ("site: evaluation", "fedmae.federated.site:SitePretraining.evaluate"),
    ("site: state to disk", "fedmae.federated.site:_SiteRounds._save"),
    ("site: model rebuilt / state read", "fedmae.federated.site:_SiteRounds._build"),
    ("site: model rebuilt / state read", "fedmae.federated.site:_SiteRounds._restore"),
    ("site: update out (transport, clipping)", "fedmae.federated.site:_SiteRounds._leaving"),
    ("site: weights in (checks, transport)", "sites.app:received_model"),
    ("site: start (data, loaders)", "fedmae.federated.site_run:_new_site_run"),
    ("site: start (data, loaders)", "fedmae.federated.site:SitePretraining.__init__"),
    ("messages: tensors <-> ArrayRecord", "flwr.app:ArrayRecord.__init__"),
    ("messages: tensors <-> ArrayRecord", "flwr.app:ArrayRecord.to_torch_state_dict"),
    ("server: reply checks + aggregation", "server.strategy:GuardedRounds.aggregate_train"),
    ("server: configure round", "server.strategy:GuardedRounds.configure_train"),
    ("server: configure round", "server.strategy:GuardedRounds.configure_evaluate"),
    ("server: evaluation aggregate", "server.strategy:GuardedRounds.aggregate_evaluate"),
    ("server: global checkpoint", "fedmae.federated.global_model:GlobalCheckpoints.save"),
    ("server: metrics log", "fedmae.engine.loop:MetricsLog.write"),
    ("benchmark: counting bytes", "server.inprocess:weight_bytes"),
]
CENTRAL_STAGES = [
    ("training epochs", "fedmae.engine.pretrain:pretrain_epoch"),
    ("validation", "fedmae.engine.pretrain:reconstruction_loss"),
    ("checkpoint", "fedmae.engine.pretrain:save_checkpoint"),
    ("data: load and check", "fedmae.data.cohort:load_cohort"),
    ("metrics log", "fedmae.engine.loop:MetricsLog.write"),
]


class StageTimer:
    """Exclusive seconds per stage, from wrapped functions (a stack subtracts nested stages)."""

    def __init__(self, stages: list[tuple[str, str]]):
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self._stack: list[list[float]] = []  # per active call: [start, time spent in nested stages]
        self._undo = []
        for stage, where in stages:
            self._wrap(stage, where)

    def _wrap(self, stage: str, where: str) -> None:
        module_name, _, path = where.partition(":")
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        timer = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            timer._stack.append([time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                start, nested = timer._stack.pop()
                spent = time.perf_counter() - start
                timer.seconds[stage] += spent - nested
                timer.calls[stage] += 1
                if timer._stack:
                    timer._stack[-1][1] += spent

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def _config(folder: Path, args: argparse.Namespace) -> Path:
    # Checkpoint cadence and the rest: the config's, or --set on both sides.
    return experiment(folder, argparse.Namespace(sites=args.sites, epochs=args.epochs, local_epochs=1, checkpoint_every=1))


def in_process(work: Path, args: argparse.Namespace) -> dict:
    from fedmae.config import load_config
    from fedmae.data.cohort import load_cohort
    from fedmae.engine.pretrain import pretrain
    from fedmae.federated.settings import experiment_config
    from server.app import federated_run
    from server.inprocess import InProcessGrid
    from sites.app import app as client_app

    path = _config(work, args)
    overrides = "; ".join(args.set)
    cfg = load_config(path, overrides=list(args.set))

    timer = StageTimer(CENTRAL_STAGES)
    start = time.perf_counter()
    pretrain(cfg, work / "central", cohort=load_cohort(cfg))
    central = {"wall": time.perf_counter() - start, "stages": dict(timer.seconds)}
    timer.restore()

    run_config = {"experiment": str(path), "overrides": overrides, "output-dir": str(work / "federated"), "resume": False}
    timer = StageTimer(FEDERATED_STAGES)
    start = time.perf_counter()
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": args.sites} for i in range(args.sites)],
                         run_config, count_bytes=False)
    federated_run(grid, experiment_config(run_config), work / "federated", resume=False).run()
    federated = {"wall": time.perf_counter() - start, "stages": dict(timer.seconds)}
    timer.restore()
    return {"centralised": central, "federated": federated}


def print_in_process(result: dict, epochs: int) -> None:
    central, federated = result["centralised"], result["federated"]
    print(f"\nin-process, {epochs} epochs = {epochs} rounds: centralised {central['wall']:.1f} s, federated "
          f"{federated['wall']:.1f} s -> ratio {federated['wall'] / central['wall']:.2f}")
    for name, part in (("centralised, per epoch", central), ("federated, per round", federated)):
        print(f"  {name:44s} {'ms':>8s}")
        rest = part["wall"] - sum(part["stages"].values())
        for stage, seconds in [*part["stages"].items(), ("other (imports, set-up, glue)", rest)]:
            print(f"    {stage:42s} {seconds / epochs * 1e3:8.1f}")


def flower(work: Path, args: argparse.Namespace) -> dict:
    """`fedmae simulate`, its output timestamped: start-up, rounds and shut-down."""
    path = _config(work / "flower", args)
    command = [sys.executable, "-m", "fedmae.cli", "simulate", "--config", str(path), "--output", str(work / "flower" / "out")]
    for item in args.set:
        command += ["--set", item]
    marks = {}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                               env={**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    events = {"data checked": "simulating ", "run started": "Successfully started run",
              "simulation engine started": "Starting Flower Simulation", "sites answered": "sites: ",
              "last round done": "federated run done"}
    lines = []
    for line in process.stdout:
        now = time.perf_counter() - start
        lines.append(line)
        for name, text in events.items():
            if text in line and name not in marks:
                marks[name] = now
    process.wait()
    marks["exited"] = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError("".join(lines[-40:]))
    records = [json.loads(line) for line in (work / "flower" / "out" / "rounds.jsonl").read_text().splitlines()]
    rounds = [r for r in records if "sampled" in r]
    sites = [r for r in records if r.get("status") == "ok"]
    return {"marks": marks, "round_seconds": [r["seconds"] for r in rounds],
            "site_training_seconds": sum(r["seconds"] for r in sites) / max(1, len(rounds))}


def print_flower(result: dict, central_wall: float | None) -> None:
    marks = result["marks"]
    print(f"\nFlower simulation (fedmae simulate): {marks['exited']:.1f} s"
          + (f" -> ratio {marks['exited'] / central_wall:.2f} against the centralised run above" if central_wall else ""))
    previous = 0.0
    for name, at in marks.items():
        print(f"    {name:42s} at {at:6.1f} s  (+{at - previous:5.1f})")
        previous = at
    seconds = result["round_seconds"]
    print(f"    rounds: {len(seconds)}, training round at the server median {sorted(seconds)[len(seconds) // 2] * 1e3:.0f} ms "
          f"(sites' own training, summed over sites, {result['site_training_seconds'] * 1e3:.0f} ms a round)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--flower", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for both runs (repeatable)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="fedmae-profile-round-"))
    result = {"in_process": in_process(work, args)}
    print_in_process(result["in_process"], args.epochs)
    if args.flower:
        result["flower"] = flower(work, args)
        print_flower(result["flower"], result["in_process"]["centralised"]["wall"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
