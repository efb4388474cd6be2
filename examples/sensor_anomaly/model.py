"""A small autoencoder for 8-feature sensor readings, and the data it learns from.

Normal readings lie near a 2-dimensional plane in 8 dimensions (what correlated sensor
channels look like); an anomaly is off that plane, so the autoencoder reconstructs it badly.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 8
_BASIS = torch.Generator().manual_seed(7)
MIXING = torch.randn(2, FEATURES, generator=_BASIS)  # the plane normal readings lie on


def normal_readings(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` normal readings: two latent factors mixed into eight channels, plus noise."""
    latent = torch.randn(n, 2, generator=generator)
    return latent @ MIXING + 0.05 * torch.randn(n, FEATURES, generator=generator)


def anomalous_readings(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` readings off the plane (a broken sensor, a spike)."""
    return normal_readings(n, generator) + 3.0 * torch.randn(n, FEATURES, generator=generator)


class AutoEncoder(nn.Module):
    """8 -> 16 -> 2 -> 16 -> 8; the anomaly score is the mean squared reconstruction error."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 2))
        self.decode = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, FEATURES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decode(self.encode(x))
        return out

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction error per reading (higher: more anomalous)."""
        return ((self.forward(x) - x) ** 2).mean(dim=1)


def train(seed: int = 0, steps: int = 250) -> tuple[AutoEncoder, float]:
    """Fit on normal readings (about a second on one core); return the model and a
    threshold: 1.5 x the worst error seen on 20,000 fresh normal readings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses time to thread hand-offs
    try:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = AutoEncoder()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        data = normal_readings(1024, generator)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = ((model(data) - data) ** 2).mean()
            loss.backward()
            optimizer.step()
        model.eval()
        errors = model.score(normal_readings(20000, generator))
    finally:
        torch.set_num_threads(threads)
    return model, float(errors.max()) * 1.5
