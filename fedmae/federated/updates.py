"""Weights on the wire: precision at send, and the checks an update must pass before averaging.

Sites and server exchange plain ``{name: tensor}`` dicts. With half-precision transport the
floating-point tensors are cast at send (fp16, or bf16 carried as its raw 16 bits because Flower's
ArrayRecord has no bfloat16) and back to fp32 on receipt, so averaging always runs in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# Secure-aggregation rounds use Flower's legacy fit messages, whose parameters are an unnamed list:
# the tensor names travel in the fit config under this key, tab-joined.
TENSOR_NAMES = "tensor-names"

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_wire(state: Mapping[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors for sending; bf16 travels as int16 bit patterns."""
    dtype = WIRE_DTYPES[precision]
    wire = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
            if dtype is torch.bfloat16:
                tensor = tensor.view(torch.int16)
        wire[name] = tensor.contiguous()
    return wire


def from_wire(wire: Mapping[str, torch.Tensor], precision: str, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Back to the reference's dtypes (fp32 weights); names not in ``reference`` pass through."""
    state = {}
    for name, tensor in wire.items():
        tensor = torch.as_tensor(tensor)
        target = reference.get(name)
        if target is not None and target.is_floating_point():
            if precision == "bf16" and tensor.dtype == torch.int16:
                tensor = tensor.view(torch.bfloat16)
            tensor = tensor.to(target.dtype)
        state[name] = tensor
    return state


def received_model(wire: Mapping[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """The server's weights as a site receives them, in fp32. A model that is not finite is
    refused here (the reply becomes an error the server logs); one of the wrong architecture is
    refused by the strict load."""
    # Floating-point weights (and bf16 travelling as int16 bits) become fp32; others pass through.
    reference = {k: torch.empty(0, dtype=torch.float32) if (v.is_floating_point() or v.dtype == torch.int16) else v
                 for k, v in wire.items()}
    state = from_wire(wire, precision, reference)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"refusing the server's model: non-finite values (NaN/Inf) in {bad}")
    return state


def update_problem(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``update`` must not be averaged into ``reference``'s model, or None when it may."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []) + (
            [f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")] if extra else []
        )
        return "wrong keys: " + "; ".join(parts)
    for name, ref in reference.items():
        value = torch.as_tensor(update[name])
        if tuple(value.shape) != tuple(ref.shape):
            return f"wrong shape for {name}: {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"non-finite values (NaN/Inf) in {name}"
    return None


def update_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``state - reference`` over all floating-point tensors (in float64)."""
    return math.sqrt(sum(float(torch.sum((state[k].double() - reference[k].double()) ** 2))
                         for k in state if state[k].is_floating_point()))


def clip_update(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], max_norm: float
                ) -> tuple[dict[str, torch.Tensor], float]:
    """``reference + (state - reference) * min(1, max_norm / ||state - reference||)``, the L2 norm
    taken over every floating-point tensor (what Flower's client-side DP clipping does), and the
    norm before clipping."""
    norm = update_norm(state, reference)
    deltas = {k: state[k].double() - reference[k].double() for k in state if state[k].is_floating_point()}
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: (reference[k].double() + deltas[k] * scale).to(v.dtype) if k in deltas else v for k, v in state.items()}
    return clipped, norm


def nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
