"""The demo's design study: does a pre-training recipe beat no pre-training downstream, per seed?

For each seed (in parallel worker processes, one thread each) it pre-trains the centralised MAE
on the demo's data with ``--pre`` overrides, then every site fine-tunes on its own labels from that
encoder and from a random initialisation, for each ``--ft`` set of overrides, and prints the pooled
test metric per seed and the paired difference (centralised - none). Pre-training runs are cached
under ``--out`` by their overrides, so fine-tuning variants reuse them. Seeds are given in advance
(default 0 1 2); model selection is on validation, the printed figures are test.

    python benchmarks/study_demo.py --pre "pretrain.epochs=60" --ft "finetune.epochs=15" --ft "finetune.epochs=30"

The measurements behind configs/demo.yaml are in docs/demo.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tag(overrides: list[str]) -> str:
    return hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8]


def one_seed(config: str, pre: list[str], variants: list[list[str]], seed: int, out: str) -> tuple[int, dict]:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from fedmae.comparison import arms
    from fedmae.comparison.run import finetune_site
    from fedmae.config import load_config
    from fedmae.data.cohort import load_cohort
    from fedmae.metrics import weighted_mean

    cfg = load_config(config, [*pre, f"seed={seed}"])
    folder = Path(out) / f"pre-{_tag(pre)}" / f"seed-{seed}"
    cohort = load_cohort(cfg)
    started = time.monotonic()
    pretrained = arms.centralised(cfg, cohort, folder / "centralised", lambda message: None)
    result: dict = {"pretrain_s": round(time.monotonic() - started, 1),
                    "val_loss": pretrained.curve[-1]["val_loss"] if pretrained.curve else None}
    encoder = arms.encoder_checkpoint("centralised", folder / "centralised", "")
    for variant in variants:
        vcfg = load_config(config, [*pre, *variant, f"seed={seed}"])
        for arm, start in (("centralised", encoder), ("none", None)):
            per_site = {site.name: finetune_site(vcfg, cohort, site.name, start, folder / f"ft-{_tag(variant)}-{arm}",
                                                 lambda message: None)[0] for site in cohort.sites}
            pooled = weighted_mean(per_site.values())
            main = next(k for k in pooled if k not in ("main", "num-examples") and "/" not in k)
            result[" ".join(variant), arm] = pooled[main]
    return seed, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--pre", default="", help="overrides for the data, model and pre-training (space-separated)")
    parser.add_argument("--ft", action="append", default=[], help="a fine-tuning variant's overrides (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="runs/study-demo")
    args = parser.parse_args()
    pre, variants = args.pre.split(), [v.split() for v in args.ft] or [[]]
    started = time.monotonic()
    with ProcessPoolExecutor(args.workers) as pool:
        results = dict(pool.map(one_seed, *zip(*[(args.config, pre, variants, s, args.out) for s in args.seeds])))
    print(f"pre-training: {args.pre or '(the config as is)'}; {time.monotonic() - started:.0f} s")
    for seed, r in results.items():
        print(f"  seed {seed}: pre-training {r['pretrain_s']} s, final val loss {r['val_loss']:.4f}")
    for variant in variants:
        key = " ".join(variant)
        print(f"fine-tuning: {key or '(the config as is)'}")
        diffs = [results[s][key, "centralised"] - results[s][key, "none"] for s in args.seeds]
        for arm in ("centralised", "none"):
            print(f"  {arm:12s}" + "".join(f"  seed {s}: {results[s][key, arm]:.3f}" for s in args.seeds))
        print("  centralised - none" + "".join(f"  {d:+.3f}" for d in diffs) + f"  mean {sum(diffs) / len(diffs):+.3f}")


if __name__ == "__main__":
    main()
