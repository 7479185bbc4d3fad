"""UNETR segmentation model (Hatamizadeh et al. 2022) for 2D and 3D, on a ViTEncoder.

Built from MONAI's UNETR blocks, generalised over the patch size: a patch of 2^n needs n
upsampling stages and n - 1 skip connections from intermediate transformer blocks (for patch 16:
blocks 4, 7 and 10 of 12, plus the raw input and the final tokens, as in MONAI's UNETR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from fedmae.models.vit import ViTEncoder, tokens_to_grid


class UNETR(nn.Module):
    """Logits (B, out_channels, *S) at the input resolution.

    Args:
        encoder: the ViT; its patch size must be a power of two (>= 4).
        out_channels: classes (softmax) or region channels (sigmoid).
        skip_blocks: 1-based blocks whose outputs feed the decoder, shallow to deep; log2(patch) - 1 of them.
        feature_size: decoder width at full resolution (doubles per stage).
    """

    def __init__(
        self,
        encoder: ViTEncoder,
        out_channels: int,
        skip_blocks: Sequence[int] = (4, 7, 10),
        feature_size: int = 16,
        norm_name: str = "instance",
        res_block: bool = True,
    ):
        super().__init__()
        embed = encoder.patch_embed
        patch, dims, hidden = embed.patch_size, embed.spatial_dims, encoder.embed_dim
        stages = int(math.log2(patch))
        if 2**stages != patch or stages < 2:
            raise ValueError(f"UNETR needs a power-of-two patch size of at least 4, got {patch}")
        if len(skip_blocks) != stages - 1:
            raise ValueError(f"patch {patch} needs {stages - 1} skip blocks, got {list(skip_blocks)}")
        if any(not 1 <= b <= encoder.depth for b in skip_blocks) or list(skip_blocks) != sorted(set(skip_blocks)):
            raise ValueError(f"skip blocks must increase within 1..{encoder.depth}, got {list(skip_blocks)}")
        self.encoder = encoder
        self.skip_block_numbers = tuple(skip_blocks)
        self.out_channels = out_channels
        common = dict(spatial_dims=dims, kernel_size=3, norm_name=norm_name, res_block=res_block)

        self.input_block = UnetrBasicBlock(in_channels=embed.in_channels, out_channels=feature_size, stride=1, **common)
        # Skip i (shallow -> deep) is upsampled from the token grid to input / 2^(i+1), so deeper
        # skips join the decoder nearer the bottleneck, as in MONAI's UNETR.
        self.skip_projections = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=hidden,
                out_channels=feature_size * 2 ** (i + 1),
                num_layer=stages - 2 - i,
                stride=1,
                upsample_kernel_size=2,
                conv_block=True,
                **common,
            )
            for i in range(stages - 1)
        )
        # Up block j halves the channels and doubles the resolution, from the token grid to the input.
        widths = [hidden] + [feature_size * 2 ** (stages - 1 - j) for j in range(stages)]
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(in_channels=widths[j], out_channels=widths[j + 1], upsample_kernel_size=2, **common)
            for j in range(stages)
        )
        self.out = UnetOutBlock(spatial_dims=dims, in_channels=feature_size, out_channels=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.encoder.grid_size
        final, intermediates = self.encoder.forward_intermediates(x, self.skip_block_numbers)
        skips = [self.input_block(x)] + [
            project(tokens_to_grid(tokens, grid))  # (B, fs * 2^(i+1), *input / 2^(i+1))
            for project, tokens in zip(self.skip_projections, intermediates)
        ]
        y = tokens_to_grid(final, grid)  # (B, D, *grid)
        for up, skip in zip(self.up_blocks, reversed(skips)):
            y = up(y, skip)
        return self.out(y)
