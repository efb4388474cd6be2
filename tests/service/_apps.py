"""Small flows the service tests run in subprocesses (copied into a temporary folder)."""

APP = '''
import asyncio
import json
import os
from pathlib import Path

import streamflow as sf

OUT = Path(os.environ.get("SF_OUT", "."))
STUCK = os.environ.get("SF_STUCK") == "1"


class Source:
    """Endless numbers; counts what was taken and acked, and writes it down when closed
    (where a broker connector would commit)."""

    def __init__(self) -> None:
        self.taken = self.acked = self.aborted = 0

    async def __aenter__(self) -> "Source":
        return self

    async def __aexit__(self, *exc: object) -> None:
        report = {"taken": self.taken, "acked": self.acked, "aborted": self.aborted}
        (OUT / "source.json").write_text(json.dumps(report))

    def __aiter__(self):
        return self._numbers()

    async def _numbers(self):
        i = 0
        while True:
            await asyncio.sleep(0.002)
            self.taken += 1
            yield sf.Message(i, on_ack=self._ack)
            i += 1

    def _ack(self, outcome: sf.Outcome) -> None:
        if outcome & sf.Outcome.ABORTED:
            self.aborted += 1
        else:
            self.acked += 1


async def slow(x: int) -> int:
    if STUCK and x >= 20:
        await asyncio.sleep(3600)  # never finishes: the drain cannot end
    await asyncio.sleep(0.005)
    return x


def write(x: int) -> None:
    with open(OUT / "sink.txt", "a") as f:
        f.write(f"{x}\\n")


def make() -> sf.Flow:
    flow = sf.Flow("svc")
    flow.source("numbers", Source()).map("slow", slow, concurrency=4).sink("out", write)
    return flow


async def make_async() -> sf.Flow:
    flow = sf.Flow("short")
    flow.source("numbers", range(3)).map("double", lambda x: 2 * x).sink("out", print)
    return flow


def check(x: int) -> int:
    if x == 2:
        raise ValueError("two is not allowed")
    return x


failing = sf.Flow("failing")
failing.source("numbers", range(5)).map("check", check).sink("out", print)

short = sf.Flow("short")
short.source("numbers", range(3)).map("double", lambda x: 2 * x, device="cpu:0").sink("out", print)

unfinished = sf.Flow("unfinished")
unfinished.source("numbers", range(3)).map("dangling", lambda x: x)

number = 3


def add(total, x):
    return (total or 0) + x, (total or 0) + x


totals = sf.Flow("totals")
totals.source("numbers", range(5)).key_by("all", lambda x: 0).stateful_map("sum", add).sink(
    "out", print
)


def model():
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 4),
    )
'''
