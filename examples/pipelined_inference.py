"""Split an MLP over two CPU workers and stream samples through it.

Run: .venv/bin/python examples/pipelined_inference.py
"""

import asyncio

import torch

import streamflow as sf


async def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU()) for _ in range(8)]
    ).eval()
    frames = [torch.randn(1, 512) for _ in range(500)]
    pipe = sf.pipeline(model, devices=["cpu:0", "cpu:1"], example=frames[0])
    print(pipe.plan)

    outputs: list[torch.Tensor] = []
    flow = sf.Flow("infer")
    flow.source("frames", sf.iterate(frames)).map("model", pipe).sink("out", sf.collect(outputs))
    await flow.run()
    with torch.inference_mode():
        assert all(
            torch.allclose(model(x), y, atol=1e-5) for x, y in zip(frames, outputs, strict=True)
        )
    for name, m in flow.metrics().items():
        if name.startswith("model"):
            print(
                f"{name:9} items={m.items_out} busy={m.busy:.2f} p50={1e3 * (m.latency_p50_s or 0):.3f} ms"
            )


if __name__ == "__main__":
    asyncio.run(main())
