"""``fedmae export``: a checkpoint's encoder as timm or MONAI weights, or as fedmae safetensors,
with a JSON model card beside it (:mod:`fedmae.interop.model_card`).

- ``timm`` (2-D only): a ``VisionTransformer`` state dict that
  ``timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg", fc_norm=False,
  <the sizes>)`` loads strictly; its ``forward_features`` are fedmae's tokens and its output
  fedmae's pooled features (the mean of the normalised patch tokens). ``fc_norm=False`` keeps
  the final norm on every token before pooling, as fedmae has it; timm's default for
  ``global_pool="avg"`` would move it after the pooling.
- ``monai``: a MONAI ``ViT(classification=False, qkv_bias=True, <the sizes>)`` state dict, which
  a ``UNETR``'s ``vit`` loads too (UNETR is fixed at 12 blocks and patch 16). That ViT has no cls
  token, so fedmae's is left out: MONAI's patch tokens are fedmae's encoder run without it.
- ``safetensors``: fedmae's own names, which ``fedmae finetune --encoder`` and
  ``federated.start_from`` read back (resampled to another grid if need be).

Weights go to ``.safetensors`` (no pickle), or to ``.pt`` / ``.pth`` as a plain state dict of
tensors (``torch.load(weights_only=True)`` reads it); the card to the same name with ``.json``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmae.checkpoint import load_encoder_checkpoint, sha256_of
from fedmae.config import ExperimentConfig
from fedmae.files import atomic_write, atomic_write_json
from fedmae.interop.formats import InteropError
from fedmae.interop.keymaps import to_monai, to_timm
from fedmae.models.factory import build_encoder
from fedmae.models.state import check_state_fits, encoder_state

log = logging.getLogger(__name__)

TARGETS = {
    "timm": "a timm VisionTransformer state dict",
    "monai": "a MONAI ViT state dict (classification=False; UNETR's vit)",
    "safetensors": "fedmae's encoder (fedmae finetune --encoder and federated.start_from read it)",
}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass
class Exported:
    weights: Path
    card: Path
    load_with: str  # a line of Python that loads the weights


def export_encoder(checkpoint: str | Path, to: str, output: str | Path, force: bool = False) -> Exported:
    """Write the encoder of a fedmae checkpoint (pre-training or fine-tuned) for ``to`` (one of
    :data:`TARGETS`) to ``output``, and its model card beside it; refused in one line when a
    file is in the way (unless ``force``) or the target cannot take this encoder."""
    checkpoint, output = Path(checkpoint), Path(output)
    if to not in TARGETS:
        raise InteropError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    suffix = output.suffix.lower()
    if suffix != ".safetensors" and (to == "safetensors" or suffix not in TORCH_SUFFIXES):
        allowed = ".safetensors" if to == "safetensors" else f".safetensors or {' / '.join(TORCH_SUFFIXES)}"
        raise InteropError(f"--output {output}: name the file {allowed}")
    card_path = output.with_suffix(".json")
    for path in (output, card_path):
        if path.exists() and not force:
            raise InteropError(f"--output {output}: {path} exists; pass --force to replace it")
    payload = load_encoder_checkpoint(checkpoint, announce=False)
    cfg = checkpoint_config(payload, checkpoint)
    weights = encoder_state(payload["model"])
    check_state_fits(build_encoder(cfg), weights, f"the encoder of {checkpoint}")
    if to == "timm" and cfg.spatial_dims != 2:
        raise InteropError(f"{checkpoint}: a {cfg.spatial_dims}-D encoder; timm's VisionTransformer is 2-D: export it "
                           "--to monai or --to safetensors")
    state = {"timm": to_timm, "monai": to_monai, "safetensors": to_timm}[to](weights)
    load_with = loading_line(cfg, to, output)

    from fedmae.interop.model_card import model_card

    entry = {"file": output.name, "layout": TARGETS[to], "load_with": load_with, "tensors": len(state),
             "parameters": sum(v.numel() for v in state.values())}
    if to == "monai":
        entry["left_out"] = "the cls token and its position (MONAI's ViT without classification has none)"
    card = model_card(payload, checkpoint, cfg, entry)
    output.parent.mkdir(parents=True, exist_ok=True)
    _write_weights(output, state, cfg, to, card)
    card["weights"]["sha256"] = sha256_of(output)
    atomic_write_json(card_path, card)
    log.info("exported the encoder of %s as %s: %s (%d tensors), model card %s", checkpoint, TARGETS[to], output,
             len(state), card_path)
    return Exported(output, card_path, load_with)


def checkpoint_config(payload: dict[str, Any], checkpoint: Path) -> ExperimentConfig:
    """The experiment a checkpoint was trained with, type-checked; not re-validated, since its
    files (data, a start_from checkpoint) need not exist where the checkpoint is exported."""
    from fedmae.typed_yaml import build

    return build(ExperimentConfig, payload["config"], f"{checkpoint} (its stored config)")[0]


def _write_weights(output: Path, state: dict[str, torch.Tensor], cfg: ExperimentConfig, to: str,
                   card: dict[str, Any]) -> None:
    if output.suffix.lower() != ".safetensors":
        atomic_write(output, lambda handle: torch.save(state, handle))
        return
    from safetensors.torch import save

    metadata = {"format": "pt", "exported_by": f"fedmae {card['fedmae_version']}", "layout": to,
                "grid": ",".join(str(s // cfg.patch_size) for s in cfg.model.img_size),
                "num_heads": str(cfg.size.num_heads), "model_card": json.dumps(card)}
    if to == "safetensors":
        from fedmae.interop.foreign import FEDMAE_SAFETENSORS

        metadata["fedmae_format"] = FEDMAE_SAFETENSORS
    data = save(state, metadata=metadata)
    atomic_write(output, lambda handle: handle.write(data))


def timm_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """``timm.create_model`` arguments for a VisionTransformer with this encoder's shapes."""
    size = re.match(r"vit_(\w+?)_patch", cfg.model.name)
    return {"model_name": f"vit_{size[1] if size else 'base'}_patch16_224", "pretrained": False, "num_classes": 0,
            "global_pool": "avg", "fc_norm": False, "img_size": tuple(cfg.model.img_size), "patch_size": cfg.patch_size,
            "in_chans": cfg.model.in_channels, "embed_dim": cfg.size.embed_dim, "depth": cfg.size.depth,
            "num_heads": cfg.size.num_heads, "mlp_ratio": cfg.model.mlp_ratio}


def monai_kwargs(cfg: ExperimentConfig) -> dict[str, Any]:
    """``monai.networks.nets.ViT`` arguments for a ViT with this encoder's shapes."""
    size = cfg.size
    return {"in_channels": cfg.model.in_channels, "img_size": tuple(cfg.model.img_size), "patch_size": cfg.patch_size,
            "hidden_size": size.embed_dim, "mlp_dim": int(size.embed_dim * cfg.model.mlp_ratio),
            "num_layers": size.depth, "num_heads": size.num_heads, "proj_type": "conv", "pos_embed_type": "learnable",
            "classification": False, "spatial_dims": cfg.spatial_dims, "qkv_bias": True}


def loading_line(cfg: ExperimentConfig, to: str, output: Path) -> str:
    read = (f"safetensors.torch.load_file({str(output.name)!r})" if output.suffix.lower() == ".safetensors"
            else f"torch.load({str(output.name)!r}, weights_only=True)")
    if to == "timm":
        kwargs = timm_kwargs(cfg)
        name = kwargs.pop("model_name")
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return f"timm.create_model({name!r}, {args}).load_state_dict({read})"
    if to == "monai":
        args = ", ".join(f"{k}={v!r}" for k, v in monai_kwargs(cfg).items())
        line = f"monai.networks.nets.ViT({args}).load_state_dict({read})"
        if cfg.size.depth == 12 and cfg.patch_size == 16:
            line += "; or UNETR(..., the same sizes, qkv_bias=True).vit.load_state_dict(the same)"
        return line
    return f"fedmae finetune --encoder {output.name} (or federated.start_from: {output.name})"
