"""Masked autoencoder (He et al. 2022; SelfMedMAE 3D variant) around a ViTEncoder.

Stages, as in the paper: ``patchify`` -> ``random_masking`` -> ``forward_encoder`` (visible tokens
only) -> ``forward_decoder`` (visible tokens + mask tokens) -> ``forward_loss`` (MSE on masked
patches). Works for any number of channels and non-square / non-cubic inputs.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from fedmae.models.pos_embed import sincos_pos_embed
from fedmae.models.vit import LayerNorm, ViTEncoder, init_linear_and_norm


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, *S) -> (B, L, p^d * C) for 2D or 3D images; values ordered (p, ..., p, C) per patch."""
    p, d = patch_size, imgs.ndim - 2
    batch, channels, *sides = imgs.shape
    grid = [s // p for s in sides]
    # (B, C, g1, p, g2, p[, g3, p])
    x = imgs.reshape(batch, channels, *[n for g in grid for n in (g, p)])
    # -> (B, g1, g2[, g3], p, p[, p], C)
    order = [0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1]
    x = x.permute(order)
    return x.reshape(batch, math.prod(grid), p**d * channels)


def _take(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, X) gathered at (B, N) positions -> (B, N, X)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


class MaskedAutoencoder(nn.Module):
    """MAE: ``forward(imgs) -> (loss, pred, mask)``.

    ``pred`` is (B, L, p^d * C) in patch space (normalised per patch when ``norm_pix_loss``);
    ``mask`` is (B, L) with 1 for masked (hidden) patches and 0 for visible ones.
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        decoder_dim: int = 384,
        decoder_depth: int = 8,
        decoder_heads: int = 12,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        embed = encoder.patch_embed
        self.patch_size = embed.patch_size
        self.in_channels = embed.in_channels
        self.spatial_dims = embed.spatial_dims
        patch_values = self.patch_size**self.spatial_dims * self.in_channels

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed(decoder_dim, embed.grid_size, cls_token=True), requires_grad=False
        )  # (1, 1 + L, Dd)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_values)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)

    # ---- patch space ----
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, L, p^d * C); values ordered (p, ..., p, C) inside each patch."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, p^d * C) -> (B, C, *S): the inverse of ``patchify``."""
        p, d = self.patch_size, self.spatial_dims
        grid = self.encoder.grid_size
        batch = patches.shape[0]
        x = patches.reshape(batch, *grid, *([p] * d), self.in_channels)  # (B, g1.., p.., C)
        # -> (B, C, g1, p, g2, p[, g3, p])
        order = [0, 1 + 2 * d, *[i for axis in range(d) for i in (1 + axis, 1 + d + axis)]]
        x = x.permute(order)
        return x.reshape(batch, self.in_channels, *[g * p for g in grid])

    # ---- stages ----
    def random_masking(
        self, tokens: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample (argsort of uniform noise).

        Returns the visible tokens (B, L_keep, D), the mask (B, L; 1 = masked) and ``ids_restore``
        (B, L), the permutation that puts shuffled positions back in grid order.
        """
        ids_keep, mask, ids_restore = self.masking_order(tokens.shape[0], tokens.shape[1], mask_ratio, tokens.device)
        return _take(tokens, ids_keep), mask, ids_restore

    def masking_order(
        self, batch: int, length: int, mask_ratio: float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The masking of :meth:`random_masking` without the tokens: ``ids_keep`` (B, L_keep), the
        positions left visible; the mask (B, L); ``ids_restore`` (B, L)."""
        keep = max(1, int(length * (1 - mask_ratio)))
        noise = torch.rand(batch, length, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)  # (B, L): ascending noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L): inverse permutation
        mask = torch.ones(batch, length, device=device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # (B, L) back in grid order
        return ids_shuffle[:, :keep], mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible patches only: latent (B, 1 + L_keep, D), mask, ids_restore.

        Only the visible patches are projected, which gives the same tokens as embedding every
        patch and masking afterwards for a quarter of the patch-embedding work at 75% masking.
        """
        embed = self.encoder.patch_embed
        values = embed.patch_values(imgs)  # (B, L, C * p^d)
        batch, length = values.shape[:2]
        ids_keep, mask, ids_restore = self.masking_order(batch, length, mask_ratio, imgs.device)
        positions = self.encoder.pos_embed[:, 1:, :].expand(batch, -1, -1)  # (B, L, D)
        visible = embed.project(_take(values, ids_keep)) + _take(positions, ids_keep)  # (B, L_keep, D)
        latent = self.encoder.forward_blocks(self.encoder.prepend_cls(visible))
        return latent, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Fill masked positions with the mask token, unshuffle, decode: (B, L, p^d * C)."""
        x = self.decoder_embed(latent)  # (B, 1 + L_keep, Dd)
        batch, length = ids_restore.shape
        fill = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)  # (B, L - L_keep, Dd)
        patches = torch.cat([x[:, 1:, :], fill], dim=1)  # (B, L, Dd) in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # grid order
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed  # (B, 1 + L, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # drop cls: (B, L, p^d * C)

    def reconstruction_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patches (B, L, p^d * C), standardised per patch when ``norm_pix_loss``."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        per_patch = ((pred.float() - self.reconstruction_target(imgs)) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Image-space reconstruction for display: visible patches from the input, masked ones from
        ``pred`` (de-normalised with each patch's own statistics when ``norm_pix_loss``)."""
        original = self.patchify(imgs).float()
        pred = pred.float()
        if self.norm_pix_loss:
            mean = original.mean(dim=-1, keepdim=True)
            std = (original.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        mixed = torch.where(mask.unsqueeze(-1).bool(), pred, original)
        return self.unpatchify(mixed)
