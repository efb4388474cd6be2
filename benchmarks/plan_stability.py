"""Does the auto planner pick the same, good, plan every time it profiles a model?

For each model (batch 1, devices cpu:0 and cpu:1): calls ``sf.pipeline(..., partition="auto")``
``--profiles`` times and prints the plans it chose and how long each call took; then measures
the throughput of the chosen plan(s) against the contiguous 1- and 2-stage cuts: every cut is
screened with one short run, then the best few and the chosen ones run ``--rounds`` rotated
rounds (the contenders take turns in each round, each round starting one later), and the
ratio chosen / best is printed: each cut's rate over the most chosen plan's in the same
round, median over the rounds (the machine's speed drifts too much for unpaired figures).

Run on a quiet machine: .venv/bin/python benchmarks/plan_stability.py [--only cnn13,heavy]
(``PYTHONPATH=<another tree> .venv/bin/python benchmarks/plan_stability.py`` runs it against
another copy of streamflow, e.g. the one before a change).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import table
from _models import cnn, mlp
from torch import nn

import streamflow as sf
import streamflow.parallel

DEVICES = ["cpu:0", "cpu:1"]


def uneven_mlp() -> nn.Sequential:
    """Widths 64 .. 2048, unevenly: layer costs from 8 K to 2 M multiply-adds."""
    widths = [64, 128, 256, 512, 1024, 2048, 512, 2048, 64]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)  # 15 layers


def small_cnn() -> nn.Sequential:
    return nn.Sequential(  # 13 layers, on 32 x 32 images
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def one_heavy() -> nn.Sequential:
    """An MLP whose 2048 x 2048 layer does two thirds of the work (9 layers)."""
    return nn.Sequential(
        nn.Linear(256, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


MODELS: dict[str, tuple[str, Callable[[], nn.Sequential], tuple[int, ...]]] = {
    "mlp1024": ("MLP 8 x 1024", lambda: mlp(1024), (1, 1024)),
    "mlp256": ("MLP 8 x 256", lambda: mlp(256), (1, 256)),
    "cnn": ("CNN 64x64", cnn, (1, 3, 64, 64)),
    "uneven": ("MLP 64..2048 uneven", uneven_mlp, (1, 64)),
    "cnn13": ("small CNN 32x32", small_cnn, (1, 3, 32, 32)),
    "heavy": ("MLP one 2048x2048", one_heavy, (1, 256)),
}


class ForeignLoad:
    """CPU time used by other processes while a block ran, in cores (from /proc/stat less
    this process's own time): above ~0.2 the machine was not quiet and the figures are off."""

    def __enter__(self) -> ForeignLoad:
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        wall = end[0] - self.start[0]
        busy = (end[1] - self.start[1]) - (end[2] - self.start[2])
        self.cores = max(0.0, busy / wall) if wall > 0 else 0.0

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = 0.0
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system


def throughput(pipe: Any, example: torch.Tensor, seconds: float) -> float:
    """Samples/s of ``pipe`` in a flow fed as fast as it takes them for ``seconds``: the
    spacing of the outputs in the last four fifths of that time (thread start-up, first
    calls and the draining after the source stops left out)."""
    stamps: list[float] = []

    began: list[float] = []

    def source() -> Iterator[torch.Tensor]:
        began.append(time.perf_counter())
        end = began[0] + seconds
        while time.perf_counter() < end:
            yield example.clone()

    async def sink(_: Any) -> None:
        stamps.append(time.perf_counter())

    async def run() -> None:
        flow = sf.Flow("plan-stability")
        flow.source("in", sf.iterate(source())).map("model", pipe).sink("out", sink)
        await flow.run()

    asyncio.run(run())
    # the last four fifths of the run, not the draining after it: steady state only
    kept = [t for t in stamps if began[0] + 0.2 * seconds <= t <= began[0] + seconds]
    if len(kept) < 2 or kept[-1] <= kept[0]:
        return float("nan")
    return (len(kept) - 1) / (kept[-1] - kept[0])


def fixed(model: nn.Sequential, prof: Any, cut: tuple[int, ...]) -> Any:
    chosen = sf.parallel.plan(prof, DEVICES[: len(cut)], partition=list(cut))
    return sf.parallel.Pipeline(sf.parallel.split_layers(model), chosen, inline_below=5e-4)


def describe(p: Any) -> str:
    table_fn = getattr(p, "table", None)
    return table_fn() if callable(table_fn) else str(p)


def bench(key: str, profiles: int, rounds: int, screen_s: float, round_s: float) -> dict[str, Any]:
    with ForeignLoad() as foreign:
        result = _bench(key, profiles, rounds, screen_s, round_s)
    result["foreign"] = foreign.cores
    print(f"other processes used {foreign.cores:.2f} cores meanwhile")
    return result


def _bench(key: str, profiles: int, rounds: int, screen_s: float, round_s: float) -> dict[str, Any]:
    title, make, shape = MODELS[key]
    torch.manual_seed(0)
    model = make().eval()
    example = torch.randn(*shape)
    n = len(sf.parallel.split_layers(model))
    chosen: list[tuple[int, ...]] = []
    seconds: list[float] = []
    last: Any = None
    for _ in range(profiles):
        t0 = time.perf_counter()
        last = sf.pipeline(model, DEVICES, example)
        seconds.append(time.perf_counter() - t0)
        chosen.append(tuple(last.plan.partition))
    print(f"\n## {title} ({n} layers)")
    print("plans chosen: " + " ".join(str(list(c)) for c in chosen))
    print(
        "sf.pipeline(auto) seconds: "
        + " ".join(f"{s:.2f}" for s in seconds)
        + f" (median {statistics.median(seconds):.2f})"
    )
    print(describe(last.plan))

    prof = sf.parallel.profile(model, example, DEVICES)
    cuts: list[tuple[int, ...]] = [(n,)] + [(k, n - k) for k in range(1, n)]
    pipes = {cut: fixed(model, prof, cut) for cut in cuts}
    screened = {cut: throughput(pipes[cut], example, screen_s) for cut in cuts}
    top = sorted(cuts, key=lambda c: -screened[c])[:4]
    finalists = list(dict.fromkeys([*top, *chosen]))
    runs: dict[tuple[int, ...], list[float]] = {c: [] for c in finalists}
    for r in range(rounds):
        order = finalists[r % len(finalists) :] + finalists[: r % len(finalists)]
        for cut in order:
            runs[cut].append(throughput(pipes[cut], example, round_s))
    med = {c: statistics.median(v) for c, v in runs.items()}
    mode = collections.Counter(chosen).most_common(1)[0][0]
    # The machine's speed drifts by 20% and more within a minute, so compare within rounds:
    # each cut's rate over the most chosen plan's in the same round, median over rounds.
    paired = {
        c: statistics.median(a / b for a, b in zip(runs[c], runs[mode], strict=True))
        for c in finalists
    }
    best = max(paired, key=lambda c: paired[c])
    rows = [
        (
            str(list(c)),
            f"chosen x{chosen.count(c)}" if c in chosen else "",
            screened[c],
            med[c],
            paired[c],
            paired[c] / paired[best],
        )
        for c in sorted(finalists, key=lambda c: -paired[c])
    ]
    print(
        f"throughput: {rounds} rotated rounds of {round_s:.1f} s (screened: one {screen_s:.2f} s "
        f"run of each of the {len(cuts)} cuts); x chosen: median over the rounds of the rate "
        f"over {list(mode)}'s in the same round"
    )
    print(table(["cut", "", "screened/s", "median/s", "x chosen", "x best"], rows))
    worst = min(paired[c] / paired[best] for c in set(chosen))
    print(
        f"chosen/best: {paired[mode] / paired[best]:.3f} (most chosen {list(mode)}; "
        f"worst chosen {worst:.3f}); best {list(best)}"
    )
    return {
        "title": title,
        "chosen": chosen,
        "seconds": statistics.median(seconds),
        "ratio": paired[mode] / paired[best],
        "worst": worst,
        "best": best,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None, help="comma-separated keys: " + ",".join(MODELS))
    parser.add_argument("--profiles", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--screen", type=float, default=0.3, help="seconds per screening run")
    parser.add_argument("--round", type=float, default=0.3, help="seconds per run in a round")
    args = parser.parse_args()
    sf.configure_logging(level="warning")
    keys = list(MODELS) if args.only is None else args.only.split(",")
    results = [bench(k, args.profiles, args.rounds, args.screen, args.round) for k in keys]
    print("\n## summary")
    rows = [
        (
            r["title"],
            " ".join("".join(str(list(c)).split()) for c in r["chosen"]),
            r["seconds"],
            str(list(r["best"])),
            r["ratio"],
            r["worst"],
            r["foreign"],
        )
        for r in results
    ]
    headers = ["model", "plans", "auto s", "best cut", "chosen/best", "worst", "other cores"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
