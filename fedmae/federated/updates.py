"""Weights on the wire: precision at send, and the checks an update must pass before averaging.

Sites and server exchange plain ``{name: tensor}`` dicts. With half-precision transport the
floating-point tensors are cast at send (fp16, or bf16 carried as its raw 16 bits because Flower's
ArrayRecord has no bfloat16) and back to fp32 on receipt, so averaging always runs in fp32.

With ``int8`` transport every floating-point tensor travels as int8 codes of its own shape plus
one fp32 scale per block of :data:`BLOCK` values (absmax quantisation, the scheme of NVFlare's
8-bit filters): 1.06 bytes a weight instead of 4. The server sends the global *weights* so; a
site sends its *update* (new weights minus the weights it received), whose values are far
smaller, so the same 8 bits resolve them far more finely, and it keeps what quantisation lost
(error feedback) to add to its next update: over the rounds nothing of the update is dropped.
The server adds the averaged updates to its own fp32 global model, so the downlink's rounding
never accumulates in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

# Secure-aggregation rounds use Flower's legacy fit messages, whose parameters are an unnamed list:
# the tensor names travel in the fit config under this key, tab-joined.
TENSOR_NAMES = "tensor-names"

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK = 256  # values per int8 scale: 4 bytes of scale per 256 of codes (+1.6 %)
# The wire entry holding every int8 tensor's block scales, concatenated in the order of the
# tensors' names: one array instead of one per tensor (each array costs a ~130-byte header).
SCALES = "::int8-scales"


def to_wire(state: Mapping[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors for sending; bf16 travels as int16 bit patterns, int8 as codes
    and block scales."""
    if precision == "int8":
        return _int8_wire(state)
    wire = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.to(WIRE_DTYPES[precision])
            if precision == "bf16":
                tensor = tensor.view(torch.int16)
        wire[name] = tensor.contiguous()
    return wire


def from_wire(wire: Mapping[str, torch.Tensor], precision: str, reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Back to the reference's dtypes (fp32 weights); names not in ``reference`` pass through."""
    if precision == "int8":
        values = _int8_values(wire, [n for n in wire if n != SCALES and n in reference and reference[n].is_floating_point()])
        return {n: values[n].to(reference[n].dtype) if n in values else torch.as_tensor(t) for n, t in wire.items() if n != SCALES}
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


def _int8_wire(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 codes of every floating-point tensor (others as they are), and their block scales
    under :data:`SCALES`."""
    wire, scales = {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            wire[name], scales[name] = quantise(tensor)
        else:
            wire[name] = tensor.contiguous()
    wire[SCALES] = torch.cat([scales[name] for name in sorted(scales)]) if scales else torch.zeros(0)
    return wire


def _int8_values(wire: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The fp32 values of the int8 tensors ``names`` of ``wire``."""
    if SCALES not in wire:
        raise ValueError("int8 transport: the weights arrived without their block scales")
    names = sorted(names)
    codes = [torch.as_tensor(wire[name]) for name in names]
    counts = [-(-c.numel() // BLOCK) for c in codes]
    scales = torch.as_tensor(wire[SCALES])
    if scales.dtype != torch.float32 or scales.shape != (sum(counts),):
        raise ValueError(f"int8 transport: {sum(counts)} fp32 block scales expected, got {scales.dtype} "
                         f"of shape {tuple(scales.shape)}")
    return {name: dequantise(c, s) for name, c, s in zip(names, codes, scales.split(counts))}


def quantise(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax int8: codes of ``tensor``'s shape, and one fp32 scale per :data:`BLOCK`
    values (in flattened order), code * scale / 127 being the value."""
    flat = tensor.detach().float().reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1)
    codes = torch.round(blocks * (127.0 / scales.clamp_min(torch.finfo(torch.float32).tiny))[:, None])
    codes = codes.clamp_(-127, 127).to(torch.int8).reshape(-1)[: flat.numel()]
    return codes.view(tensor.shape).contiguous(), scales.contiguous()


def dequantise(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 values int8 ``codes`` with their block ``scales`` stand for."""
    blocks = -(-codes.numel() // BLOCK)
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or scales.shape != (blocks,):
        raise ValueError(f"int8 codes need {blocks} fp32 block scales, got {codes.dtype} codes and "
                         f"{scales.dtype} scales of shape {tuple(scales.shape)}")
    flat = torch.nn.functional.pad(codes.reshape(-1).float(), (0, -codes.numel() % BLOCK)).view(-1, BLOCK)
    return (flat * (scales / 127.0)[:, None]).reshape(-1)[: codes.numel()].view(codes.shape)


def update_to_wire(state: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], precision: str,
                   carried: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """What a site sends after training from ``received``, and what it carries to its next round.

    In fp32 / fp16 / bf16 that is its weights as they are. In int8 it is its update quantised,
    the update being ``state - received`` plus what quantisation lost last round (``carried``);
    the new loss is carried on (error feedback)."""
    if precision != "int8":
        return to_wire(state, precision), None
    carried = carried or {}
    updates = {name: tensor.detach().cpu().float() - received[name].float() + carried.get(name, 0.0)
               for name, tensor in state.items() if tensor.is_floating_point()}
    wire = _int8_wire({**state, **updates})
    sent = _int8_values(wire, list(updates))
    return wire, {name: updates[name] - sent[name] for name in updates}


def update_from_wire(wire: Mapping[str, torch.Tensor], precision: str, reference: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """A site's reply as weights in fp32: in int8 the global model plus the site's quantised update."""
    if precision != "int8":
        return from_wire(wire, precision, reference)
    update = from_wire(wire, precision, reference)
    return {name: reference[name] + value if name in reference and reference[name].is_floating_point() and
            value.shape == reference[name].shape else value for name, value in update.items()}


def received_model(wire: Mapping[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """The server's weights as a site receives them, in fp32. A model that is not finite is
    refused here (the reply becomes an error the server logs); one of the wrong architecture is
    refused by the strict load."""
    # Floating-point weights (bf16 travelling as int16 bits, int8 as codes) become fp32; others pass through.
    float_on_wire = {"bf16": torch.int16, "int8": torch.int8}.get(precision)
    reference = {k: torch.empty(0, dtype=torch.float32) if (v.is_floating_point() or v.dtype == float_on_wire) else v
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
