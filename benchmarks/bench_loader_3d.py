"""Does 3-D loading keep up with MAE pre-training? Loader samples/s against train-step samples/s.

One process, one data set: a Decathlon-layout CT folder of gzip NIfTI volumes at a clinical voxel
size (stored LPS-like, so orienting, resampling to 1.5 x 1.5 x 2.0 mm, windowing and foreground
cropping all do real work), read through fedmae's own path (``load_cohort`` ->
``pretraining_dataset`` -> ``EpochLoader``, one loader whose workers persist across epochs, as
``pretrain`` builds it).

* step: MAE pre-training steps (forward, masked loss, backward, clip, AdamW) on real crops, batch B;
  median over steps after warm-up; bf16 autocast on CUDA, fp32 on CPU, as fedmae trains.
* loader, ``data.cache: none``: every sample is decoded, oriented, resampled, windowed, cropped.
* loader, ``memory`` (MONAI CacheDataset): the one-off fill is timed apart, with the resident-memory
  growth it costs; then epochs draw random crops + flips from the cached tensors.
* loader, ``disk`` (MONAI PersistentDataset): the first pass computes and writes, later passes read.
Each loader setting runs with ``data.num_workers`` 0 and 2 (``--workers``); its rate is the median
of per-epoch samples/s, start-up included (``1st batch s``: the first epoch starts the workers; later
epochs reuse them). The load average is printed because other
work on a shared machine skews every figure.

Read ``ratio`` = loader samples/s / step samples/s: above 1 the loader can keep up with training,
below 1 training waits for data. With num_workers 0 loading and stepping take turns, so even a
ratio R > 1 adds 1/R of a step's time per sample; with workers they overlap (given spare cores).

    python benchmarks/bench_loader_3d.py                  # CPU-sized: ViT-S/16 64^3, 8 x 192x192x64 CT
    python benchmarks/bench_loader_3d.py --preset paper   # BTCV-like: ViT-B/16 96^3, 12 x 512x512x100 CT
    python benchmarks/bench_loader_3d.py --preset paper --volumes 2 --steps 1 --warmup 0 --epochs 1 \
        --min-seconds 0 --workers 0                      # a quick check of the paper path on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

from benchmarks.memory import with_peak_rss  # noqa: E402
from fedmae.config import config_from_dict  # noqa: E402
from fedmae.data.cohort import load_cohort  # noqa: E402
from fedmae.data.datasets import pretraining_dataset  # noqa: E402
from fedmae.data.loader import EpochLoader, epoch_seed  # noqa: E402
from fedmae.engine.device import allow_tf32, autocast  # noqa: E402
from fedmae.engine.optim import build_optimizer  # noqa: E402
from fedmae.engine.pretrain import mae_loss  # noqa: E402
from fedmae.models.factory import build_mae  # noqa: E402


@dataclass
class Setup:
    model: str = "vit_small_patch16_3d"  # ViT-S/16, decoder 256 x 4
    img_size: int = 64
    batch: int = 2
    volumes: int = 8
    shape: tuple[int, int, int] = (192, 192, 64)
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)


PRESETS = {
    "cpu": Setup(),
    "paper": Setup("vit_base_patch16_3d", 96, 4, 12, (512, 512, 100), (0.75, 0.75, 2.5)),  # decoder 384 x 8
}


def write_ct(root: Path, s: Setup, seed: int = 0) -> Path:
    """An abdomen-like CT set in Hounsfield units (int16), air around an elliptic body with organs."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in s.shape)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    affine = np.diag([-s.spacing[0], -s.spacing[1], s.spacing[2], 1.0])  # LPS-like, as converters write
    affine[:3, 3] = [100.0, 120.0, -50.0]
    training = []
    for i in range(s.volumes):
        c = rng.uniform(-0.15, 0.15, 3).astype(np.float32)
        body = ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1) & (np.abs(z) <= 1)
        liver = ((x - c[0]) / 0.35) ** 2 + ((y + 0.35 - c[1]) / 0.3) ** 2 + (z / 0.6) ** 2 < 1
        spleen = ((x - c[0]) / 0.2) ** 2 + ((y - 0.45) / 0.18) ** 2 + ((z - c[2]) / 0.4) ** 2 < 1
        hu = np.where(body, np.where(liver, 60.0, np.where(spleen, 110.0, 40.0)), -1000.0).astype(np.float32)
        hu += 10 * rng.standard_normal(s.shape, dtype=np.float32)
        name = f"abdomen_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), root / "imagesTr" / name)
        training.append({"image": f"./imagesTr/{name}"})
    meta = {"name": "Abdomen", "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": {"0": "background"},
            "numTraining": s.volumes, "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def make_cfg(s: Setup, root: Path, cache: str = "memory", workers: int = 0, device: str = "cpu"):
    return config_from_dict({
        "device": device,
        "model": {"name": s.model, "img_size": [s.img_size] * 3},
        "data": {"source": "decathlon", "root": str(root), "num_sites": 1, "check": "quick", "cache": cache,
                 "cache_dir": str(root / "cache"), "num_workers": workers},
        "pretrain": {"batch_size": s.batch},
    })


def loader_rate(dataset, cfg, epochs: int, min_seconds: float = 0.0) -> dict:
    """Median per-epoch samples/s and seconds to the first batch (median over epochs; the first
    epoch starts the workers), over at least ``epochs`` shuffled passes and ``min_seconds``, through
    one loader as pre-training uses it."""
    loader = EpochLoader(dataset, cfg.pretrain.batch_size, True, cfg.data.num_workers, torch.device(cfg.device))
    rates, firsts, began = [], [], time.perf_counter()
    while len(rates) < epochs or time.perf_counter() - began < min_seconds:
        start, count, first = time.perf_counter(), 0, None
        for batch in loader.epoch(epoch_seed(cfg.seed, len(rates))):
            count += len(batch["image"])
            first = first or time.perf_counter() - start
        rates.append(count / (time.perf_counter() - start))
        firsts.append(first)
    return {"rate": statistics.median(rates), "first_s": statistics.median(firsts), "epochs": len(rates)}


def step_rate(cfg, batch: dict, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(median step seconds, samples/s) of MAE pre-training steps on one real batch."""
    torch.manual_seed(0)
    model = build_mae(cfg).to(device).train()
    p = cfg.pretrain
    optimizer = build_optimizer(model, cfg.pretrain_lr, p.weight_decay, p.betas)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast(device):
            loss = mae_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if p.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.clip_grad)
        optimizer.step()
        loss.item()  # a sync point, so the step is timed whole
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median, len(batch["image"]) / median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--volumes", type=int, help="override the preset's number of volumes")
    parser.add_argument("--shape", type=int, nargs=3, help="override the preset's stored volume shape")
    parser.add_argument("--steps", type=int, default=8, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="at least this many timed loader epochs per setting")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="and at least this long per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data.num_workers values")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    s = PRESETS[args.preset]
    s = replace(s, volumes=args.volumes or s.volumes, shape=tuple(args.shape or s.shape))
    device = torch.device(args.device)
    if device.type == "cuda":
        allow_tf32()
    threads = f"cpu ({torch.get_num_threads()} threads)"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads

    load = os.getloadavg()[0]  # a shared machine's other work skews every figure below
    with tempfile.TemporaryDirectory(prefix="bench_loader_3d_") as tmp:
        root = Path(tmp) / "Task_Abdomen"
        start = time.perf_counter()
        write_ct(root, s)
        write_s = time.perf_counter() - start
        base = make_cfg(s, root)
        cohort = load_cohort(base)
        # Every volume, whatever split it was drawn into: the benchmark wants the same data throughout.
        images = [c.image for split in ("train", "val", "test", "unlabelled") for c in cohort.cases(split)]
        prep = cohort.prep
        rows: list[dict] = []  # one per (cache, workers): fill_s, rate (median samples/s), first_s, epochs

        def measure(dataset, cache: str, w: int) -> dict:
            return loader_rate(dataset, make_cfg(s, root, cache, w), args.epochs, args.min_seconds)

        # Memory cache first, so that its RSS growth is not hidden in memory freed by other work.
        cfg = make_cfg(s, root, "memory")
        mem_set, fill_s, peak_mb, kept_mb = with_peak_rss(lambda: pretraining_dataset(images, cfg, prep))
        cached = [item["image"] for item in mem_set.store]
        cache_mb = sum(x.nbytes for x in cached) / 2**20
        shapes = sorted({tuple(x.shape[1:]) for x in cached})
        for i, w in enumerate(args.workers):
            fill = None if i else fill_s
            rows.append({"cache": "memory", "workers": w, "fill_s": fill, **measure(mem_set, "memory", w)})
        # B real random crops for the train steps (volumes are reused when there are fewer than B).
        batch = {"image": torch.stack([mem_set[i % len(mem_set)]["image"] for i in range(s.batch)])}
        del mem_set, cached

        for w in args.workers:
            dataset = pretraining_dataset(images, make_cfg(s, root, "none", w), prep)
            rows.append({"cache": "none", "workers": w, "fill_s": None, **measure(dataset, "none", w)})

        for i, w in enumerate(args.workers):
            dataset, fill = pretraining_dataset(images, make_cfg(s, root, "disk", w), prep), None
            if i == 0:  # the first pass computes and writes every volume; later passes read them
                start = time.perf_counter()
                loader_rate(dataset, make_cfg(s, root, "disk", w), 1)
                fill = time.perf_counter() - start
            rows.append({"cache": "disk", "workers": w, "fill_s": fill, **measure(dataset, "disk", w)})
        disk_mb = sum(f.stat().st_size for f in (root / "cache").rglob("*") if f.is_file()) / 2**20

        step_s, step_samples = step_rate(make_cfg(s, root, device=args.device), batch, device, args.warmup, args.steps)

    size = base.size
    print(f"3-D loader vs MAE step: {len(images)} CT volumes {'x'.join(map(str, s.shape))} at "
          f"{'x'.join(map(str, s.spacing))} mm (written in {write_s:.1f} s) -> {prep.spacing} mm, cached {shapes}")
    print(f"  model {s.model} {s.img_size}^3, dim {size.embed_dim} depth {size.depth}, decoder {size.decoder_dim}x"
          f"{size.decoder_depth}, batch {s.batch}, on {device_name}; load average at start {load:.2f}")
    print(f"  train step: median {step_s * 1e3:.0f} ms = {step_samples:.2f} samples/s")
    print(f"  memory cache: fill {fill_s:.1f} s, peak RSS growth {peak_mb:.0f} MB (retained {kept_mb:.0f} MB, "
          f"cached tensors {cache_mb:.0f} MB); disk cache {disk_mb:.0f} MB")
    print(f"  {'cache':7s} {'workers':>7s} {'fill s':>7s} {'1st batch s':>11s} {'epochs':>6s} {'samples/s':>10s}"
          f" {'ratio':>7s}")
    for r in rows:
        r["ratio"] = r["rate"] / step_samples
        fill = "" if r["fill_s"] is None else f"{r['fill_s']:.1f}"
        print(f"  {r['cache']:7s} {r['workers']:7d} {fill:>7s} {r['first_s']:11.3f} {r['epochs']:6d} {r['rate']:10.2f}"
              f" {r['ratio']:7.2f}")
    best = {k: max(r["ratio"] for r in rows if r["cache"] == k) for k in ("none", "memory", "disk")}
    keeps, starves = [k for k, v in best.items() if v >= 1], [k for k, v in best.items() if v < 1]
    print(f"  verdict (ratio > 1 keeps up; best over workers): {', '.join(f'{k} {v:.2f}' for k, v in best.items())}"
          f" -> keeps up: {', '.join(keeps) or '-'}; starves training: {', '.join(starves) or '-'}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"setup": asdict(s), "preset": args.preset, "load_average": load, "device": device_name,
                       "step_s": step_s, "step_samples_per_s": step_samples, "memory_fill_s": fill_s,
                       "memory_peak_rss_mb": peak_mb, "memory_retained_rss_mb": kept_mb, "memory_cache_mb": cache_mb,
                       "disk_cache_mb": disk_mb, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
