"""State-dict key ownership: what is the encoder, what stays at a site, how weights transfer.

Every model in fedmae keeps its ViT under the attribute ``encoder``, so the encoder's keys are the
model's keys that start with ``encoder.``. Those are what a federation exchanges and what a
fine-tune model inherits; everything else (the MAE decoder and mask token, a head, a UNETR decoder)
belongs to the model it was trained in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

ENCODER_PREFIX = "encoder."


class WeightMismatchError(ValueError):
    """A state dict does not fit the model: names every missing, unexpected or mis-shaped key."""


def is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_PREFIX)


def encoder_state(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a full model state dict, with the ``encoder.`` prefix removed."""
    return {k[len(ENCODER_PREFIX) :]: v for k, v in model_state.items() if is_encoder_key(k)}


def encoder_entries(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's entries of a full model state dict with their names (``encoder.*``), on the
    CPU: the form in which federated pre-training sends an encoder and global checkpoints hold it."""
    return {k: v.detach().cpu() for k, v in model_state.items() if is_encoder_key(k)}


def site_local_state(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries that never leave a site in encoder-only federation (decoder, mask token, heads)."""
    return {k: v for k, v in model_state.items() if not is_encoder_key(k)}


def check_state_fits(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise WeightMismatchError unless ``state`` has exactly ``module``'s keys and shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shape {_short(wrong_shape)}")
    if problems:
        raise WeightMismatchError(f"{what} does not fit the model: " + "; ".join(problems))


def load_encoder(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load encoder weights (keys without prefix) into ``model.encoder``, strictly.

    The pre-training position table is copied too: it becomes the starting point of the learnable
    fine-tuning table.
    """
    check_state_fits(model.encoder, state, "encoder weights")
    model.encoder.load_state_dict(state, strict=True)


def load_encoder_entries(model: nn.Module, entries: Mapping[str, torch.Tensor]) -> None:
    """Load an encoder in :func:`encoder_entries` form into ``model.encoder``, strictly (an entry
    without the ``encoder.`` prefix is refused as an unexpected key)."""
    load_encoder(model, {k.removeprefix(ENCODER_PREFIX): v for k, v in entries.items()})


def load_part_state(model: nn.Module, state: Mapping[str, torch.Tensor], keys: set[str], what: str = "checkpoint") -> None:
    """Load the entries ``keys`` of a model's state dict from ``state`` (others in ``state`` are
    ignored), with a readable error when one is missing or mis-shaped."""
    expected = model.state_dict()
    missing = sorted(keys - set(state))
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                   for k in sorted(keys & set(state)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = ([f"missing {_short(missing)}"] if missing else []) + ([f"wrong shape {_short(wrong_shape)}"] if wrong_shape else [])
    if problems:
        raise WeightMismatchError(f"{what} does not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: state[k] for k in keys}, strict=False)


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load a whole model's state dict strictly, with a readable error on any mismatch."""
    check_state_fits(model, state, what)
    model.load_state_dict(state, strict=True)


def _short(items: list[str], limit: int = 6) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
