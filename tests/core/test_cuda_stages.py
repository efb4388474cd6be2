"""device="cuda:N" on a plain stage: inputs move to the GPU, the stage runs on its own CUDA
stream, results are ready when they move on; without the GPU, the flow fails at start."""

import threading

import pytest

import streamflow as sf

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.asyncio
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(HAS_CUDA, reason="checks the failure without a GPU")
async def test_without_the_gpu_the_flow_fails_at_start_naming_stage_and_device() -> None:
    calls: list[str] = []

    class Model(sf.Stage[object, object]):
        def setup(self) -> None:
            calls.append("setup")

        def process(self, item: object) -> object:
            calls.append("process")
            return item

    for stage in (lambda x: x, Model()):
        flow = sf.Flow("f")
        flow.source("n", [torch.ones(2)]).map("model", stage, device="cuda:0").sink(
            "o", sf.collect()
        )
        with pytest.raises(sf.StageError) as info:
            await flow.run()
        assert info.value.stage == "model" and info.value.phase == "setup"
        assert "cuda:0 is not available" in str(info.value)
    assert calls == []  # neither setup nor process ran on a CPU in the GPU's place
    assert not [t for t in threading.enumerate() if t.name.startswith("streamflow-")]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
async def test_inputs_move_to_the_gpu_and_run_on_the_stages_own_stream() -> None:
    seen: list[tuple[str, bool, str]] = []
    threads: dict[str, set[str]] = {"double": set(), "add": set()}

    def double(batch: dict[str, object]) -> object:
        x = batch["x"]
        assert isinstance(x, torch.Tensor)
        stream = torch.cuda.current_stream()
        seen.append((str(x.device), stream != torch.cuda.default_stream(), str(stream.device)))
        threads["double"].add(threading.current_thread().name)
        return {"y": x * 2, "id": batch["id"]}

    def add_one(batch: dict[str, object]) -> object:
        y = batch["y"]
        assert isinstance(y, torch.Tensor) and y.is_cuda  # already there: not copied
        threads["add"].add(threading.current_thread().name)
        return y + 1

    inputs = [{"x": torch.full((4, 4), float(i)), "id": i} for i in range(100)]
    out: list[torch.Tensor] = []
    flow = sf.Flow("f")
    (
        flow.source("n", inputs)
        .map("double", double, device="cuda:0")
        .map("add", add_one, device="cuda:0")
        .sink("o", sf.collect(out))
    )
    await flow.run()
    assert set(seen) == {("cuda:0", True, "cuda:0")}
    # a thread per GPU stage, so that one waiting for its event never holds up the other
    assert threads == {"double": {"streamflow-cuda:0/double"}, "add": {"streamflow-cuda:0/add"}}
    assert [float(y[0, 0]) for y in out] == [2.0 * i + 1 for i in range(100)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
async def test_a_class_stage_places_its_model_on_its_device() -> None:
    class Linear(sf.Stage[torch.Tensor, torch.Tensor]):
        def setup(self) -> None:
            torch.manual_seed(0)
            self.model = torch.nn.Linear(8, 3).to(self.device)

        def process(self, x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return self.model(x)

    xs = [torch.randn(1, 8) for _ in range(20)]
    out: list[torch.Tensor] = []
    flow = sf.Flow("f")
    flow.source("n", xs).map("model", Linear(), device="cuda:0").sink("o", sf.collect(out))
    await flow.run()
    torch.manual_seed(0)
    reference = torch.nn.Linear(8, 3)
    with torch.inference_mode():
        for x, y in zip(xs, out, strict=True):
            assert y.is_cuda
            assert torch.allclose(y.cpu(), reference(x), atol=1e-5)
