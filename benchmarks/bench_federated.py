"""What federation costs: wall time against centralised training of the same work, and bytes.

Same data (the built-in hospitals), same model, same samples and epochs, same validation
(every epoch / round) and checkpoint cadence (``--checkpoint-every``, both sides): centralised
pre-training on the pooled training images against federated pre-training of K sites with
``pretrain.epochs / local_epochs`` rounds (pre-training only, no fine-tuning).

* (a) overhead = federated wall time / centralised wall time, for
  - in-process: the real ServerApp + ClientApp code through an in-process grid (sites one after
    another), against ``pretrain()`` in the same process: fedmae's own per-round costs (site
    state on disk, checks, messages, checkpoints); neither side pays process start-up;
  - Flower simulation (``--flower``): `fedmae simulate` (a SuperLink, Ray and its actors; sites in
    parallel when the machine has the cores) against `fedmae pretrain`, both as a user runs
    them: a new process, imports and data checks included.
* (b) bytes per site per round, each way, measured on the messages (the weights' ArrayRecord as
  Flower's protobuf: arrays with their headers, names, shapes), against the whole MAE in fp32;
  and what fp16 / bf16 / int8 transport costs in final validation reconstruction loss.

``benchmarks/profile_round.py`` shows where each side's time goes.

    python benchmarks/bench_federated.py                       # 3 sites, 10 epochs, in-process only
    python benchmarks/bench_federated.py --flower --epochs 10 40   # both budgets, also Flower's engine
    python benchmarks/bench_federated.py --flower --epochs 40 --checkpoint-every 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere in the checkout
from fedmae.config import load_config  # noqa: E402
from fedmae.data.cohort import load_cohort  # noqa: E402
from fedmae.engine.pretrain import pretrain  # noqa: E402
from fedmae.federated.settings import experiment_config  # noqa: E402
from fedmae.models.factory import build_mae  # noqa: E402
from server.app import federated_run  # noqa: E402
from server.inprocess import InProcessGrid  # noqa: E402
from sites.app import app as client_app  # noqa: E402


def experiment(folder: Path, args: argparse.Namespace, transport: str = "fp32") -> Path:
    raw = yaml.safe_load((REPO / "configs/federated-demo.yaml").read_text())
    raw["data"]["num_sites"] = args.sites
    every = args.checkpoint_every
    raw["pretrain"].update(epochs=args.epochs, warmup_epochs=1, checkpoint_every=every)
    raw["federated"].update(local_epochs=args.local_epochs, min_sites=args.sites, finetune="none", transport=transport,
                            checkpoint_every=every)
    raw["device"] = "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def in_process(folder: Path, args: argparse.Namespace, transport: str, count_bytes: bool = True) -> dict:
    """A federated run on the in-process grid; ``count_bytes``: measure each message (which
    serialises it once more: off when timing)."""
    path = experiment(folder, args, transport)
    run_config = {"experiment": str(path), "overrides": "", "output-dir": str(folder / "out"), "resume": False}
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": args.sites} for i in range(args.sites)],
                         run_config, count_bytes=count_bytes)
    start = time.perf_counter()
    federated_run(grid, experiment_config(run_config), folder / "out", resume=False).run()
    seconds = time.perf_counter() - start
    down = [b for direction, kind, b in grid.traffic if direction == "down" and kind == "train"] or [0]
    up = [b for direction, kind, b in grid.traffic if direction == "up" and kind == "train"] or [0]
    records = [json.loads(line) for line in (folder / "out" / "rounds.jsonl").read_text().splitlines()]
    last_round = max(r["round"] for r in records if "evaluation" in r)
    evals = [r["evaluation"] for r in records if "evaluation" in r and r["round"] == last_round]
    val = sum(e["val_loss"] * e["num-examples"] for e in evals) / sum(e["num-examples"] for e in evals)
    return {"seconds": seconds, "down": max(down), "up": max(up), "val_loss": val}


def command_seconds(folder: Path, args: argparse.Namespace, command: str) -> float:
    """Wall time of `fedmae pretrain` or `fedmae simulate` in a new process, as a user runs it."""
    path = experiment(folder, args)
    command = [sys.executable, "-m", "fedmae.cli", command, "--config", str(path), "--output", str(folder / "out")]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-2000:] + result.stderr[-2000:])
    return time.perf_counter() - start


TRANSPORTS = ("fp32", "fp16", "bf16", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10],
                        help="pre-training epochs (= rounds x local epochs); several: one benchmark each")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="pretrain.checkpoint_every and federated.checkpoint_every (both sides alike)")
    parser.add_argument("--flower", action="store_true", help="also time `fedmae simulate` against `fedmae pretrain`")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = []
    for epochs in args.epochs:
        results.append(benchmark(argparse.Namespace(**{**vars(args), "epochs": epochs})))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def benchmark(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedmae-bench-"))
    cfg = load_config(experiment(work / "central", args))
    start = time.perf_counter()
    cohort = load_cohort(cfg)
    pretrain(cfg, work / "central" / "out", cohort=cohort)
    central = time.perf_counter() - start
    timed = in_process(work / "timed", args, "fp32", count_bytes=False)

    runs = {t: in_process(work / t, args, t) for t in TRANSPORTS}
    full_mae = sum(t.numel() * t.element_size() for t in build_mae(cfg).state_dict().values())
    commands = {}
    if args.flower:
        commands = {"pretrain": command_seconds(work / "cli-central", args, "pretrain"),
                    "simulate": command_seconds(work / "cli-flower", args, "simulate")}

    images = sum(len(s.train) + len(s.unlabelled) for s in cohort.sites)
    print(f"federated vs centralised MAE pre-training: {args.sites} built-in sites, {images} training images, "
          f"{args.epochs} epochs ({args.epochs // args.local_epochs} rounds x {args.local_epochs}), {cfg.model.name} "
          f"dim {cfg.size.embed_dim} depth {cfg.size.depth}, validated every epoch / round, checkpoints every "
          f"{args.checkpoint_every}, cpu ({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.2f}")
    print(f"  (a) in-process: centralised {central:.1f} s; federated {timed['seconds']:.1f} s "
          f"-> overhead ratio {timed['seconds'] / central:.2f}")
    if commands:
        print(f"      as commands: fedmae pretrain {commands['pretrain']:.1f} s; fedmae simulate (SuperLink, Ray, "
              f"actors) {commands['simulate']:.1f} s -> overhead ratio {commands['simulate'] / commands['pretrain']:.2f} "
              f"({commands['simulate'] / central:.2f} against the in-process centralised run)")
    print(f"  (b) per site per round; whole MAE in fp32 = {full_mae / 1e6:.3f} MB")
    print("      transport   server->site MB (vs whole MAE)   site->server MB (vs whole MAE)   final val loss   vs fp32")
    for name, r in runs.items():
        print(f"      {name:9s}   {r['down'] / 1e6:15.3f} ({r['down'] / full_mae:.3f})   {r['up'] / 1e6:15.3f} "
              f"({r['up'] / full_mae:.3f})   {r['val_loss']:14.5f}   {r['val_loss'] - runs['fp32']['val_loss']:+.5f}")
    return {"centralised_s": central, "in_process_s": timed["seconds"], "commands_s": commands,
            "full_mae_bytes": full_mae, "runs": runs, "sites": args.sites, "epochs": args.epochs,
            "checkpoint_every": args.checkpoint_every}


if __name__ == "__main__":
    main()
