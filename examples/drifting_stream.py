"""Online learning on a drifting stream: handwritten digits whose class mix slowly rotates.

At any moment about three neighbouring classes make up most of the stream, and the mix
moves on around the ten digits (two full turns over the run), so the stream is not i.i.d.:
what the model learnt a while ago is rarely asked. An OnlineTrainer split over two CPU
workers predicts each digit before learning from it (prequential), under two schedules:
partime (every part learns on every sample) and nf1b (4 micro-batches per update). The
example prints the accuracy per schedule and saves the prequential accuracy curves.

Run: .venv/bin/python examples/drifting_stream.py [--samples 6000] [--out drifting_stream.png]
"""

from __future__ import annotations

import argparse
import asyncio
import math
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import streamflow as sf

WINDOW = 200  # samples per point of the accuracy curve
Schedule = Literal["sync", "partime", "nf1b"]
SCHEDULES: list[tuple[Schedule, int]] = [("partime", 1), ("nf1b", 4)]


def drifting_digits(samples: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` (image, label) pairs; class c arrives with a weight that peaks when the
    rotating centre passes c (a von Mises bump over the ten classes)."""
    data = load_digits()
    images = torch.tensor(data.data / 16, dtype=torch.float32)
    labels = torch.tensor(data.target)
    by_class = [torch.nonzero(labels == c).flatten() for c in range(10)]
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for t in range(samples):
        centre = 10 * 2 * t / samples  # two turns around the classes
        weights = torch.tensor(
            [math.exp(3 * math.cos(2 * math.pi * (c - centre) / 10)) for c in range(10)]
        )
        c = int(torch.multinomial(weights, 1, generator=g))
        i = by_class[c][int(torch.randint(len(by_class[c]), (1,), generator=g))]
        pairs.append((images[i : i + 1], labels[i : i + 1]))
    return pairs


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


async def learn(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule, mb: int
) -> list[float]:
    """Stream ``pairs`` through a trainer; return 1.0/0.0 per sample: right before learning."""
    trainer = sf.OnlineTrainer(
        mlp(),
        devices=["cpu:0", "cpu:1"],
        loss_fn=nn.functional.cross_entropy,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        schedule=schedule,
        microbatches=mb,
        partition=[2, 3],
    )
    preds: list[torch.Tensor] = []
    flow = sf.Flow("drift")
    flow.source("digits", sf.iterate(pairs)).map("learn", trainer).sink("preds", sf.collect(preds))
    await flow.run()
    m = trainer.metrics()
    print(
        f"{schedule:8} prequential accuracy {m.accuracy:.3f}, last {WINDOW}: "
        f"{m.recent_accuracy:.3f}; updates per part {m.updates}, staleness {m.staleness}"
    )
    return [float(p.argmax(-1).item() == y.item()) for p, (_, y) in zip(preds, pairs, strict=True)]


def curve(hits: list[float]) -> tuple[list[int], list[float]]:
    window = min(WINDOW, len(hits))
    xs, ys = [], []
    for end in range(window, len(hits) + 1, max(1, window // 4)):
        xs.append(end)
        ys.append(sum(hits[end - window : end]) / window)
    return xs, ys


async def main(samples: int, out: Path) -> None:
    pairs = drifting_digits(samples)
    fig, ax = plt.subplots(figsize=(8, 4))
    for schedule, mb in SCHEDULES:
        hits = await learn(pairs, schedule, mb)
        ax.plot(*curve(hits), label=f"{schedule} (2 parts)")
        if samples >= 2000:  # the second turn revisits classes learnt during the first
            assert sum(hits[samples // 2 :]) / (samples - samples // 2) > 0.8, schedule
    ax.set_xlabel("samples seen")
    ax.set_ylabel(f"prequential accuracy (last {min(WINDOW, samples)})")
    ax.set_title("Digits with a rotating class mix, learnt online over two CPU workers")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"saved {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=6000, help="stream length (default 6000)")
    parser.add_argument("--out", type=Path, default=Path("drifting_stream.png"))
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    asyncio.run(main(args.samples, args.out))
