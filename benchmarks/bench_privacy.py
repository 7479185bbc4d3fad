"""What the privacy options cost: wall time, bytes and the downstream metric, against the same
federated run without them.

The built-in demo (`configs/demo.yaml`: three hospitals, 35 rounds x 4 local epochs, then each
hospital fine-tunes the encoder on its own labels and is tested on its own cases), federated arm
only, on Flower's simulation engine, once per variant in this process:

  none        FedAvg as in the demo (the reference; its rounds.jsonl gives the sites' update norms)
  dp-server   server-side clipping at the median update norm of `none`, noise multiplier 1.0
  dp-client   the same with the sites clipping, noise multiplier 0.1 (a weak guarantee: shows
              what clipping plus little noise costs)
  secagg      SecAgg+ (3 shares, threshold 2)

Bytes per site per round are measured on the messages of one in-process round of the same
model (real ServerApp / ClientApp code; Flower's SecAgg+ stages included).

    python benchmarks/bench_privacy.py [--variants none,dp-server,...] [--out DIR] [--epochs N]
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
sys.path.insert(0, str(REPO))  # run from anywhere in the checkout
from fedmae.engine.loop import MetricsLog  # noqa: E402
from flwr.common.serde import recorddict_to_proto  # noqa: E402

VARIANTS = ("none", "dp-server", "dp-client", "secagg")


def overrides_for(variant: str, clip: float | None) -> list[str]:
    if variant == "none":
        return []
    if variant == "dp-server":
        return ["federated.privacy.dp=server", "federated.privacy.noise_multiplier=1.0",
                f"federated.privacy.clipping_norm={clip}"]
    if variant == "dp-client":
        return ["federated.privacy.dp=client", "federated.privacy.noise_multiplier=0.1",
                f"federated.privacy.clipping_norm={clip}"]
    if variant == "secagg":
        return ["federated.privacy.secure_aggregation=true"]
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def run_variant(variant: str, out: Path, base: list[str], clip: float | None) -> dict:
    folder = out / variant
    sets = [*base, "compare.arms=[federated]", "compare.reconstructions=0", *overrides_for(variant, clip)]
    command = [sys.executable, "-m", "fedmae.cli", "compare", "--config", str(REPO / "configs/demo.yaml"),
               "--output", str(folder)] + [arg for s in sets for arg in ("--set", s)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    result = json.loads((folder / "seed-0" / "federated" / "result.json").read_text())
    flower = folder / "seed-0" / "federated" / "flower"
    records = MetricsLog(flower / "rounds.jsonl").read()
    # Under secure aggregation the server never sees a site's update, so there is no norm.
    norms = [r["update_norm"] for r in records if r.get("status") == "ok" and r.get("phase") == "pretrain"
             and "update_norm" in r]
    summary = json.loads((flower / "summary.json").read_text())
    # The arm's own clock (pre-training + fine-tuning), so a rerun that finds it finished reports
    # the time it took, not the time to skip it.
    return {"variant": variant, "overrides": sets, "wall_s": result["seconds"]["total"],
            "pretrain_s": result["seconds"]["pretrain"], "auc": result["pooled"][result["main"]],
            "sites": {s: m[result["main"]] for s, m in result["sites"].items()},
            "val_loss": result["final_val_loss"], "median_update_norm": statistics.median(norms) if norms else None,
            "privacy": summary.get("privacy")}


def bytes_per_round(variant: str, out: Path, clip: float | None) -> dict[str, float]:
    """Serialised size (protobuf, as Flower sends it) of what one site sends and receives in one
    pre-training round of the demo model, through the real ServerApp / ClientApp code in-process."""
    import yaml

    from fedmae.federated.settings import experiment_config
    from server.app import federated_run
    from server.inprocess import InProcessGrid
    from sites.app import app as client_app

    out = Path(tempfile.mkdtemp(prefix=f"bytes-{variant}-", dir=out))  # a fresh run every time
    raw = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    raw["pretrain"].update(epochs=4, warmup_epochs=1)
    raw["data"]["cases_per_site"] = 20
    raw["federated"]["finetune"] = "none"
    experiment = out / f"bytes-{variant}.yaml"
    experiment.write_text(yaml.safe_dump(raw))
    overrides = "; ".join(overrides_for(variant, clip))
    run_config = {"experiment": str(experiment), "overrides": overrides, "output-dir": str(out / f"bytes-{variant}"),
                  "resume": False}
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": 3} for i in range(3)], run_config)
    up: list[int] = []
    for node in grid.get_node_ids():
        grid.faults[node] = lambda request, reply: (up.append(recorddict_to_proto(reply.content).ByteSize())
                                                    if request.metadata.message_type == "train" else None) or reply
    federated_run(grid, experiment_config(run_config), out / f"bytes-{variant}", resume=False).run()
    down = [recorddict_to_proto(m.content).ByteSize() for m in grid.sent if m.metadata.message_type == "train"]
    return {"up_bytes_per_site": sum(up) / 3, "down_bytes_per_site": sum(down) / 3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the demo's 140)")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench-privacy-"))).absolute()
    base = [f"pretrain.epochs={args.epochs}"] if args.epochs else []
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if variants[0] != "none":
        variants.insert(0, "none")  # the reference, and the clipping norm
    rows = []
    clip = None
    for variant in variants:
        row = run_variant(variant, out, base, clip)
        if variant == "none":
            clip = round(row["median_update_norm"], 4)
        row.update(bytes_per_round(variant, out, clip))
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = rows[0]
    print(f"\n{'variant':10} {'wall s':>7} {'x none':>7} {'up MB':>7} {'x none':>7} {'AUC':>6} {'val loss':>9} "
          f"{'epsilon':>9}  (clip {clip})")
    for row in rows:
        eps = row["privacy"]["epsilon"] if row["privacy"] else None
        mb = row["up_bytes_per_site"] / 1e6
        print(f"{row['variant']:10} {row['wall_s']:7.1f} {row['wall_s'] / reference['wall_s']:7.2f} {mb:7.3f} "
              f"{row['up_bytes_per_site'] / reference['up_bytes_per_site']:7.2f} {row['auc']:6.3f} "
              f"{row['val_loss']:9.4f} {eps if eps is not None else '-':>9}")
    (out / "bench_privacy.json").write_text(json.dumps(rows, indent=2))
    print(f"\nresults: {out / 'bench_privacy.json'}")


if __name__ == "__main__":
    main()
