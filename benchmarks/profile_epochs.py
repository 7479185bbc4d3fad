"""Where a demo epoch's time goes: `fedmae pretrain` and `fedmae finetune` sampled by py-spy.

Runs each command on ``configs/demo.yaml`` (fewer epochs, same shapes) in a subprocess under
py-spy, then sorts every sample by what the main thread was doing: model forward, backward,
optimiser (step, clipping, zeroing), data (MONAI transforms, collation), loader start-up,
validation, checkpoint writing, logging and progress, the loop itself, and one-off start-up
(imports, data generation and checks, model building). Per-epoch figures are milliseconds per
epoch of training; start-up is per run.

    pip install py-spy
    python benchmarks/profile_epochs.py                       # this checkout
    python benchmarks/profile_epochs.py --repo /tmp/old       # another checkout (e.g. a worktree of
                                                              # an earlier commit), same machine
    python benchmarks/profile_epochs.py --against /tmp/old --repeats 3
                                                              # both, alternating, and their ratio
    python benchmarks/profile_epochs.py --ops                 # also torch.profiler's op table for one step

Run with nothing else on the machine. With ``--against`` the two checkouts alternate (A, B, A,
B, ...) so that drift on a shared machine hits both alike; each figure is the median over the
repeats, and the last epoch's losses of each show whether they still compute the same.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

# (category, predicate on the stack's frames, root first). The first that matches wins, so the
# phases that contain the others come first.
EPOCH_CATEGORIES = ["model forward", "model backward", "optimiser", "data: transforms and collation",
                    "loader start-up", "validation", "checkpoint writing", "logging and progress", "loop (other)"]


def categorise(frames: list[str]) -> str:
    def has(*names: str) -> bool:
        return any(f.split(" (")[0] in names for f in frames)

    def in_file(*parts: str) -> bool:
        return any(any(p in f for p in parts) for f in frames)

    if has("save_checkpoint"):
        return "checkpoint writing"
    if has("evaluate_sites"):
        return "start-up and other (once)"  # the final test evaluation, once per run
    if has("reconstruction_loss", "evaluate_dataset", "loader_metrics"):
        return "validation"
    if has("train_one_epoch"):
        if has("backward", "_engine_run_backward"):
            return "model backward"
        if has("clip_grad_norm_", "zero_grad") or in_file("torch/optim/"):
            return "optimiser"
        if in_file("torch/utils/data/") and has("__iter__", "_get_iterator", "__init__"):
            return "loader start-up"
        if in_file("monai/transforms/", "monai/data/", "torch/utils/data/", "fedmae/data/"):
            return "data: transforms and collation"
        if in_file("tqdm/"):
            return "logging and progress"
        if in_file("fedmae/models/", "timm/", "torch/nn/modules/", "monai/losses/", "torch/nn/functional"):
            return "model forward"
        return "loop (other)"
    if has("make_loader", "EpochLoader") or (in_file("torch/utils/data/dataloader.py") and has("__init__")):
        return "loader start-up"
    if has("write", "info", "on_epoch", "truncate_after") and in_file("fedmae/engine/loop.py", "logging/", "fedmae/comparison/"):
        return "logging and progress"
    if has("pretrain_epoch", "finetune_epoch"):
        return "loop (other)"
    return "start-up and other (once)"


def profile(command: list[str], repo: Path, rate: int, out: Path) -> collections.Counter:
    raw = out.with_suffix(".txt")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    subprocess.run(["py-spy", "record", "--nonblocking", "-r", str(rate), "--format", "raw", "-o", str(raw), "--",
                    sys.executable, "-m", "fedmae.cli", *command], check=True, env=env, cwd=repo,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[categorise(stack.split(";"))] += int(n)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=HERE, help="checkout to profile (default: this one)")
    parser.add_argument("--against", type=Path, help="a second checkout to profile alternately, for the ratio")
    parser.add_argument("--repeats", type=int, default=1, help="runs per checkout (median reported)")
    parser.add_argument("--epochs", type=int, default=20, help="pre-training epochs (fine-tuning: half)")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's op table for one MAE step")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is needed: pip install py-spy")
    repos = [args.repo.resolve()] + ([args.against.resolve()] if args.against else [])
    runs: dict[str, list[dict]] = {str(r): [] for r in repos}
    for _ in range(args.repeats):
        for repo in repos:
            runs[str(repo)].append(profile_repo(repo, args.epochs, args.rate))
    results = {}
    for repo, profiles in runs.items():
        results[repo] = {name: _median_profile([p[name] for p in profiles]) for name in profiles[0]}
        for name, figures in results[repo].items():
            per_epoch, total = figures["ms_per_epoch"], sum(figures["ms_per_epoch"].values())
            print(f"\n{name} ({figures['epochs']} epochs of configs/demo.yaml, {repo}): {total:.0f} ms per epoch, "
                  f"start-up {figures['startup_s']:.1f} s; last epoch {figures['last']}")
            for category in EPOCH_CATEGORIES:
                share = per_epoch[category] / total if total else 0.0
                print(f"  {category:32s} {per_epoch[category]:8.1f} ms  {share:6.1%}")
    if args.against:
        a, b = (results[str(r)] for r in repos)
        for name in a:
            ratio = sum(a[name]["ms_per_epoch"].values()) / sum(b[name]["ms_per_epoch"].values())
            print(f"\n{name}: {repos[0].name} / {repos[1].name} time per epoch = {ratio:.2f} "
                  f"({1 / ratio:.2f}x faster)" if ratio < 1 else f"\n{name}: ratio {ratio:.2f}")
    if args.ops:
        print_ops(repos[0])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def profile_repo(repo: Path, epochs: int, rate: int) -> dict:
    """Both commands of one checkout under py-spy: per-epoch milliseconds by category."""
    config = str(repo / "configs" / "demo.yaml")
    work = Path(tempfile.mkdtemp(prefix="fedmae-profile-"))
    try:
        pre_epochs, ft_epochs = epochs, max(2, epochs // 2)
        commands = {
            "pretrain": (["pretrain", "--config", config, "--output", str(work / "pre"), "--set", f"pretrain.epochs={pre_epochs}",
                          "--set", "pretrain.warmup_epochs=1"], pre_epochs, work / "pre"),
            "finetune": (["finetune", "--config", config, "--output", str(work / "ft"), "--set", f"finetune.epochs={ft_epochs}",
                          "--set", "finetune.warmup_epochs=1", "--encoder", str(work / "pre" / "checkpoint_last.pt")],
                         ft_epochs, work / "ft"),
        }
        out = {}
        for name, (command, n, run) in commands.items():
            counts = profile(command, repo, rate, work / name)
            last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
            out[name] = {"epochs": n, "ms_per_epoch": {c: counts[c] / rate / n * 1e3 for c in EPOCH_CATEGORIES},
                         "startup_s": counts["start-up and other (once)"] / rate,
                         "last": {k: round(v, 6) for k, v in last.items() if "loss" in k or k.startswith("val_")}}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _median_profile(profiles: list[dict]) -> dict:
    """The run whose per-epoch total is the median (its breakdown, as measured)."""
    ordered = sorted(profiles, key=lambda p: sum(p["ms_per_epoch"].values()))
    return ordered[len(ordered) // 2]


def print_ops(repo: Path) -> None:
    """torch.profiler's view of one demo MAE step (forward, backward, clipping, AdamW), by op kind."""
    code = r'''
import torch
from torch.profiler import profile, ProfilerActivity
from fedmae.config import load_config
from fedmae.engine.optim import build_optimizer
from fedmae.models.factory import build_mae
cfg = load_config("configs/demo.yaml")
torch.manual_seed(0)
model = build_mae(cfg)
opt = build_optimizer(model, cfg.pretrain_lr, 0.05, (0.9, 0.95))
x = torch.randn(cfg.pretrain.batch_size, 1, *cfg.model.img_size)
def step():
    loss, _, _ = model(x); opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0); opt.step()
for _ in range(5): step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10): step()
kinds = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "attention": ("flash",), "gelu": ("gelu",),
         "layer norm": ("layer_norm",), "convolution": ("convolution",)}
events = prof.key_averages()
total = sum(e.self_cpu_time_total for e in events)
print(f"\none MAE step of configs/demo.yaml (torch.profiler, 10 steps): {total / 10 / 1e3:.1f} ms CPU time per step")
optimiser = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
print(f"  {'optimiser':12s} {optimiser / 10 / 1e3:7.2f} ms  {optimiser / total:6.1%}  (AdamW step, all its ops)")
for kind, keys in kinds.items():
    t = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys))
    print(f"  {kind:12s} {t / 10 / 1e3:7.2f} ms  {t / total:6.1%}")
'''
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})


if __name__ == "__main__":
    main()
