"""Memory one virtual site needs for the paper's recipes, and how many sites share a GPU.

For each recipe (``configs/paper/*.yaml``) and phase, on the CPU (no GPU needed):
- the static part, counted exactly: weights, gradients and AdamW's two moments, fp32
  (16 bytes a trainable parameter);
- the activations a training step keeps for its backward pass, counted exactly: every tensor
  autograd saves in the forward pass (``torch.autograd.graph.saved_tensors_hooks``, each storage
  once, the weights themselves not), at 1 and 2 crops: their difference is one crop's activations,
  the rest is the step's fixed part. Counted in fp32 and under bf16 autocast (what fedmae trains
  with on a GPU; on the CPU here), scaled to the recipe's crops per step
  (``batch_size`` x ``data.samples_per_volume``).

The sum is one site's training memory; a GPU adds its CUDA context and allocator slack (1 GiB is
set aside here) and transient buffers that no count of saved tensors sees. ``federated.sites_per_gpu``
N gives each virtual site 1/N of a GPU and Ray runs as many at once as the shares allow; "sites per
GPU" is (GPU memory - 1 GiB) / one site's memory (bf16), for 80 GiB (H100) and 141 GiB (H200). An
estimate: not measured on a GPU.

    python benchmarks/site_memory.py                           # the three paper recipes
    python benchmarks/site_memory.py --configs configs/paper/btcv.yaml --phases pretrain
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fedmae.config import config_from_dict  # noqa: E402
from fedmae.models.factory import build_finetune_model, build_mae  # noqa: E402

GIB = 2**30
GPUS = {"H100 80 GiB": 80, "H200 141 GiB": 141}
# Outputs of each recipe's fine-tuning head (the task needs no data to size the model).
OUTPUTS = {"paper-btcv": 14, "paper-brats": 3, "paper-chestxray14": 14}


def recipe(path: Path):
    raw = yaml.safe_load(path.read_text())
    # Only the model is built: the data section is replaced by the built-in source, which needs no files.
    crops = raw.get("data", {}).get("samples_per_volume", 1)
    raw["data"] = {"source": "synthetic", "num_sites": 1, "cases_per_site": 4, "samples_per_volume": crops}
    raw["device"] = "cpu"
    return config_from_dict(raw, source=str(path))


def saved_bytes(model: torch.nn.Module, crops: int, shape: tuple[int, ...], loss_of, bf16: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward pass at ``crops``."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    x = torch.randn(crops, *shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(model, x)
    del loss
    return sum(seen.values())


def measure(cfg, phase: str) -> dict:
    torch.manual_seed(0)
    if phase == "pretrain":
        model, crops = build_mae(cfg), cfg.pretrain_crops_per_step

        def loss_of(net, x):
            return net(x)[0]
    else:
        model, crops = build_finetune_model(cfg, OUTPUTS.get(cfg.name, 2)), cfg.finetune_crops_per_step

        def loss_of(net, x):
            return net(x).float().mean()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    static = 16 * trainable + 4 * (sum(p.numel() for p in model.parameters()) - trainable)
    shape = (cfg.model.in_channels, *cfg.model.img_size)
    row = {"recipe": cfg.name, "phase": phase, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "static_gib": static / GIB, "crops": crops}
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        one, two = (saved_bytes(model, n, shape, loss_of, bf16) for n in (1, 2))
        per_crop, fixed = two - one, max(2 * one - two, 0)
        row[precision] = {"per_crop_gib": per_crop / GIB, "fixed_gib": fixed / GIB,
                          "site_gib": (static + fixed + crops * per_crop) / GIB}
    site = row["bf16"]["site_gib"]
    row["sites_per_gpu"] = {gpu: int((memory - 1) // site) for gpu, memory in GPUS.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=Path,
                        default=sorted((REPO / "configs" / "paper").glob("*.yaml")))
    parser.add_argument("--phases", nargs="+", default=["pretrain", "finetune"], choices=["pretrain", "finetune"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [measure(recipe(path), phase) for path in args.configs for phase in args.phases]
    print("per virtual site: weights + gradients + AdamW (fp32), and the activations kept for backward "
          "per crop (fp32 / bf16 autocast), at the recipe's crops per step")
    print(f"{'recipe':20s} {'phase':9s} {'params':>8s} {'static':>7s} {'act/crop fp32':>14s} {'bf16':>7s} "
          f"{'crops':>6s} {'site fp32':>10s} {'bf16':>7s}  sites per GPU (bf16)")
    for r in rows:
        gpus = ", ".join(f"{gpu}: {n}" for gpu, n in r["sites_per_gpu"].items())
        print(f"{r['recipe']:20s} {r['phase']:9s} {r['params_m']:7.1f}M {r['static_gib']:6.2f}G "
              f"{r['fp32']['per_crop_gib']:13.3f}G {r['bf16']['per_crop_gib']:6.3f}G {r['crops']:6d} "
              f"{r['fp32']['site_gib']:9.1f}G {r['bf16']['site_gib']:6.1f}G  {gpus}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
