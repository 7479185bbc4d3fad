"""Classification fine-tune model: ViT encoder + linear head on the average patch token."""

from __future__ import annotations

import torch
from torch import nn

from fedmae.models.vit import ViTEncoder


class ViTClassifier(nn.Module):
    """Logits (B, num_classes) for multi-label (sigmoid) or multi-class (softmax) classification.

    Pools the normalised patch tokens by their mean (MAE's fine-tuning choice: the cls token is not
    trained by the MAE objective, the patch tokens are).
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int, head_dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.encoder = encoder
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        # A near-zero head starts fine-tuning from the pre-trained features instead of a random
        # projection of them (MAE fine-tuning uses std 2e-5).
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> pooled features (B, D)."""
        return self.encoder.forward_features(x)[:, 1:, :].mean(dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(features))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
