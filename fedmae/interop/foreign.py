"""Reading an encoder to start from: a fedmae checkpoint, or a foreign one (timm,
facebookresearch/mae, MONAI, SelfMedMAE, fedmae safetensors), its format named
(``timm:FILE``) or detected from its keys.

Files are read with ``torch.load(weights_only=True)`` or safetensors only: nothing in them is
unpickled as an object. A foreign encoder is mapped to fedmae's names with every key accounted
for (:mod:`fedmae.interop.keymaps`) and fitted to the configured model
(:mod:`fedmae.interop.adapt`); what was dropped and changed is logged. A fedmae checkpoint is
read by :func:`fedmae.checkpoint.load_encoder_checkpoint`, as before, and must fit the model
as it is (it carries the config it was trained with).
"""

from __future__ import annotations

import json
import logging
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedmae.checkpoint import FORMAT, _unreadable_reason, load_encoder_checkpoint
from fedmae.interop.adapt import fit_encoder
from fedmae.interop.formats import FORMATS, InteropError, format_names, split_encoder_spec
from fedmae.interop.keymaps import MAPPERS, SourceEncoder, detect_format, from_fedmae_safetensors, short_list
from fedmae.models.state import ENCODER_PREFIX, encoder_state
from fedmae.models.vit import ViTEncoder

if TYPE_CHECKING:
    from fedmae.config import ExperimentConfig

log = logging.getLogger(__name__)

FEDMAE_SAFETENSORS = "fedmae-encoder"  # the safetensors metadata's "fedmae_format" of fedmae export --to safetensors
# Where training scripts keep the weights inside a checkpoint (mae: "model"; SelfMedMAE: "state_dict").
STATE_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")


@dataclass
class ImportedEncoder:
    """An encoder's weights under :class:`fedmae.models.vit.ViTEncoder`'s names, and what became
    of every key of the file. A foreign encoder's weights fit the model they were read for; a
    fedmae checkpoint's are as it holds them (``config``: the experiment it was trained with)."""

    weights: dict[str, torch.Tensor]
    format: str
    path: Path
    kind: str | None = None  # a fedmae checkpoint's kind (mae, global, finetune); None for a foreign file
    config: dict[str, Any] | None = None
    mapped: dict[str, str] = field(default_factory=dict)  # file key -> fedmae key
    dropped: dict[str, str] = field(default_factory=dict)  # file key -> why
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def entries(self) -> dict[str, torch.Tensor]:
        """The weights as ``encoder.*`` entries: the form a federated run sends and a global checkpoint holds."""
        return {ENCODER_PREFIX + k: v for k, v in self.weights.items()}


def import_encoder(spec: str | Path, target: ViTEncoder, announce: bool = True) -> ImportedEncoder:
    """The encoder of ``spec``: a fedmae checkpoint, or a foreign file (``FILE`` or
    ``FORMAT:FILE``, FORMAT one of :data:`fedmae.interop.formats.FORMATS`) fitted to ``target``.
    Raises a ValueError with one line (:class:`InteropError`,
    :class:`fedmae.checkpoint.CheckpointError`, :class:`fedmae.models.state.WeightMismatchError`).
    ``announce``: log what was read, dropped and changed."""
    named, path = split_encoder_spec(spec)
    if named is None and is_fedmae_checkpoint(path):
        payload = load_encoder_checkpoint(path, announce=announce)
        weights = encoder_state(payload["model"])
        mapped = {ENCODER_PREFIX + k: k for k in weights}
        dropped = {k: "not the encoder" for k in payload["model"] if k not in mapped}
        return ImportedEncoder(weights, "fedmae", path, payload["kind"], payload.get("config"), mapped, dropped)
    if not path.is_file():
        raise InteropError(f"{path}: encoder file not found")
    state, metadata, container = _read(path, named)
    state, notes = _unwrapped(state)
    fedmae_file = metadata.get("fedmae_format") == FEDMAE_SAFETENSORS
    fmt = named or ("fedmae-safetensors" if fedmae_file else detect_format(set(state)))
    if fmt is None:
        raise InteropError(f"{path}: cannot tell which encoder its keys ({short_list(sorted(state), 4)}) belong to; "
                           f"name the format as FORMAT:{path} with FORMAT one of {format_names()}")
    heads = target.blocks[0].attn.num_heads
    if fmt == "fedmae-safetensors" and metadata.get("num_heads") and int(metadata["num_heads"]) != heads:
        raise InteropError(f"{path}: its encoder has {metadata['num_heads']} attention heads, the model {heads}: set "
                           f"model.num_heads: {metadata['num_heads']}")
    source = _map(fmt, state, str(path), metadata)
    weights, fit_notes, fit_warnings = fit_encoder(source, target, str(path))
    if fmt != "fedmae-safetensors":
        fit_notes.append(f"the number of attention heads is not in the weights: the config's ({heads}) is used, and "
                         "must be the one the encoder was trained with")
    if container:
        fit_notes.append(f"its {', '.join(container)} (not the weights) not used")
    imported = ImportedEncoder(weights, fmt, path, None, None, source.mapped, source.dropped, notes + fit_notes,
                               fit_warnings)
    if announce:
        _announce(imported, named is not None)
    return imported


def import_encoder_for(spec: str | Path, cfg: ExperimentConfig, announce: bool = True) -> ImportedEncoder:
    """:func:`import_encoder` for the encoder ``cfg`` builds."""
    from fedmae.models.factory import build_encoder

    return import_encoder(spec, build_encoder(cfg), announce)


def is_fedmae_checkpoint(spec: str | Path) -> bool:
    """Whether ``spec`` is read as a fedmae checkpoint: not named as a foreign format, and not a
    file that holds something else. Told from the header in the archive's pickle, without
    loading a tensor; a missing file counts as fedmae's (its message says it is missing)."""
    named, path = split_encoder_spec(spec)
    if named is not None:
        return False
    if not path.is_file():
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return pickled is not None and FORMAT.encode() in archive.read(pickled)
    except (zipfile.BadZipFile, OSError, EOFError):  # not a zip archive: a legacy torch file, safetensors, junk
        return False


def _map(fmt: str, state: dict[str, torch.Tensor], origin: str, metadata: Mapping[str, str]) -> SourceEncoder:
    grid = tuple(int(n) for n in metadata["grid"].split(",")) if metadata.get("grid") else None
    if fmt == "fedmae-safetensors":
        return from_fedmae_safetensors(state, origin, grid)
    source = MAPPERS[fmt](state, origin)
    source.grid = source.grid or grid  # fedmae's timm / MONAI exports record their grid too
    return source


# ---------------------------------------------------------------------------------------------
# reading files


def _read(path: Path, named: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(state dict, safetensors metadata, the other entries of a training checkpoint)."""
    if _is_safetensors(path):
        return *_read_safetensors(path), []
    payload = _load_torch(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:  # named as a foreign format
        raise InteropError(f"{path}: a fedmae checkpoint, not {named}; leave out the '{named}:' before it")
    if _is_state(payload):
        return dict(payload), {}, []
    if isinstance(payload, dict):
        for key in STATE_KEYS:
            if _is_state(payload.get(key)):
                return dict(payload[key]), {}, sorted(str(k) for k in payload if k != key)
    raise InteropError(f"{path}: holds no state dict of tensors (looked at the top level and under "
                       f"{', '.join(repr(k) for k in STATE_KEYS)})")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the header's '{'."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except Exception as err:  # a damaged header or data: safetensors says which
        raise InteropError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None


def _load_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = _unreadable_reason(path, err)
        if "pickled Python object" in reason:
            reason += ("; a foreign encoder must be a file of its weights alone: a state dict of tensors, or "
                       ".safetensors")
        # Neither fedmae's nor a foreign encoder we can read: fedmae's wording, as for any unreadable checkpoint.
        raise InteropError(f"{path}: not a readable fedmae checkpoint ({reason})") from None


def _is_state(value: Any) -> bool:
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _unwrapped(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Without the ``module.`` that DistributedDataParallel puts before every key."""
    if all(k.startswith("module.") for k in state):
        return {k.removeprefix("module."): v for k, v in state.items()}, ["'module.' (DistributedDataParallel) "
                                                                         "removed from every key"]
    return state, []


def _announce(imported: ImportedEncoder, named: bool) -> None:
    path, fmt = imported.path, imported.format
    log.info("using the encoder of %s (%s, %s: %s): %d keys mapped, %d dropped", path, fmt,
             "as named" if named else "detected", FORMATS[fmt], len(imported.mapped), len(imported.dropped))
    reasons: dict[str, list[str]] = {}
    for key, reason in imported.dropped.items():
        reasons.setdefault(reason, []).append(key)
    for reason, keys in reasons.items():
        log.info("%s: dropped %s: %s", path, short_list(keys), reason)
    for note in imported.notes:
        log.info("%s: %s", path, note)
    for warning in imported.warnings:
        log.warning("%s: %s", path, warning)
    log.debug("%s: keys mapped: %s", path, json.dumps(imported.mapped))
