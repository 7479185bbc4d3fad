"""Small models with the state-dict names of encoders whose code is not an installed package:
facebookresearch/mae's ``MaskedAutoencoderViT`` (``models_mae.py``) and SelfMedMAE's ``MAE3D`` /
``MAE`` (``lib/models/mae3d.py``, ``lib/models/mae.py``, ``lib/networks/mae_vit.py``,
``lib/networks/patch_embed_layers.py``), each with its encoder's forward pass as that code runs it,
without masking. Built of timm's ``Block`` and ``PatchEmbed``, as the originals are.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def randomize(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Every parameter drawn at random, so that a mapping error cannot hide behind an initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module


class MaeViT(nn.Module):
    """facebookresearch/mae ``MaskedAutoencoderViT``: its attribute names, 2-D."""

    def __init__(self, img_size: int = 32, patch_size: int = 8, in_chans: int = 3, embed_dim: int = 32, depth: int = 4,
                 num_heads: int = 2, decoder_embed_dim: int = 16, decoder_depth: int = 1, decoder_num_heads: int = 2,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                    for _ in range(depth))
        self.norm = LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                  norm_layer=LayerNorm) for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """``forward_encoder`` with nothing masked, tokens in grid order: (B, 1 + L, D)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _SelfMedMaePatchEmbed(nn.Module):
    """``PatchEmbed3D`` / ``PatchEmbed2D`` with ``img_size=patch_size``: a convolution over one
    patch at a time, its values given channels-last (``in_chan_last=True``)."""

    def __init__(self, dims: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.dims, self.patch_size, self.in_chans = dims, patch_size, in_chans
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.proj = conv(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape  # (B, L, p^d * C), each patch (p, .., p, C)
        x = x.reshape(batch * length, *[self.patch_size] * self.dims, self.in_chans)
        x = x.permute(0, self.dims + 1, *range(1, self.dims + 1))  # (B*L, C, p, .., p)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B*L, 1, D)


class _SelfMedMaeEncoder(nn.Module):
    """``MAEViTEncoder`` (num_classes=0: no head)."""

    def __init__(self, dims: int, patch_size: int, in_chans: int, embed_dim: int, depth: int, num_heads: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = _SelfMedMaePatchEmbed(dims, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=LayerNorm)
                                    for _ in range(depth))
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Identity()

    def forward_features(self, x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        x = self.patch_embed(x).reshape(batch, length, self.embed_dim)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1)
        if x.shape[1] != pos_embed.shape[1]:  # MAE3D's table has no cls row: the cls token gets zeros
            pos_embed = torch.cat([torch.zeros(batch, 1, self.embed_dim), pos_embed.expand(batch, -1, -1)], dim=1)
        x = x + pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _SelfMedMaeDecoder(nn.Module):
    """``MAEViTDecoder``."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, num_classes: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=LayerNorm)
                                    for _ in range(depth))
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)


class SelfMedMae(nn.Module):
    """SelfMedMAE's ``MAE3D`` (``dims=3``: a table without a cls row) or ``MAE`` (``dims=2``: with one)."""

    def __init__(self, dims: int = 3, input_size: int = 32, patch_size: int = 8, in_chans: int = 1, embed_dim: int = 32,
                 depth: int = 4, num_heads: int = 2, decoder_embed_dim: int = 16, decoder_depth: int = 1,
                 decoder_num_heads: int = 2):
        super().__init__()
        self.dims, self.patch_size = dims, patch_size
        self.grid = [input_size // patch_size] * dims
        length, cls_rows = math.prod(self.grid), 1 if dims == 2 else 0
        self.encoder_pos_embed = nn.Parameter(torch.zeros(1, cls_rows + length, embed_dim), requires_grad=False)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cls_rows + length, decoder_embed_dim), requires_grad=False)
        self.encoder = _SelfMedMaeEncoder(dims, patch_size, in_chans, embed_dim, depth, num_heads)
        self.decoder = _SelfMedMaeDecoder(decoder_embed_dim, decoder_depth, decoder_num_heads,
                                          in_chans * patch_size**dims)
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``patchify_image``: (B, C, *S) -> (B, L, p^d * C), each patch (p, .., p, C), grid row-major."""
        p, d = self.patch_size, self.dims
        batch, channels = imgs.shape[:2]
        x = imgs.reshape(batch, channels, *[n for g in self.grid for n in (g, p)])
        x = x.permute(0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1)
        return x.reshape(batch, math.prod(self.grid), p**d * channels)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch: (B, 1 + L, D)."""
        return self.encoder.forward_features(self.patchify(imgs), self.encoder_pos_embed)
