"""Time one MAE pre-training step of fedmae against MONAI's MaskedAutoEncoderViT.

Both models get the same configuration (dims, channels, input size, patch, width, depth, heads,
decoder, mask ratio), the same batch, the same loss (MSE on masked patches) and the same AdamW
step, under bf16 autocast on CUDA and fp32 on CPU. Steps alternate between the two models so that
drift on a shared machine hits both alike; the figure that matters is the ratio.

    python benchmarks/bench_mae_step.py                 # CPU-sized default (ViT-S/16, 3D 64^3)
    python benchmarks/bench_mae_step.py --preset paper  # the BTCV recipe: ViT-B/16, 3D 96^3 (GPU)

Peak memory: on CUDA, ``max_memory_allocated`` per model in this process; on CPU, the peak
resident-set growth of a fresh subprocess per model (in-process CPU figures would be skewed by
the allocator reusing the other model's freed memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.networks.nets import MaskedAutoEncoderViT
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout
from benchmarks.memory import with_peak_rss  # noqa: E402

from fedmae.models import MaskedAutoencoder, ViTEncoder
from fedmae.models.mae import patchify


@dataclass
class Setup:
    spatial_dims: int = 3
    in_channels: int = 1
    img_size: int = 64
    patch: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    decoder_dim: int = 192  # MONAI's 3D sin-cos table needs widths divisible by 6
    decoder_depth: int = 4
    decoder_heads: int = 6
    mask_ratio: float = 0.75
    batch: int = 4


PRESETS = {
    "cpu": Setup(),
    "paper": Setup(img_size=96, dim=768, depth=12, heads=12, decoder_dim=384, decoder_depth=8, decoder_heads=12, batch=4),
}

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the fraction of peak.
BF16_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def build(kind: str, s: Setup) -> torch.nn.Module:
    size = (s.img_size,) * s.spatial_dims
    if kind == "fedmae":
        encoder = ViTEncoder(s.spatial_dims, s.in_channels, size, s.patch, s.dim, s.depth, s.heads)
        return MaskedAutoencoder(encoder, s.decoder_dim, s.decoder_depth, s.decoder_heads, mask_ratio=s.mask_ratio,
                                 norm_pix_loss=False)
    return MaskedAutoEncoderViT(
        in_channels=s.in_channels, img_size=size, patch_size=s.patch, hidden_size=s.dim, mlp_dim=4 * s.dim,
        num_layers=s.depth, num_heads=s.heads, masking_ratio=s.mask_ratio, decoder_hidden_size=s.decoder_dim,
        decoder_mlp_dim=4 * s.decoder_dim, decoder_num_layers=s.decoder_depth, decoder_num_heads=s.decoder_heads,
        spatial_dims=s.spatial_dims, qkv_bias=True,
    )


class Stepper:
    """One model, its optimiser and a closure that runs forward + masked MSE + backward + step."""

    def __init__(self, kind: str, s: Setup, device: torch.device):
        torch.manual_seed(0)
        self.kind, self.device = kind, device
        self.model = build(kind, s).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.images = torch.randn(s.batch, s.in_channels, *(s.img_size,) * s.spatial_dims, device=device)
        self.patch = s.patch

    def step(self) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.kind == "fedmae":
                loss, _, _ = self.model(self.images)
            else:
                pred, mask = self.model(self.images)
                # MONAI has no patchify; fedmae's gives the same target shape for its loss.
                per_patch = ((pred.float() - patchify(self.images, self.patch)) ** 2).mean(-1)
                loss = (per_patch * mask).sum() / mask.sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def timed_step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - start

    def flops(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_rss_growth_mb(kind: str, s: Setup, steps: int) -> float:
    """Peak resident memory growth of building and stepping one model, in a fresh process."""
    code = (
        "import json; import benchmarks.bench_mae_step as b;"
        f"print(json.dumps(b._measure_rss({kind!r}, b.Setup(**{asdict(s)!r}), {steps})))"
    )
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_rss(kind: str, s: Setup, steps: int) -> float:
    def run() -> None:
        stepper = Stepper(kind, s, torch.device("cpu"))
        for _ in range(steps):
            stepper.step()

    return with_peak_rss(run)[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    s, device = PRESETS[args.preset], torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    steppers = {kind: Stepper(kind, s, device) for kind in ("fedmae", "monai")}
    for _ in range(args.warmup):
        for stepper in steppers.values():
            stepper.step()
    times: dict[str, list[float]] = {kind: [] for kind in steppers}
    for _ in range(args.steps):  # interleaved: A, B, A, B, ...
        for kind, stepper in steppers.items():
            times[kind].append(stepper.timed_step())
    median = {kind: statistics.median(t) for kind, t in times.items()}

    result: dict = {"setup": asdict(s), "preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
                    "median_step_s": median, "ratio_fedmae_over_monai": median["fedmae"] / median["monai"]}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        result["gpu"], result["tflops"], result["peak_mem_gb"], result["fraction_of_bf16_peak"] = name, {}, {}, {}
        for kind, stepper in steppers.items():
            flops = stepper.flops()
            torch.cuda.reset_peak_memory_stats(device)
            stepper.step()
            result["peak_mem_gb"][kind] = torch.cuda.max_memory_allocated(device) / 2**30
            result["tflops"][kind] = flops / median[kind] / 1e12
            result["fraction_of_bf16_peak"][kind] = result["tflops"][kind] / peak if peak else None
    else:
        result["peak_rss_growth_mb"] = {kind: cpu_peak_rss_growth_mb(kind, s, 2) for kind in steppers}

    print(f"MAE pre-training step, {s.spatial_dims}D {s.img_size}^{s.spatial_dims} x{s.in_channels}ch, patch {s.patch}, "
          f"dim {s.dim} depth {s.depth}, decoder {s.decoder_dim}x{s.decoder_depth}, batch {s.batch}, on {device}")
    for kind in steppers:
        line = f"  {kind:7s} median step {median[kind] * 1e3:8.1f} ms"
        if device.type == "cuda":
            frac = result["fraction_of_bf16_peak"][kind]
            line += (f", {result['tflops'][kind]:6.1f} TFLOP/s"
                     f" ({'n/a' if frac is None else f'{frac:.1%}'} of bf16 peak), peak {result['peak_mem_gb'][kind]:.2f} GB")
        else:
            line += f", peak RSS growth {result['peak_rss_growth_mb'][kind]:.0f} MB"
        print(line)
    print(f"  ratio fedmae / MONAI step time: {result['ratio_fedmae_over_monai']:.2f} (below 1: fedmae is faster)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
