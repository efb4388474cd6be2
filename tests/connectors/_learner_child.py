"""Child process of the kill tests: the online learner on a Kafka topic, checkpointed.

Run: python -m tests.connectors._learner_child BOOTSTRAP TOPIC GROUP DIR SCHEDULE N

It learns until the trainer has learned ``N`` records, then drains and writes its final
weights and counters to ``DIR/final.safetensors`` and ``DIR/final.json``. Each checkpoint
write touches ``DIR/writing-<number>`` and then takes 0.3 s more, so the test can kill the
process in the middle of one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import streamflow as sf

from ._learner import flow, kafka_source, trainer


class SlowStore(sf.DirectoryStore):
    def write_encoded(self, checkpoint: int, *args: Any) -> Any:
        (self.path.parent / f"writing-{checkpoint}").touch()
        time.sleep(0.3)
        return super().write_encoded(checkpoint, *args)


async def main(bootstrap: str, topic: str, group: str, where: str, schedule: str, n: str) -> None:
    out = Path(where)
    learner = trainer(schedule)
    checkpoints = sf.Checkpoints(SlowStore(out / "ckpt", keep=3), every=0.5)
    f = flow(learner, kafka_source(bootstrap, topic, group), out / "predictions.jsonl", checkpoints)
    async with f.start() as running:
        while learner.metrics().samples < int(n):
            await asyncio.sleep(0.02)
        await running.stop(drain=True)
    state = learner.state_dict()
    save_file(state["model"], out / "final.safetensors")
    (out / "final.json").write_text(
        json.dumps({"metrics": state["metrics"], "versions": state["versions"]})
    )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
