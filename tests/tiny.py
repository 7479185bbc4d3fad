"""Tiny configurations that run in well under a second per epoch on a CPU."""

from __future__ import annotations

import copy
from typing import Any


from fedmae.config import ExperimentConfig, config_from_dict

TINY_MODEL = {"embed_dim": 32, "depth": 4, "num_heads": 2, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def tiny_raw(dims: int = 2, task_type: str = "classification", **sections: dict[str, Any]) -> dict[str, Any]:
    """A raw config dict for a tiny model on tiny built-in data; ``sections`` update it."""
    raw: dict[str, Any] = {
        "name": f"tiny{dims}d",
        "seed": 0,
        "device": "cpu",
        "model": {"name": f"vit_tiny_patch8_{dims}d", "img_size": [32] * dims, **TINY_MODEL},
        "data": {"num_sites": 2, "cases_per_site": 8, "num_workers": 0},
        "task": {"type": task_type},
        "pretrain": {"epochs": 3, "warmup_epochs": 1, "batch_size": 4, "base_lr": 1e-2},
        "finetune": {"epochs": 3, "warmup_epochs": 1, "batch_size": 4, "base_lr": 1e-2},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values} if isinstance(values, dict) else values
    return copy.deepcopy(raw)


def tiny_config(dims: int = 2, task_type: str = "classification", **sections: dict[str, Any]) -> ExperimentConfig:
    return config_from_dict(tiny_raw(dims, task_type, **sections))
