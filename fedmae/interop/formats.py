"""The encoder formats fedmae reads, by name, and the ``FORMAT:FILE`` spelling that names one.

No torch here: the config's check of ``federated.start_from`` reads this module.
"""

from __future__ import annotations

from pathlib import Path

# What each name reads; fedmae tells them apart by their keys when the name is not given.
FORMATS: dict[str, str] = {
    "fedmae": "a fedmae checkpoint (fedmae pretrain's, a federated run's global model, a fine-tuned model)",
    "fedmae-safetensors": "an encoder written by fedmae export --to safetensors",
    "timm": "a timm VisionTransformer state dict, 2-D (timm's MAE weights too; a classification head is dropped)",
    "mae": "a facebookresearch/mae MaskedAutoencoderViT checkpoint, 2-D (the decoder is dropped)",
    "monai-vit": "a MONAI ViT state dict, or a MONAI UNETR's (its vit.* keys; the convolutional decoder is dropped)",
    "monai-mae": "a MONAI MaskedAutoEncoderViT state dict (the decoder is dropped)",
    "selfmedmae": "a SelfMedMAE MAE3D or MAE checkpoint (the decoder is dropped)",
}


class InteropError(ValueError):
    """A foreign encoder that cannot be used, or an export that cannot be made; one line that
    names the file and what to change."""


def split_encoder_spec(spec: str | Path) -> tuple[str | None, Path]:
    """``timm:weights.safetensors`` -> ``("timm", Path("weights.safetensors"))``; a plain path (or
    one that exists as written, colon and all) -> ``(None, path)``: a fedmae checkpoint, or a
    foreign format detected from its keys. ``fedmae`` is never named: its files say what they are."""
    text = str(spec)
    name, colon, rest = text.partition(":")
    if colon and name in FORMATS and name != "fedmae" and rest and not Path(text).expanduser().exists():
        return name, Path(rest).expanduser()
    return None, Path(text).expanduser()


def format_names() -> str:
    """The names FORMAT:FILE accepts."""
    return ", ".join(name for name in FORMATS if name != "fedmae")
