"""The online learner of the kill tests: its records, model and flow, shared by the test
and its child process (so both learn exactly the same way)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from streamflow.connectors.files import JsonLinesSink
from streamflow.connectors.kafka import KafkaSource
from torch import nn

import streamflow as sf

FEATURES = 8


def records(n: int, seed: int = 11) -> list[bytes]:
    """``n`` labelled records as JSON: ``{"i": index, "x": [8 floats], "y": 0 or 1}``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x = [rng.uniform(-1, 1) for _ in range(FEATURES)]
        out.append(json.dumps({"i": i, "x": x, "y": int(sum(x) > 0)}).encode())
    return out


def decode(value: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    r = json.loads(value)
    return torch.tensor(r["x"], dtype=torch.float32), torch.tensor([float(r["y"])])


def trainer(schedule: str) -> sf.OnlineTrainer:
    """``sequential``: one part, a step per record; ``sync``: two parts, mini-batches of 4."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 1), nn.Flatten(0))
    two = schedule != "sequential"
    return sf.OnlineTrainer(
        model,
        ["cpu:0", "cpu:1"] if two else ["cpu:0"],
        partition=[2, 2] if two else [4],
        loss_fn=lambda out, y: nn.functional.binary_cross_entropy_with_logits(out, y),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        schedule="sync",
        microbatches=4 if two else 1,
    )


def flow(
    learner: sf.OnlineTrainer, source: Any, predictions: Path, checkpoints: sf.Checkpoints | None
) -> sf.Flow:
    """source -> decode -> learn -> the predictions, one JSON line per record."""
    f = sf.Flow("learner", checkpoints=checkpoints)
    (
        f.source("records", source)
        .map("decode", lambda r: decode(r.raw) if hasattr(r, "raw") else decode(r))
        .map("learn", learner)
        .map("show", lambda p: [round(float(p), 6)])
        .sink("predictions", JsonLinesSink(predictions))
    )
    return f


def kafka_source(bootstrap: str, topic: str, group: str) -> KafkaSource:
    # static membership: a restarted process takes its place in the group at once
    return KafkaSource(
        topic, group, bootstrap, max_pending=2000, group_instance_id=f"{group}-member",
        session_timeout_ms=6000,
    )  # fmt: skip
