"""Models the pipeline benchmarks share (seeded, so every run builds the same weights)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["cnn", "mlp"]


def mlp(width: int, layers: int = 8) -> nn.Sequential:
    """``layers`` blocks of Linear(width, width) + ReLU."""
    torch.manual_seed(0)
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]
    )


def cnn() -> nn.Sequential:
    """Five convolutions on 3 x 64 x 64 images, pooled to 10 classes (15 layers)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
