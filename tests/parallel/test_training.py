"""Online training over the pipeline: each schedule against a hand or sequential reference."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

import streamflow as sf
from streamflow.testing import MemorySource

pytestmark = pytest.mark.asyncio

CPUS = [f"cpu:{i}" for i in range(4)]
mse = nn.functional.mse_loss


class Recorder(torch.optim.SGD):
    """SGD that logs the gradients it applies and the weights after each step."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.1, momentum: float = 0.0):
        super().__init__(params, lr=lr, momentum=momentum)
        self.grads: list[list[torch.Tensor]] = []
        self.weights: list[list[torch.Tensor]] = []

    def step(self, closure: Any = None) -> Any:
        params = self.param_groups[0]["params"]
        self.grads.append([p.grad.detach().clone() for p in params])
        result = super().step(closure)
        self.weights.append([p.detach().clone() for p in params])
        return result


def recorders(log: list[Recorder], **kwargs: Any) -> Callable[[list[nn.Parameter]], Recorder]:
    def make(params: list[nn.Parameter]) -> Recorder:
        log.append(Recorder(params, **kwargs))
        return log[-1]

    return make


async def train(trainer: sf.OnlineTrainer, pairs: list[Any]) -> list[torch.Tensor]:
    preds: list[torch.Tensor] = []
    flow = sf.Flow("train")
    flow.source("labelled", sf.iterate(pairs)).map("learn", trainer).sink(
        "preds", sf.collect(preds)
    )
    await flow.run()
    return preds


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    )


# -- sync ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("partition", "microbatches"), [([5], 1), ([2, 3], 1), ([2, 3], 3), ([1, 2, 2], 4)]
)
async def test_sync_equals_sequential_minibatch_training(
    partition: list[int], microbatches: int
) -> None:
    torch.manual_seed(1)
    rows = [1, 2, 1, 3, 1, 1, 2, 1, 1, 2, 1]  # 11 items: the last mini-batch is partial
    pairs = [(torch.randn(r, 6), torch.randint(0, 3, (r,))) for r in rows]
    log: list[Recorder] = []
    trainer = sf.OnlineTrainer(
        small_mlp(),
        CPUS[: len(partition)],
        loss_fn=nn.functional.cross_entropy,
        optimizer=recorders(log, momentum=0.9),
        schedule="sync",
        microbatches=microbatches,
        partition=partition,
    )
    preds = await train(trainer, pairs)

    ref = small_mlp()
    opt = Recorder(ref.parameters(), momentum=0.9)
    want_preds: list[torch.Tensor] = []
    for start in range(0, len(pairs), microbatches):
        batch = pairs[start : start + microbatches]
        outs = [ref(x) for x, _ in batch]
        want_preds += [o.detach() for o in outs]
        loss = nn.functional.cross_entropy(torch.cat(outs), torch.cat([y for _, y in batch]))
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()

    steps = -(-len(pairs) // microbatches)
    assert all(len(r.grads) == steps for r in log)
    for t in range(steps):
        got_grads = [g for r in log for g in r.grads[t]]
        got_weights = [w for r in log for w in r.weights[t]]
        assert all(map(close, got_grads, opt.grads[t])), f"gradients differ at step {t}"
        assert all(map(close, got_weights, opt.weights[t])), f"weights differ at step {t}"
    assert all(map(close, preds, want_preds))  # predicted before learning from the label
    m = trainer.metrics()
    assert m.updates == (steps,) * len(partition)
    assert m.staleness == m.staleness_bound == (0,) * len(partition)
    assert m.samples == sum(rows) and m.items == len(rows)


# -- partime ---------------------------------------------------------------------------


def linear_chain(stages: int, seed: int = 3) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(2, 2, bias=False) for _ in range(stages)]


async def test_partime_every_part_learns_with_the_hand_computed_delayed_gradient() -> None:
    """A chain of three 2x2 linear maps, one per part, learning y from x by MSE.

    By hand: part s at its tick j applies the gradient of sample i = j - 2(S-1-s): the
    gradient of its output (sent back by part s + 1 when it back-propagated i, with its
    weights before that tick's step) times the input it saw when it forwarded i.
    """
    stages, lr, n = 3, 0.1, 14
    torch.manual_seed(4)
    pairs = [(torch.randn(1, 2), torch.randn(1, 2)) for _ in range(n)]
    log: list[Recorder] = []
    layers = linear_chain(stages)
    initial = [layer.weight.detach().clone() for layer in layers]
    trainer = sf.OnlineTrainer(
        layers,
        CPUS[:stages],
        loss_fn=mse,
        optimizer=recorders(log, lr=lr),
        schedule="partime",
        partition=[1] * stages,
    )
    preds = await train(trainer, pairs)

    last = stages - 1
    delay = [2 * (last - s) for s in range(stages)]
    weights = [[w] for w in initial]  # weights[s][j]: part s before its tick j
    inputs: list[list[torch.Tensor]] = [[] for _ in range(stages)]
    outputs: list[torch.Tensor] = []
    cotangent: dict[tuple[int, int], torch.Tensor] = {}  # (part, sample) -> d loss / d output
    applied: list[list[torch.Tensor]] = [[] for _ in range(stages)]
    for j, (x, y) in enumerate(pairs):
        a = x
        for s in range(stages):  # forwards of sample j, each part before its tick-j step
            inputs[s].append(a)
            a = a @ weights[s][j].T
        outputs.append(a)
        cotangent[last, j] = 2 * (a - y) / a.numel()
        for s in reversed(range(stages)):
            i = j - delay[s]
            w = weights[s][j]
            if i < 0:
                weights[s].append(w)
                continue
            g = cotangent[s, i]
            if s > 0:
                cotangent[s - 1, i] = g @ w  # the input gradient, with this tick's weights
            grad = g.T @ inputs[s][i]
            applied[s].append(grad)
            weights[s].append(w - lr * grad)

    assert all(close(p, o) for p, o in zip(preds, outputs, strict=True))
    for s in range(stages):
        assert len(log[s].grads) == n - delay[s] > 0
        assert all(close(g[0], want) for g, want in zip(log[s].grads, applied[s], strict=True))
        assert close(layers[s].weight, weights[s][n])
        assert not close(layers[s].weight, initial[s]), f"part {s} did not learn"
    m = trainer.metrics()
    assert m.updates == tuple(n - d for d in delay)
    assert m.staleness == m.staleness_bound == tuple(delay)
    # part s holds the activations of 2(S-1-s) + 1 forwards at most
    per_forward = 2 * 4 * 2  # input and output, 2 floats each
    assert m.activation_bytes[0] <= (delay[0] + 1) * per_forward


async def test_partime_delays_are_the_same_on_every_run() -> None:
    torch.manual_seed(5)
    pairs = [(torch.randn(2, 6), torch.randint(0, 3, (2,))) for _ in range(40)]
    results = []
    for _ in range(2):
        trainer = sf.OnlineTrainer(
            small_mlp(),
            CPUS[:3],
            loss_fn=nn.functional.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            schedule="partime",
            partition=[2, 2, 1],
        )
        await train(trainer, pairs)
        results.append(trainer.model().state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


# -- nf1b ------------------------------------------------------------------------------


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 4])
async def test_nf1b_weight_version_gap_follows_the_paper(stages: int, microbatches: int) -> None:
    torch.manual_seed(6)
    pairs = [(torch.randn(1, 2), torch.randn(1, 2)) for _ in range(6 * (stages + microbatches))]
    trainer = sf.OnlineTrainer(
        linear_chain(stages),
        CPUS[:stages],
        loss_fn=mse,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        schedule="nf1b",
        microbatches=microbatches,
        partition=[1] * stages,
    )
    await train(trainer, pairs)
    m = trainer.metrics()
    assert m.staleness[0] == (stages + microbatches - 2) // microbatches  # v in the paper
    assert m.staleness == m.staleness_bound
    assert m.staleness_bound == tuple(
        (stages + microbatches - 2 - s) // microbatches for s in range(stages)
    )
    assert m.updates == (-(-len(pairs) // microbatches),) * stages


async def test_nf1b_backward_uses_the_latest_weights_no_stash() -> None:
    """Part 0 = two linear maps A, B; part 1 = C; two micro-batches per mini-batch.

    By hand: micro-batch k's forward on part s sees the updates of the mini-batches that
    finished before its tick (``seen`` below); the backward of mini-batch b on part s runs
    after b updates, on those latest weights, through the activations of the forwards. A
    stashed weight version (the forward's B) would give another update: the test tells
    the two apart.
    """
    lr, mb, stages, n = 0.2, 2, 2, 12
    torch.manual_seed(7)
    pairs = [(torch.randn(1, 2), torch.randn(1, 2)) for _ in range(n)]
    torch.manual_seed(8)
    a_layer, b_layer, c_layer = (nn.Linear(2, 2, bias=False) for _ in range(3))
    start = [m.weight.detach().clone() for m in (a_layer, b_layer, c_layer)]
    trainer = sf.OnlineTrainer(
        [a_layer, b_layer, c_layer],
        CPUS[:2],
        loss_fn=mse,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        schedule="nf1b",
        microbatches=mb,
        partition=[2, 1],
    )
    preds = await train(trainer, pairs)

    def seen(k: int, s: int) -> int:
        return max(0, -(-(k + s - mb - stages + 2) // mb))

    def simulate(stash: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        a_w, b_w, c_w = ([w] for w in start)  # versions: x_w[v] after v updates
        outs = []
        for b in range(n // mb):
            ks = range(b * mb, (b + 1) * mb)
            fwd = {}
            for k in ks:
                x, y = pairs[k]
                v0, v1 = seen(k, 0), seen(k, 1)
                h1 = x @ a_w[v0].T
                h2 = h1 @ b_w[v0].T
                out = h2 @ c_w[v1].T
                fwd[k] = (x, y, h1, h2, out, v0)
                outs.append(out)
            d_a = d_b = d_c = torch.zeros(2, 2)
            for k in ks:
                x, y, h1, h2, out, v0 = fwd[k]
                g = 2 * (out - y) / out.numel() / mb  # mean of the micro-batch losses
                d_c = d_c + g.T @ h2
                g2 = g @ c_w[b]
                d_b = d_b + g2.T @ h1
                g1 = g2 @ (b_w[v0] if stash else b_w[b])
                d_a = d_a + g1.T @ x
            a_w.append(a_w[b] - lr * d_a)
            b_w.append(b_w[b] - lr * d_b)
            c_w.append(c_w[b] - lr * d_c)
        return outs, [a_w[-1], b_w[-1], c_w[-1]]

    outs, latest = simulate(stash=False)
    _, stashed = simulate(stash=True)
    assert all(close(p, o) for p, o in zip(preds, outs, strict=True))
    for layer, want in zip((a_layer, b_layer, c_layer), latest, strict=True):
        assert close(layer.weight, want)
    assert not close(a_layer.weight, stashed[0])  # a stashed B would have been visible
    m = trainer.metrics()
    assert m.staleness == (1, 0)


# -- the trainer as a whole ------------------------------------------------------------


async def test_model_state_dict_and_a_second_run_continue_training(tmp_path: Path) -> None:
    torch.manual_seed(9)
    pairs = [(torch.randn(1, 6), torch.randint(0, 3, (1,))) for _ in range(30)]

    def make() -> sf.OnlineTrainer:
        return sf.OnlineTrainer(
            small_mlp(),
            CPUS[:2],
            loss_fn=nn.functional.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            schedule="nf1b",
            microbatches=2,
            partition=[2, 3],
        )

    trainer = make()
    await train(trainer, pairs)
    model = trainer.model()
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert close(model(x), trainer(x))
    torch.save(trainer.state_dict(), tmp_path / "trainer.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")

    restored = make()
    restored.load_state_dict(torch.load(tmp_path / "trainer.pt"))
    weights_only = make()
    weights_only.load_state_dict(torch.load(tmp_path / "model.pt"))
    with torch.no_grad():
        assert close(restored(x), trainer(x)) and close(weights_only(x), trainer(x))
    await train(trainer, pairs)  # the momentum carries over into the next run
    await train(restored, pairs)
    with torch.no_grad():
        assert close(restored(x), trainer(x))
    assert trainer.metrics().items == 60


async def test_flow_metrics_show_the_parts_and_one_flow_at_a_time() -> None:
    pairs = [(torch.randn(1, 6), torch.randint(0, 3, (1,))) for _ in range(20)]
    trainer = sf.OnlineTrainer(
        small_mlp(),
        CPUS[:2],
        loss_fn=nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        schedule="partime",
        partition=[2, 3],
    )
    flow = sf.Flow("f")
    flow.source("labelled", pairs).map("learn", trainer).sink("out", sf.collect())
    await flow.run()
    metrics = flow.metrics()
    assert metrics["learn[0]"].items_out == metrics["learn[1]"].items_out == 20
    m = trainer.metrics()
    assert m.loss is not None and m.accuracy is not None and m.samples == 20

    endless = MemorySource(pairs, forever=True)
    first, second = sf.Flow("a"), sf.Flow("b")
    first.source("labelled", endless).map("learn", trainer).sink("out", sf.collect())
    second.source("labelled", pairs).map("learn", trainer).sink("out", sf.collect())
    async with first.start() as running:
        while endless.taken < 30:
            await asyncio.sleep(0.001)
        with pytest.raises(sf.StageError, match="already runs in a flow"):
            await second.run()
        await running.stop(drain=True)
    assert trainer.metrics().items == 20 + endless.taken  # every item taken was learnt


async def test_errors_name_the_part() -> None:
    def picky(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.item() == 2:
            raise ValueError("no twos")
        return nn.functional.cross_entropy(out, y)

    trainer = sf.OnlineTrainer(
        small_mlp(),
        CPUS[:2],
        loss_fn=picky,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        schedule="sync",
        microbatches=2,
        partition=[2, 3],
    )
    pairs = [(torch.randn(1, 6), torch.tensor([y])) for y in (0, 1, 2, 0, 1)]
    with pytest.raises(sf.StageError) as info:
        await train(trainer, pairs)
    assert "learn[1] (layers 2..4 on cpu:1): ValueError: no twos" in str(info.value)

    with pytest.raises(sf.StageError, match=r"\(x, y\) pairs"):
        await train(trainer, [torch.randn(1, 6)])


async def test_bad_options() -> None:
    def make(**kwargs: Any) -> sf.OnlineTrainer:
        options: dict[str, Any] = {
            "loss_fn": mse,
            "optimizer": lambda p: torch.optim.SGD(p, lr=0.1),
            "partition": [2, 3],
        }
        return sf.OnlineTrainer(small_mlp(), CPUS[:2], **(options | kwargs))

    with pytest.raises(ValueError, match="schedule must be one of"):
        make(schedule="gpipe")
    with pytest.raises(ValueError, match="microbatches"):
        make(microbatches=0)
    with pytest.raises(ValueError, match="covers 4 layers"):
        make(partition=[2, 2])
    with pytest.raises(ValueError, match="example="):
        make(partition="auto")
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="share a parameter"):
        sf.OnlineTrainer(
            [shared, nn.ReLU(), shared],
            CPUS[:2],
            loss_fn=mse,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            partition=[1, 2],
        )


async def test_auto_partition_and_a_part_without_weights() -> None:
    torch.manual_seed(10)
    pairs = [(torch.randn(1, 6), torch.randint(0, 3, (1,))) for _ in range(12)]
    auto = sf.OnlineTrainer(
        small_mlp(),
        CPUS[:2],
        torch.randn(1, 6),
        loss_fn=nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        schedule="nf1b",
    )
    assert 1 <= len(auto.plan.stages) <= 2
    await train(auto, pairs)
    bare = sf.OnlineTrainer(
        small_mlp(),
        CPUS[:4],
        loss_fn=nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        schedule="partime",
        partition=[1, 2, 1, 1],  # part 2 is a lone Tanh
    )
    await train(bare, pairs)
    assert bare.parts[2].optimizer is None
    assert bare.metrics().updates == (6, 8, 10, 12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_a_failed_setup_leaves_no_thread_behind() -> None:
    trainer = sf.OnlineTrainer(
        small_mlp(),
        ["cpu:0", "cuda:0"],
        loss_fn=nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        partition=[2, 3],
    )
    pairs = [(torch.randn(1, 6), torch.randint(0, 3, (1,)))]
    for _ in range(2):  # the second run fails the same way: the trainer was released
        with pytest.raises(sf.StageError, match="failed in setup"):
            await train(trainer, pairs)
    assert not [t for t in threading.enumerate() if t.name.startswith("streamflow-")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("devices", [["cuda:0", "cpu:0"], ["cpu:0", "cuda:0"]])
@pytest.mark.parametrize("schedule", ["sync", "partime", "nf1b"])
async def test_parts_on_different_devices_learn_as_on_one(
    devices: list[str], schedule: Literal["sync", "partime", "nf1b"]
) -> None:
    """Activations go down and gradients come back up across devices; every schedule is
    deterministic, so the weights match a run on two CPU workers."""
    torch.manual_seed(1)
    pairs = [(torch.randn(1, 6), torch.randint(0, 3, (1,))) for _ in range(12)]

    def trainer(on: list[str]) -> sf.OnlineTrainer:
        return sf.OnlineTrainer(
            small_mlp(),
            on,
            loss_fn=nn.functional.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            schedule=schedule,
            microbatches=2,
            partition=[2, 3],
        )

    mixed, cpus = trainer(devices), trainer(["cpu:0", "cpu:1"])
    await train(mixed, pairs)
    await train(cpus, pairs)
    assert mixed.metrics().updates == cpus.metrics().updates
    got, want = mixed.model().state_dict(), cpus.model().state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-4) for k in want)


async def test_a_trainer_restarted_from_its_state_dict_carries_on_as_if_never_stopped() -> None:
    """Train on the first half, save, build a new trainer, load, train on the second half:
    weights, updates and prequential counters equal one uninterrupted run's."""
    torch.manual_seed(3)
    pairs = [(torch.randn(1, 6), torch.randint(0, 3, (1,))) for _ in range(40)]

    def make() -> sf.OnlineTrainer:
        return sf.OnlineTrainer(
            small_mlp(),
            CPUS[:2],
            loss_fn=nn.functional.cross_entropy,
            optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
            schedule="sync",
            partition=[2, 3],
        )

    whole = make()
    await train(whole, pairs)
    first = make()
    await train(first, pairs[:20])
    saved = first.state_dict()
    second = make()
    second.load_state_dict(saved)
    await train(second, pairs[20:])
    for a, b in zip(whole.model().parameters(), second.model().parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    m_whole, m_second = whole.metrics(), second.metrics()
    assert m_second.updates == m_whole.updates
    assert (m_second.samples, m_second.items) == (m_whole.samples, m_whole.items) == (40, 40)
    assert m_second.accuracy == m_whole.accuracy and m_second.loss == m_whole.loss
