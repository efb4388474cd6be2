"""Pipelined inference: exact outputs in order, any split, varying shapes, errors, drain."""

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import streamflow as sf
from streamflow.testing import MemorySource

pytestmark = pytest.mark.asyncio

CPUS = ["cpu:0", "cpu:1", "cpu:2"]


def mlp(width: int = 32, depth: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])


class Residual(nn.Module):
    """Not a Sequential: split by torch.fx between graph nodes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))
        return self.c(h)


async def run_flow(pipe: sf.Pipeline, frames: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    flow = sf.Flow("infer")
    flow.source("frames", sf.iterate(frames)).map("model", pipe).sink("out", sf.collect(outputs))
    await flow.run()
    return outputs


def reference(model: nn.Module | list[nn.Module], frames: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.inference_mode():
        if isinstance(model, list):
            outs = []
            for x in frames:
                for m in model:
                    x = m(x)
                outs.append(x)
            return outs
        return [model(x) for x in frames]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5), f"sample {i} differs"


@pytest.mark.parametrize("partition", [[12], [6, 6], [3, 4, 5]])
async def test_sequential_model_any_number_of_stages(partition: list[int]) -> None:
    model = mlp()
    frames = [torch.randn(1, 32) for _ in range(64)]
    pipe = sf.pipeline(model, CPUS[: len(partition)], torch.randn(1, 32), partition=partition)
    assert pipe.plan.partition == partition
    assert_same(await run_flow(pipe, frames), reference(model, frames))


@pytest.mark.parametrize("stages", [1, 2, 3])
async def test_fx_traced_model(stages: int) -> None:
    model = Residual().eval()
    frames = [torch.randn(2, 32) for _ in range(40)]
    n = len(sf.parallel.split_layers(model))
    partition = [n] if stages == 1 else [1] * (stages - 1) + [n - stages + 1]
    pipe = sf.pipeline(model, CPUS[:stages], torch.randn(1, 32), partition=partition)
    assert_same(await run_flow(pipe, frames), reference(model, frames))


@pytest.mark.parametrize("stages", [1, 2, 3])
async def test_list_of_modules(stages: int) -> None:
    layers = list(mlp(16, 3))
    frames = [torch.randn(1, 16) for _ in range(30)]
    partition = {1: [6], 2: [2, 4], 3: [2, 2, 2]}[stages]  # 3 x (Linear, Tanh) flattened
    pipe = sf.pipeline(layers, CPUS[:stages], torch.randn(1, 16), partition=partition)
    assert_same(await run_flow(pipe, frames), reference(layers, frames))


async def test_auto_plan_and_varying_shapes() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()
    frames = [torch.randn(b, 3, s, s) for b, s in [(1, 16), (3, 9), (2, 31), (1, 5), (4, 16)] * 6]
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], torch.randn(1, 3, 16, 16))
    assert 1 <= len(pipe.plan.stages) <= 2
    text = str(pipe.plan)
    assert "cpu:0" in text and "throughput" in text.lower()
    assert_same(await run_flow(pipe, frames), reference(model, frames))


async def test_stream_without_a_flow_and_early_exit() -> None:
    model = mlp()
    frames = [torch.randn(1, 32) for _ in range(20)]
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], frames[0], partition=[6, 6])
    async with pipe.open(frames) as outputs:
        got = [y async for y in outputs]
    assert_same(got, reference(model, frames))
    async with pipe.open(frames * 100) as outputs:
        async for _ in outputs:
            break  # leaving early cancels the flow and joins its threads
    assert not [t for t in threading.enumerate() if t.name.startswith("streamflow-")]


async def test_a_failing_layer_names_the_part_and_follows_the_policy() -> None:
    class Picky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] == 3:
                raise ValueError("batch of 3 not allowed")
            return x

    model = nn.Sequential(nn.Linear(8, 8), Picky(), nn.Linear(8, 8))
    frames = [torch.randn(b, 8) for b in (1, 2, 3, 1, 2)]
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], torch.randn(1, 8), partition=[1, 2])
    flow = sf.Flow("infer")
    flow.source("frames", frames).map("model", pipe).sink("out", sf.collect())
    with pytest.raises(sf.StageError) as info:
        await flow.run()
    message = str(info.value)
    assert "stage 'model'" in message and "shape=[3, 8]" in message
    assert "model[1] (layers 1..2 on cpu:1): ValueError: batch of 3 not allowed" in message

    out: list[torch.Tensor] = []
    flow = sf.Flow("skip")
    flow.source("frames", frames).map("model", pipe, errors="skip").sink("out", sf.collect(out))
    await flow.run()
    assert [y.shape[0] for y in out] == [1, 2, 1, 2]


async def test_stop_with_drain_finishes_samples_in_flight() -> None:
    model = mlp()
    source = MemorySource([torch.randn(1, 32) for _ in range(8)], forever=True)
    out: list[torch.Tensor] = []
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], torch.randn(1, 32), partition=[6, 6])
    flow = sf.Flow("f")
    flow.source("s", source).map("model", pipe).sink("out", sf.collect(out))
    async with flow.start() as running:
        while len(out) < 30:
            await asyncio.sleep(0.001)
        await running.stop(drain=True)
    assert len(out) == source.taken and source.unacked == []
    metrics = flow.metrics()
    assert metrics["model[0]"].items_out == metrics["model[1]"].items_out == source.taken
    assert metrics["model[1]"].latency_p50_s is not None


async def test_bad_models_and_options() -> None:
    with pytest.raises(TypeError):
        sf.pipeline("not a model", ["cpu:0"], torch.randn(1, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example="):
        sf.pipeline(mlp(), ["cpu:0"])
    with pytest.raises(ValueError, match="cuda_graphs=True needs CUDA"):
        sf.pipeline(mlp(), ["cpu:0"], torch.randn(1, 32), cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graphs", [False, True])
async def test_cuda_parts(cuda_graphs: bool) -> None:
    model = mlp(64, 4)
    frames = [torch.randn(1, 64) for _ in range(50)]
    pipe = sf.pipeline(
        model, ["cuda:0", "cuda:0"], frames[0], partition=[4, 4], cuda_graphs=cuda_graphs
    )
    got = [y.cpu() for y in await run_flow(pipe, frames)]
    assert_same(got, reference(model, frames))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_two_parts_on_one_gpu_run_on_two_threads() -> None:
    seen: set[str] = set()

    class Where(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.add(threading.current_thread().name)
            return x

    model = nn.Sequential(nn.Linear(4, 4), Where(), nn.Linear(4, 4), Where())
    pipe = sf.pipeline(model, ["cuda:0", "cuda:0"], torch.randn(1, 4), partition=[2, 2])
    seen.clear()  # profiling ran the model on this thread
    await run_flow(pipe, [torch.randn(1, 4)] * 5)
    assert len(seen) == 2


async def test_parts_share_the_flows_device_workers() -> None:
    seen: dict[str, set[str]] = {"part": set(), "stage": set()}

    class Where(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["part"].add(threading.current_thread().name)
            return x

    def post(y: torch.Tensor) -> torch.Tensor:
        seen["stage"].add(threading.current_thread().name)
        return y

    model = nn.Sequential(nn.Linear(4, 4), Where())
    pipe = sf.pipeline(model, ["cpu:1"], torch.randn(1, 4), partition=[2], inline_below=0)
    seen["part"].clear()  # profiling ran the model on this thread
    flow = sf.Flow("shared")
    flow.source("s", [torch.randn(1, 4)] * 5).map("model", pipe).map(
        "post", post, device="cpu:1"
    ).sink("out", sf.collect())
    await flow.run()
    assert seen["part"] == seen["stage"] == {"streamflow-cpu:1"}


async def test_a_sample_enters_while_earlier_ones_are_still_inside() -> None:
    """Each sample starts the moment it arrives, not when the one before it has left."""
    import time

    entered: list[float] = []
    delay = [0.0]  # no sleeping while the pipeline profiles its layers

    class Slow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(delay[0])
            return x

    class Mark(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            entered.append(time.perf_counter())
            return x

    async def trickle() -> AsyncIterator[torch.Tensor]:
        for _ in range(3):
            yield torch.zeros(1, 2)
            await asyncio.sleep(0.01)

    pipe = sf.pipeline(
        nn.Sequential(Mark(), Slow(), Slow()),
        ["cpu:0", "cpu:1", "cpu:2"],
        torch.zeros(1, 2),
        partition=[1, 1, 1],
    )
    entered.clear()
    delay[0] = 0.05
    flow = sf.Flow("f")
    flow.source("s", trickle()).map("model", pipe).sink("o", sf.collect())
    await flow.run()
    gaps = [b - a for a, b in itertools.pairwise(entered)]
    assert len(entered) == 3 and max(gaps) < 0.04  # not ~0.1 s, the pipeline's latency


async def test_two_parts_may_share_a_device() -> None:
    model = mlp()
    frames = [torch.randn(1, 32) for _ in range(10)]
    pipe = sf.pipeline(model, ["cpu:0", "cpu:0"], frames[0], partition=[6, 6])
    assert pipe.plan.devices == ["cpu:0", "cpu:0"]
    assert_same(await run_flow(pipe, frames), reference(model, frames))
    with pytest.raises(ValueError, match="more than once"):
        sf.pipeline(model, ["cpu:0", "cpu:0"], frames[0])  # the planner needs distinct devices


async def test_a_small_single_stage_runs_inline_on_the_loop() -> None:
    """Handing a tiny model to a thread costs more than running it: one small stage runs on
    the event loop, exactly like the sequential model."""
    names: set[str] = set()

    class Where(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            names.add(threading.current_thread().name)
            return x

    model = nn.Sequential(nn.Linear(4, 4), Where())
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], torch.randn(1, 4))
    assert pipe.plan.partition == [2] and pipe.inline
    frames = [torch.randn(1, 4) for _ in range(5)]
    names.clear()
    outputs = await run_flow(pipe, frames)
    assert names == {threading.current_thread().name}  # not a streamflow-cpu:N worker
    assert_same(outputs, reference(model, frames))
    big = sf.pipeline(model, ["cpu:0"], torch.randn(1, 4), inline_below=0)
    assert not big.inline


async def test_the_flow_description_shows_the_parts() -> None:
    pipe = sf.pipeline(mlp(), ["cpu:0", "cpu:1"], torch.randn(1, 32), partition=[5, 7])
    flow = sf.Flow("f")
    flow.source("n", [torch.randn(1, 32)]).map("model", pipe).sink("o", sf.collect())
    assert "pipeline [layers 0..4 on cpu:0 | layers 5..11 on cpu:1]" in str(flow.describe())


async def test_hooks_registered_on_layers_still_run() -> None:
    """Parts call a layer's forward directly only while it has no hooks: a hook registered
    after the pipeline was built, on one layer or on every module, still runs and still
    changes the output."""
    model = mlp()
    frames = [torch.randn(1, 32) for _ in range(8)]
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], frames[0], partition=[6, 6])
    assert_same(await run_flow(pipe, frames), reference(model, frames))

    def double(module: nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        return out * 2

    on_layer = model[3][0].register_forward_hook(double)  # a Linear inside the second part
    try:
        hooked = reference(model, frames)
        assert not torch.allclose(hooked[0], reference(mlp(), frames[:1])[0])
        assert_same(await run_flow(pipe, frames), hooked)
    finally:
        on_layer.remove()

    calls: list[str] = []
    everywhere = nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append(type(module).__name__)
    )
    try:
        assert_same(await run_flow(pipe, frames), reference(model, frames))
    finally:
        everywhere.remove()
    assert calls.count("Linear") >= 6 * len(frames)  # every Linear ran through __call__


async def test_common_layers_called_through_their_operator_compute_what_forward_does() -> None:
    """Parts call the operator behind Linear, the convolutions and the activations themselves.
    The outputs still equal the model's, with each layer's settings, with parameters replaced
    after the pipeline was built, and through layers that must keep their own forward."""

    class Doubled(nn.Linear):  # a subclass: its own forward must run
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, padding_mode="reflect", padding=1),
        nn.GELU(approximate="tanh"),
        nn.Flatten(),
        nn.Linear(64, 16),
        nn.Sigmoid(),
        nn.Identity(),
        Doubled(16, 16),
        nn.ReLU(),
        nn.Unflatten(1, (1, 16)),
        nn.Conv1d(1, 2, 3),
        nn.Tanh(),
    )
    frames = [torch.randn(1, 3, 8, 8) for _ in range(6)]
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], frames[0], partition=[6, 7])
    assert_same(await run_flow(pipe, frames), reference(model, frames))
    model[5].weight = nn.Parameter(torch.randn(16, 64))
    model[11].bias = None
    assert_same(await run_flow(pipe, frames), reference(model, frames))
    del model[5].bias  # model surgery: a parameter becomes a buffer
    model[5].register_buffer("bias", torch.full((16,), 0.5))
    del model[0].weight
    model[0].register_buffer("weight", torch.randn(4, 3, 3, 3))
    assert_same(await run_flow(pipe, frames), reference(model, frames))


async def test_tensor_subclasses_see_the_same_torch_functions_as_in_the_model() -> None:
    """F.relu hands tensor subclasses to ``__torch_function__`` as itself; a part calling
    torch.relu instead would show them another function."""
    seen: list[object] = []
    watched = {F.linear, F.relu, torch.relu, torch.tanh}

    class Watched(torch.Tensor):
        @classmethod
        def __torch_function__(  # type: ignore[override]
            cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            if func in watched:
                seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh())
    frames = [torch.randn(1, 4).as_subclass(Watched) for _ in range(3)]
    pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], frames[0], partition=[2, 2])
    seen.clear()
    expected = reference(model, frames)
    in_model = list(seen)
    seen.clear()
    assert_same(await run_flow(pipe, frames), expected)
    assert Counter(seen) == Counter(in_model) and F.relu in seen  # the parts interleave
