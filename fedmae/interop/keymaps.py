"""State-dict names: foreign encoders' -> fedmae's, and fedmae's -> timm's and MONAI's.

Every key of a foreign state dict is accounted for by a :class:`KeyLedger`: mapped to a name of
:class:`fedmae.models.vit.ViTEncoder`, dropped for a stated reason (a decoder, a head), or refused
in one line when fedmae's encoder has nothing like it (register tokens, a norm before the blocks).
The result is still at the foreign model's geometry (its grid, its channels):
:mod:`fedmae.interop.adapt` fits it to the configured model.

The layouts, as their own code names them:

- timm ``VisionTransformer``, and facebookresearch/mae's ``MaskedAutoencoderViT`` (whose encoder
  is timm's): ``cls_token``, ``pos_embed`` (1, [1 +] L, D), ``patch_embed.proj`` (a strided
  Conv2d), ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``. fedmae's
  encoder is built of the same timm blocks, so these are fedmae's names too.
- MONAI ``ViT`` / ``MaskedAutoEncoderViT``: ``patch_embedding.patch_embeddings`` (a strided
  convolution), ``patch_embedding.position_embeddings`` (1, L, D: no position for the cls token),
  ``blocks.N.{norm1, attn.qkv, attn.out_proj, norm2, mlp.linear1, mlp.linear2}``, ``norm`` (the
  MAE: ``blocks.<depth>``, the last entry of its ``nn.Sequential``), ``cls_token`` (a ViT has one
  only with ``classification=True``; UNETR's has none).
- SelfMedMAE (github.com/cvlab-stonybrook/SelfMedMAE: ``lib/models/mae3d.py``, ``lib/models/mae.py``,
  ``lib/networks/mae_vit.py``): a timm-named encoder under ``encoder.``, whose patch embedding is a
  convolution with kernel = stride = patch applied to one patch at a time (the weights of a strided
  convolution over the image, channels first), and the fixed position table beside it as
  ``encoder_pos_embed``: 3-D (1, L, D) without a cls row (its encoder adds none to the cls token),
  2-D (1, 1 + L, D) with a zero cls row. Its 2-D code flattens patches channels-first but unpacks
  them channels-last; with one channel (its chest X-rays) the two agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fedmae.interop.formats import InteropError

BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
HEAD = "a classification head (task-specific; fine-tuning adds its own)"
MAE_DECODER = "the MAE decoder and mask token (they stay with pre-training)"
MONAI_EPS = ("MONAI's LayerNorms use eps 1e-5 and fedmae's 1e-6: the features agree to about 1e-5, "
             "not bit for bit")


@dataclass
class SourceEncoder:
    """A foreign encoder under fedmae's names, at its own geometry, with its keys' fates."""

    weights: dict[str, torch.Tensor]
    mapped: dict[str, str]  # foreign key -> fedmae key (or what it was folded into)
    dropped: dict[str, str]  # foreign key -> why
    notes: list[str] = field(default_factory=list)
    pos_cls_row: bool | None = None  # whether pos_embed has a row for the cls token; None: tell by its length
    grid: tuple[int, ...] | None = None  # the token grid, where the file records it


Action = Callable[["KeyLedger", str, "re.Match[str]"], None]


class KeyLedger:
    """The keys of one foreign state dict and what became of each."""

    def __init__(self, state: Mapping[str, torch.Tensor], origin: str):
        self.state, self.origin = dict(state), origin
        self.weights: dict[str, torch.Tensor] = {}
        self.mapped: dict[str, str] = {}
        self.dropped: dict[str, str] = {}
        self.notes: list[str] = []
        self.layer_scales: dict[tuple[int, str], torch.Tensor] = {}

    def left(self) -> list[str]:
        return [k for k in self.state if k not in self.mapped and k not in self.dropped]

    def map(self, key: str, name: str) -> None:
        if name in self.weights:
            other = next(k for k, v in self.mapped.items() if v == name)
            raise InteropError(f"{self.origin}: {other} and {key} would both become {name}; name the file's format")
        self.weights[name] = self.state[key]
        self.mapped[key] = name

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def apply(self, rules: list[tuple[str, Action]]) -> None:
        """Each key not yet accounted for goes to the first rule whose pattern it matches whole."""
        for key in self.left():
            for pattern, action in rules:
                match = re.fullmatch(pattern, key)
                if match:
                    action(self, key, match)
                    break

    def result(self, **geometry) -> SourceEncoder:
        left = self.left()
        if left:
            raise InteropError(f"{self.origin}: {short_list(left)}: fedmae's encoder has nothing like "
                               f"{'these' if len(left) > 1 else 'this'} (a ViT with a cls token, one position table, "
                               "pre-norm blocks and a final norm)")
        return SourceEncoder(self.weights, self.mapped, self.dropped, self.notes, **geometry)


def rename(template: str) -> Action:
    return lambda ledger, key, match: ledger.map(key, match.expand(template))


def drop(reason: str) -> Action:
    def action(ledger: KeyLedger, key: str, match: re.Match[str]) -> None:
        ledger.dropped[key] = reason

    return action


def refuse(what: str) -> Action:
    def action(ledger: KeyLedger, key: str, match: re.Match[str]) -> None:
        raise InteropError(f"{ledger.origin}: {key} is {what}, which fedmae's encoder does not have; "
                           "this encoder cannot start a fedmae model")

    return action


# ---------------------------------------------------------------------------------------------
# timm, facebookresearch/mae, SelfMedMAE: timm's names


def _layer_scale(ledger: KeyLedger, key: str, match: re.Match[str]) -> None:
    block, which = int(match[1]), match[2]
    ledger.layer_scales[(block, which)] = ledger.state[key]
    ledger.mapped[key] = f"blocks.{block}.{'attn.proj' if which == '1' else 'mlp.fc2'} (folded in)"


def _fc_norm(prefix: str) -> Action:
    def action(ledger: KeyLedger, key: str, match: re.Match[str]) -> None:
        if f"{prefix}norm.{match[1]}" in ledger.state:
            ledger.dropped[key] = "the norm of a fine-tuned head's pooled features (fc_norm), beside the final norm"
            return
        ledger.map(key, f"norm.{match[1]}")
        ledger.note("fc_norm (the norm MAE-style fine-tuning applies to the pooled tokens) becomes the final norm, "
                    "which fedmae applies to every token before pooling")

    return action


def timm_rules(prefix: str = "") -> list[tuple[str, Action]]:
    p = re.escape(prefix)
    parts = "|".join(re.escape(part) for part in BLOCK_PARTS)
    return [
        (rf"{p}(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias))", rename(r"\1")),
        (rf"{p}(blocks\.\d+\.(?:{parts})\.(?:weight|bias))", rename(r"\1")),
        (rf"{p}blocks\.(\d+)\.ls([12])\.gamma", _layer_scale),
        (rf"{p}fc_norm\.(weight|bias)", _fc_norm(prefix)),
        (rf"{p}(?:head|head_dist)\.(?:weight|bias)", drop(HEAD)),
        (rf"{p}attn_pool\..+", drop("an attention-pooling head (task-specific)")),
        (rf"{p}reg_token", refuse("a register token")),
        (rf"{p}dist_token", refuse("a distillation token (DeiT)")),
        (rf"{p}norm_pre\..+", refuse("a norm before the blocks (timm's pre_norm, as in CLIP)")),
        (rf"{p}patch_embed\.norm\..+", refuse("a norm inside the patch embedding")),
        (rf"{p}blocks\.\d+\.attn\.[qk]_norm\..+", refuse("a query/key norm (timm's qk_norm)")),
    ]


def fold_layer_scales(ledger: KeyLedger) -> None:
    """LayerScale multiplies a branch's output by ``gamma``: the same as scaling the rows (and
    bias) of the branch's last linear layer, which is what fedmae's blocks then hold."""
    for (block, which), gamma in ledger.layer_scales.items():
        layer = f"blocks.{block}.{'attn.proj' if which == '1' else 'mlp.fc2'}"
        if f"{layer}.weight" not in ledger.weights:
            raise InteropError(f"{ledger.origin}: LayerScale of block {block} without its {layer}.weight")
        ledger.weights[f"{layer}.weight"] = ledger.weights[f"{layer}.weight"] * gamma[:, None]
        if f"{layer}.bias" in ledger.weights:
            ledger.weights[f"{layer}.bias"] = ledger.weights[f"{layer}.bias"] * gamma
    if ledger.layer_scales:
        ledger.note("LayerScale (ls1 / ls2 gamma) folded into attn.proj and mlp.fc2: the same function")


def from_timm(state: Mapping[str, torch.Tensor], origin: str) -> SourceEncoder:
    """A timm ``VisionTransformer`` (timm's MAE weights are one): its head, if any, is dropped."""
    ledger = KeyLedger(state, origin)
    ledger.apply(timm_rules())
    fold_layer_scales(ledger)
    return ledger.result()


MAE_DECODER_KEYS = r"decoder_(?:embed|norm|pred)\.(?:weight|bias)|decoder_pos_embed|decoder_blocks\..+|mask_token"


def from_mae(state: Mapping[str, torch.Tensor], origin: str) -> SourceEncoder:
    """facebookresearch/mae ``MaskedAutoencoderViT``: timm's encoder names, and a decoder to drop."""
    ledger = KeyLedger(state, origin)
    ledger.apply([*timm_rules(), (MAE_DECODER_KEYS, drop(MAE_DECODER))])
    fold_layer_scales(ledger)
    return ledger.result(pos_cls_row=True)


def from_selfmedmae(state: Mapping[str, torch.Tensor], origin: str) -> SourceEncoder:
    """SelfMedMAE's ``MAE3D`` / ``MAE``: the encoder under ``encoder.``, its table as ``encoder_pos_embed``."""
    ledger = KeyLedger(state, origin)
    decoder = r"decoder_pos_embed|decoder\..+|encoder_to_decoder\.(?:weight|bias)|mask_token"
    ledger.apply([("encoder_pos_embed", rename("pos_embed")), *timm_rules("encoder."), (decoder, drop(MAE_DECODER))])
    proj = ledger.weights.get("patch_embed.proj.weight")
    # MAE3D builds its table without a cls row (num_tokens=0); the 2-D MAE with one (num_tokens=1).
    return ledger.result(pos_cls_row=proj is not None and proj.ndim == 4)


def from_fedmae_safetensors(state: Mapping[str, torch.Tensor], origin: str,
                            grid: tuple[int, ...] | None) -> SourceEncoder:
    """``fedmae export --to safetensors``: fedmae's own names, and its grid in the file's metadata."""
    ledger = KeyLedger(state, origin)
    ledger.apply(timm_rules())
    return ledger.result(pos_cls_row=True, grid=grid)


# ---------------------------------------------------------------------------------------------
# MONAI


def _monai_depth(keys: set[str], prefix: str) -> int:
    blocks = {int(m[1]) for k in keys if (m := re.fullmatch(rf"{re.escape(prefix)}blocks\.(\d+)\.norm1\.weight", k))}
    return max(blocks) + 1 if blocks else 0


def from_monai(state: Mapping[str, torch.Tensor], origin: str) -> SourceEncoder:
    """MONAI's ``ViT`` (alone, or as a UNETR's ``vit.*``) and ``MaskedAutoEncoderViT``."""
    keys = set(state)
    prefix = "vit." if any(k.startswith("vit.patch_embedding.") for k in keys) else ""
    p = re.escape(prefix)
    depth = _monai_depth(keys, prefix)
    rules = [
        (rf"{p}patch_embedding\.patch_embeddings\.(weight|bias)", rename(r"patch_embed.proj.\1")),
        (rf"{p}patch_embedding\.patch_embeddings\.\d+\..+",
         refuse("a 'perceptron' patch embedding (a linear layer whose patch size the weights do not tell)")),
        (rf"{p}patch_embedding\.position_embeddings", rename("pos_embed")),
        (rf"{p}cls_token", rename("cls_token")),
        (rf"{p}blocks\.(\d+)\.(norm1|norm2|attn\.qkv)\.(weight|bias)", rename(r"blocks.\1.\2.\3")),
        (rf"{p}blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", rename(r"blocks.\1.attn.proj.\2")),
        (rf"{p}blocks\.(\d+)\.mlp\.linear([12])\.(weight|bias)", rename(r"blocks.\1.mlp.fc\2.\3")),
        (rf"{p}blocks\.\d+\.norm_cross_attn\.(?:weight|bias)",
         drop("MONAI's cross-attention norm, which a ViT never uses")),
        (rf"{p}blocks\.\d+\.cross_attn\..+",
         drop("cross-attention weights older MONAI versions saved in every block; a ViT never uses them")),
        (rf"{p}norm\.(weight|bias)", rename(r"norm.\1")),
        # MaskedAutoEncoderViT: the encoder's final norm closes its nn.Sequential of blocks.
        (rf"{p}blocks\.{depth}\.(weight|bias)", rename(r"norm.\1")),
        (rf"{p}classification_head\..+", drop(HEAD)),
        (r"decoder_(?:embed|pred)\.(?:weight|bias)|decoder_pos_embedding|decoder_blocks\..+|mask_tokens",
         drop(MAE_DECODER)),
    ]
    if prefix:
        rules.append((r"(?:encoder[1-4]|decoder[2-5]|out)\..+", drop("UNETR's convolutional decoder (fedmae's UNETR "
                                                                      "builds its own)")))
    ledger = KeyLedger(state, origin)
    ledger.apply(rules)
    ledger.note(MONAI_EPS)
    # MONAI adds no position to its cls token: the table gets a zero row for it, the same function.
    return ledger.result(pos_cls_row=False)


# ---------------------------------------------------------------------------------------------
# telling the layouts apart


def detect_format(keys: set[str]) -> str | None:
    """The layout a state dict's keys show, or None."""
    if "encoder_pos_embed" in keys and any(k.startswith("encoder.blocks.") for k in keys):
        return "selfmedmae"
    if {"patch_embedding.position_embeddings", "vit.patch_embedding.position_embeddings"} & keys:
        return "monai-mae" if {"mask_tokens", "decoder_pos_embedding"} & keys else "monai-vit"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        mae = {"mask_token", "decoder_pos_embed"} & keys or any(k.startswith("decoder_") for k in keys)
        return "mae" if mae else "timm"
    return None


MAPPERS: dict[str, Callable[[Mapping[str, torch.Tensor], str], SourceEncoder]] = {
    "timm": from_timm,
    "mae": from_mae,
    "monai-vit": from_monai,
    "monai-mae": from_monai,
    "selfmedmae": from_selfmedmae,
}


# ---------------------------------------------------------------------------------------------
# fedmae -> timm, MONAI


def to_timm(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fedmae's encoder is built of timm's blocks and names: a timm VisionTransformer's keys as they are."""
    return {k: v.detach().contiguous() for k, v in weights.items()}


_TO_MONAI_BLOCK = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj", "norm2": "norm2",
                   "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}


def to_monai(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MONAI ``ViT(classification=False, qkv_bias=True)``'s keys (UNETR's ``vit``). MONAI's ViT
    has no cls token there, so the cls token and its position are left out; each block gets
    MONAI's (unused) cross-attention norm at its initial values, which its state dict holds."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        value = value.detach()
        if key == "cls_token":
            continue
        if key == "pos_embed":
            out["patch_embedding.position_embeddings"] = value[:, 1:, :].contiguous()  # (1, L, D): no cls row
        elif key.startswith("patch_embed.proj."):
            out[f"patch_embedding.patch_embeddings.{key.rsplit('.', 1)[1]}"] = value.contiguous()
        elif key.startswith("norm."):
            out[key] = value.contiguous()
        else:
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
            if match is None or match[2] not in _TO_MONAI_BLOCK:
                raise InteropError(f"{key}: not a key of fedmae's encoder")
            out[f"blocks.{match[1]}.{_TO_MONAI_BLOCK[match[2]]}.{match[3]}"] = value.contiguous()
            if match[2] == "norm1" and match[3] == "weight":
                width = value.shape[0]
                out[f"blocks.{match[1]}.norm_cross_attn.weight"] = torch.ones(width, dtype=value.dtype)
                out[f"blocks.{match[1]}.norm_cross_attn.bias"] = torch.zeros(width, dtype=value.dtype)
    return out


def short_list(keys: list[str], limit: int = 8) -> str:
    """Keys for a log line, each covered by an entry: a layer's weight and bias as ``decoder_embed.*``,
    the same layer of every numbered block as ``blocks.N.norm_cross_attn.* (8 keys)``, a stack of
    blocks as ``decoder_blocks.* (12 keys)``, a key alone as itself; at most ``limit`` entries."""
    groups: dict[str, list[str]] = {}  # in order of first appearance
    for key in keys:
        numbered = re.match(r"(.+?)\.\d+\.(.+)$", key)
        groups.setdefault(f"{numbered[1]}.#" if numbered else re.sub(r"\.(weight|bias)$", "", key), []).append(key)
    items = []
    for group, members in groups.items():
        if len(members) == 1:
            items.append(members[0])
        elif not group.endswith(".#"):
            items.append(f"{group}.*")
        else:
            layers = {re.sub(r"\.(weight|bias)$", "", re.sub(r"^.+?\.\d+\.", "", k)) for k in members}
            stack = group.removesuffix(".#")
            items.append(f"{stack}.N.{layers.pop()}.* ({len(members)} keys)" if len(layers) == 1
                         else f"{stack}.* ({len(members)} keys)")
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
