"""What an online trainer reports: prequential loss and accuracy, per-part learning and memory."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Tally", "TrainerMetrics"]


@dataclass(frozen=True)
class TrainerMetrics:
    """A snapshot of an :class:`OnlineTrainer`, over every run since it was created.

    ``samples`` counts rows (an item ``(x, y)`` holds ``x.shape[0]`` rows), ``items``
    stream items. ``loss`` is the mean loss of the last ``window`` items. ``accuracy`` is
    the prequential accuracy (each prediction made before learning from its label) over all
    rows, ``recent_accuracy`` over the rows of the last ``window`` items; both are ``None``
    unless ``y`` holds class indices. Per part: ``updates`` (optimizer steps),
    ``staleness`` (the largest number of weight versions between the oldest forward behind
    an update and that update), ``staleness_bound`` (the schedule's stated steady-state
    staleness), ``activation_bytes`` (peak bytes of saved activations held),
    ``weight_bytes`` (the part's weights and buffers: one copy, never a stashed version,
    since a backward always uses the live weights).
    """

    schedule: str
    samples: int
    items: int
    loss: float | None
    accuracy: float | None
    recent_accuracy: float | None
    updates: tuple[int, ...]
    staleness: tuple[int, ...]
    staleness_bound: tuple[int, ...]
    activation_bytes: tuple[int, ...]
    weight_bytes: tuple[int, ...]

    @property
    def peak_bytes(self) -> int:
        """Activations at their per-part peaks plus the weights."""
        return sum(self.activation_bytes) + sum(self.weight_bytes)


class Tally:
    """Prequential counters, written on the last part's thread."""

    def __init__(self, window: int) -> None:
        self.samples = 0
        self.items = 0
        self.correct = 0
        self.classified = 0
        self.recent: deque[tuple[float, int, int]] = deque(maxlen=window)  # loss, hits, rows

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data (what a checkpoint keeps)."""
        return {
            "samples": self.samples,
            "items": self.items,
            "correct": self.correct,
            "classified": self.classified,
            "recent": [list(r) for r in self.recent],
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take the counters of :meth:`snapshot` back."""
        self.samples = int(state["samples"])
        self.items = int(state["items"])
        self.correct = int(state["correct"])
        self.classified = int(state["classified"])
        self.recent.clear()
        self.recent.extend((float(a), int(b), int(c)) for a, b, c in state["recent"])

    def add(self, pred: torch.Tensor, y: torch.Tensor, loss: torch.Tensor, rows: int) -> None:
        self.items += 1
        self.samples += rows
        hits = classified = 0
        if not y.is_floating_point() and pred.dim() >= 1 and y.shape == pred.shape[:-1]:
            hits, classified = int((pred.argmax(-1) == y).sum()), max(1, y.numel())
            self.correct += hits
            self.classified += classified
        self.recent.append((float(loss), hits, classified))
