"""Time one MAE pre-training step of fedmae against MONAI's MaskedAutoEncoderViT.

Both models get the same configuration (dims, channels, input size, patch, width, depth, heads,
decoder, mask ratio), the same batch and the same loss (MSE on masked patches), under bf16
autocast on CUDA and fp32 on CPU. Three steppers alternate so that drift on a shared machine hits
all alike (the figures that matter are the ratios):

* ``fedmae``: fedmae's step as it trains: its model and its optimiser (``build_optimizer``: AdamW
  with its parameter groups, fused);
* ``fedmae-plain``: fedmae's model with the optimiser MONAI users would write,
  ``torch.optim.AdamW(model.parameters())`` (the model alone against MONAI's);
* ``monai``: MONAI's model with that optimiser.

On CUDA it also reports TFLOP/s (FLOPs counted by ``torch.utils.flop_counter``: matmuls,
convolutions, attention), the fraction of the GPU's bf16 matmul peak measured in the same run
(MFU) and of the data sheet's, peak memory, and whether the flash SDPA kernel runs.

    python benchmarks/bench_mae_step.py                  # CPU-sized default (ViT-S/16, 3D 64^3)
    python benchmarks/bench_mae_step.py --preset demo    # configs/demo.yaml's model and batch
    python benchmarks/bench_mae_step.py --preset btcv    # the BTCV recipe: ViT-B/16, 3D 96^3, decoder 384x8
    python benchmarks/bench_mae_step.py --preset cxr14   # the ChestX-ray14 recipe: ViT-B/16, 224^2, decoder 256x8
    python benchmarks/bench_mae_step.py --compile        # also fedmae's step under torch.compile

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

from fedmae.engine.device import allow_tf32  # noqa: E402
from fedmae.engine.optim import build_optimizer  # noqa: E402
from fedmae.models import MaskedAutoencoder, ViTEncoder  # noqa: E402
from fedmae.models.mae import patchify  # noqa: E402


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


BTCV = Setup(img_size=96, dim=768, depth=12, heads=12, decoder_dim=384, decoder_depth=8, decoder_heads=12, batch=24)
PRESETS = {
    "cpu": Setup(),
    "demo": Setup(spatial_dims=2, img_size=64, patch=8, dim=128, depth=6, heads=4, decoder_dim=64, decoder_depth=2,
                  decoder_heads=4, batch=16),
    "btcv": BTCV,  # 6 volumes x 4 crops per step
    "paper": BTCV,  # the earlier name of the BTCV preset
    "cxr14": Setup(spatial_dims=2, img_size=224, patch=16, dim=768, depth=12, heads=12, decoder_dim=256, decoder_depth=8,
                   decoder_heads=8, batch=256),
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

    def __init__(self, kind: str, s: Setup, device: torch.device, compile_model: bool = False):
        torch.manual_seed(0)
        self.kind, self.device = kind, device
        self.model = build("monai" if kind == "monai" else "fedmae", s).to(device).train()
        if kind.startswith("fedmae") and "plain" not in kind:
            self.optimizer = build_optimizer(self.model, 1e-4, 0.05, (0.9, 0.95))
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.net = torch.compile(self.model) if compile_model else self.model
        self.images = torch.randn(s.batch, s.in_channels, *(s.img_size,) * s.spatial_dims, device=device)
        self.patch = s.patch

    def step(self) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.kind.startswith("fedmae"):
                loss, _, _ = self.net(self.images)
            else:
                pred, mask = self.net(self.images)
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


def measured_bf16_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """What this GPU's bf16 matmuls reach here (the denominator of MFU): an n x n x n product."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def flash_attention_used(stepper: Stepper) -> bool:
    """Whether fedmae's step runs a flash-attention kernel (profiled once)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        stepper.step()
        sync(stepper.device)
    return any("flash" in event.key.lower() for event in prof.key_averages())


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
    parser.add_argument("--batch", type=int, help="override the preset's batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time fedmae's step under torch.compile")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory subprocesses")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    s, device = PRESETS[args.preset], torch.device(args.device)
    if args.batch:
        s = Setup(**{**asdict(s), "batch": args.batch})
    if device.type == "cuda":
        allow_tf32()

    kinds = ["fedmae", "fedmae-plain", "monai"]
    steppers = {kind: Stepper(kind, s, device) for kind in kinds}
    compile_s = None
    if args.compile:
        steppers["fedmae-compiled"] = Stepper("fedmae-compiled", s, device, compile_model=True)
        start = time.perf_counter()
        steppers["fedmae-compiled"].step()
        sync(device)
        compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        for stepper in steppers.values():
            stepper.step()
    times: dict[str, list[float]] = {kind: [] for kind in steppers}
    for _ in range(args.steps):  # interleaved: A, B, C, A, B, C, ...
        for kind, stepper in steppers.items():
            times[kind].append(stepper.timed_step())
    median = {kind: statistics.median(t) for kind, t in times.items()}

    result: dict = {"setup": asdict(s), "preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
                    "median_step_s": median, "images_per_s": {k: s.batch / v for k, v in median.items()},
                    "ratio_fedmae_over_monai": median["fedmae"] / median["monai"],
                    "ratio_fedmae_plain_over_monai": median["fedmae-plain"] / median["monai"]}
    if compile_s is not None:
        result["compile_first_step_s"] = compile_s
        result["ratio_compiled_over_eager"] = median["fedmae-compiled"] / median["fedmae"]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sheet = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        peak = measured_bf16_peak_tflops(device)
        result.update(gpu=name, measured_bf16_matmul_tflops=peak, datasheet_bf16_tflops=sheet, tflops={}, mfu={},
                      fraction_of_datasheet_peak={}, peak_mem_gb={}, flash_attention=flash_attention_used(steppers["fedmae"]))
        for kind, stepper in steppers.items():
            flops = stepper.flops()
            torch.cuda.reset_peak_memory_stats(device)
            stepper.step()
            result["peak_mem_gb"][kind] = torch.cuda.max_memory_allocated(device) / 2**30
            result["tflops"][kind] = flops / median[kind] / 1e12
            result["mfu"][kind] = result["tflops"][kind] / peak
            result["fraction_of_datasheet_peak"][kind] = result["tflops"][kind] / sheet if sheet else None
    elif not args.no_memory:
        result["peak_rss_growth_mb"] = {kind: cpu_peak_rss_growth_mb(kind, s, 2) for kind in kinds}

    where = f"{device} ({result['threads']} threads)" if device.type == "cpu" else str(device)
    print(f"MAE pre-training step, {s.spatial_dims}D {s.img_size}^{s.spatial_dims} x{s.in_channels}ch, patch {s.patch}, "
          f"dim {s.dim} depth {s.depth}, decoder {s.decoder_dim}x{s.decoder_depth}, batch {s.batch}, on {where}")
    if device.type == "cuda":
        print(f"  {result['gpu']}: measured bf16 matmul peak {peak:.0f} TFLOP/s (data sheet {sheet}); "
              f"flash attention in fedmae's step: {result['flash_attention']}")
    for kind in steppers:
        line = f"  {kind:15s} median step {median[kind] * 1e3:8.1f} ms, {result['images_per_s'][kind]:8.1f} images/s"
        if device.type == "cuda":
            line += (f", {result['tflops'][kind]:6.1f} TFLOP/s, MFU {result['mfu'][kind]:.1%}, "
                     f"peak {result['peak_mem_gb'][kind]:.2f} GB")
        elif "peak_rss_growth_mb" in result and kind in result["peak_rss_growth_mb"]:
            line += f", peak RSS growth {result['peak_rss_growth_mb'][kind]:.0f} MB"
        print(line)
    print(f"  ratio fedmae / MONAI step time: {result['ratio_fedmae_over_monai']:.2f} as each trains; "
          f"{result['ratio_fedmae_plain_over_monai']:.2f} with the same optimiser (below 1: fedmae is faster)")
    if compile_s is not None:
        print(f"  torch.compile: first step {compile_s:.1f} s, then {result['ratio_compiled_over_eager']:.2f}x the eager step time")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
