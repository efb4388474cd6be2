"""Layer splitting, profiling and stage planning for pipelined model parallelism."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from streamflow.parallel import (
    HandoffModel,
    LayerProfile,
    Plan,
    Profile,
    StagePlan,
    named_layers,
    plan,
    profile,
    split_layers,
)

# ---------------------------------------------------------------------------- models


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = x + self.fc2(torch.relu(self.fc1(x)))
        return y


class ResNetMLP(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.res = Residual(width)
        self.scale = nn.Parameter(torch.full((width,), 0.5))
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        if mask is not None:
            x = x * mask
        x = self.res(x) * self.scale
        x = x.view(x.size(0), -1)
        y: torch.Tensor = self.out(x)
        return y


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            y: torch.Tensor = self.fc(x)
            return y
        return x


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)
        y: torch.Tensor = self.head(out[0])
        return y


def run_parts(parts: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for part in parts:
        x = part(x)
    return x


def mlp(depth: int = 8, width: int = 256) -> nn.Sequential:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])


# ---------------------------------------------------------------------- split_layers


def test_split_nested_sequential_flattens_in_order() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.Sequential(nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh())),
        nn.Linear(8, 2),
    )
    pairs = named_layers(model)
    assert [name for name, _ in pairs] == ["0", "1.0", "1.1.0", "1.1.1", "2"]
    assert [type(m) for m in split_layers(model)] == [
        nn.Linear,
        nn.ReLU,
        nn.Linear,
        nn.Tanh,
        nn.Linear,
    ]
    x = torch.randn(5, 4)
    torch.testing.assert_close(run_parts(split_layers(model), x), model(x), atol=1e-6, rtol=0)


def test_split_list_of_modules() -> None:
    torch.manual_seed(0)
    mods = [nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2))]
    pairs = named_layers(mods)
    assert [name for name, _ in pairs] == ["0", "1.0", "1.1"]
    assert pairs[0][1] is mods[0]  # layers share the original modules and parameters
    assert len(split_layers(tuple(mods))) == 3


def test_split_fx_module_with_residual_block() -> None:
    torch.manual_seed(0)
    model = ResNetMLP()
    x = torch.randn(5, 8)
    pairs = named_layers(model)
    names = [name for name, _ in pairs]
    assert "res" in names  # the residual block has two live values inside: one segment
    assert len(pairs) >= 4
    parts = [m for _, m in pairs]
    torch.testing.assert_close(run_parts(parts, x), model(x), atol=1e-6, rtol=0)
    checked = [m for _, m in named_layers(model, x)]
    torch.testing.assert_close(run_parts(checked, x), model(x), atol=1e-6, rtol=0)


def test_split_with_example_never_cuts_at_a_non_tensor() -> None:
    torch.manual_seed(0)
    model = Recurrent()
    x = torch.randn(2, 5, 4)
    static = split_layers(model)
    checked = [m for _, m in named_layers(model, x)]
    assert len(checked) < len(static)  # the GRU's tuple output is not a cut point
    y = x
    for part in checked[:-1]:
        y = part(y)
        assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(run_parts(checked, x), model(x), atol=1e-6, rtol=0)


def test_split_untraceable_module_says_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"could not trace.*nn\.Sequential or pass a list"):
        split_layers(DataDependent())


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (TwoInputs(), ValueError, "takes 2 inputs"),
        ("not a model", TypeError, "expected an nn.Module"),
        ([nn.ReLU(), 3], TypeError, "item 1"),
        ([], ValueError, "empty"),
        (nn.Sequential(), ValueError, "empty"),
        (nn.ModuleList([nn.ReLU()]), TypeError, "has no forward"),
    ],
)
def test_split_rejects_what_it_cannot_split(
    bad: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        split_layers(bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- plan (DP)


def synthetic(
    forward_ms: list[float],
    *,
    devices: tuple[str, ...] = ("cpu:0", "cpu:1"),
    latency_ms: float = 0.0,
    ms_per_kb: float = 0.0,
    activation_bytes: list[int] | None = None,
    **extra: object,
) -> Profile:
    acts = activation_bytes or [1000] * len(forward_ms)
    return Profile(
        layers=[
            LayerProfile(f"l{i}", f / 1e3, 2 * f / 1e3, 100, a)
            for i, (f, a) in enumerate(zip(forward_ms, acts, strict=True))
        ],
        devices=devices,
        handoff=HandoffModel(latency_s=latency_ms / 1e3, s_per_byte=ms_per_kb / 1e6),
        **extra,  # type: ignore[arg-type]
    )


def test_plan_finds_balanced_split() -> None:
    prof = synthetic([1.0] * 8, devices=("cpu:0", "cpu:1", "cpu:2", "cpu:3"), latency_ms=0.01)
    assert plan(prof, ["cpu:0", "cpu:1"]).partition == [4, 4]
    four = plan(prof)
    assert four.partition == [2, 2, 2, 2]
    assert four.devices == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert four.predicted_throughput == pytest.approx(1 / 2.01e-3)
    assert four.predicted_latency_s == pytest.approx(8.03e-3)
    assert plan(synthetic([4.0, 1.0, 1.0, 1.0, 1.0])).partition == [1, 4]


def test_plan_merges_into_one_stage_when_handoff_is_expensive() -> None:
    prof = synthetic([1.0] * 4, devices=("cpu:0", "cpu:1", "cpu:2"), latency_ms=10.0)
    one = plan(prof)
    assert one.partition == [4]
    assert one.predicted_latency_s == pytest.approx(4e-3)
    # tiny layers: 8 x 10us of work; the stage after a cut also pays the handoff, so a cut
    # only pays off while the handoff costs less than the work it takes off the first stage
    assert plan(synthetic([0.01] * 8, latency_ms=0.1)).partition == [8]
    assert plan(synthetic([0.01] * 8, latency_ms=0.045)).partition == [6, 2]
    assert plan(synthetic([0.01] * 8, latency_ms=0.001)).partition == [4, 4]


def test_plan_prefers_fewer_stages_then_lower_latency() -> None:
    # layer 0 alone is the bottleneck (3 ms): 3 stages reach it, a 4th stage cannot help.
    # Of the 3-stage splits, cutting after layer 2 moves 5000 bytes (0.5 ms) and is worse.
    prof = synthetic(
        [3.0, 1.0, 1.0, 1.0],
        devices=("cpu:0", "cpu:1", "cpu:2", "cpu:3"),
        ms_per_kb=0.1,
        activation_bytes=[1000, 1000, 5000, 1000],
    )
    best = plan(prof)
    assert best.partition == [1, 1, 2]
    assert best.stages[2].transfer_in_s == pytest.approx(0.1e-3)
    assert best.bottleneck_s == pytest.approx(3e-3)


def test_plan_tolerance_trades_a_little_throughput_for_fewer_stages() -> None:
    prof = synthetic([1.0, 1.0, 1.0, 1.1], latency_ms=0.0)
    assert plan(prof).partition == [2, 2]
    assert plan(prof, tolerance=1.0).partition == [4]


def test_plan_latency_objective_uses_one_stage_on_the_fastest_device() -> None:
    link = HandoffModel(latency_s=1e-4, s_per_byte=0.0)
    prof = synthetic(
        [1.0] * 6,
        devices=("cpu:0", "cuda:0"),
        latency_ms=0.01,
        device_scale={"cpu": 1.0, "cuda:0": 0.1},
        links={"cpu->cuda:0": link, "cuda:0->cpu": link},
        input_bytes=4096,
    )
    fast = plan(prof, objective="latency")
    assert fast.devices == ["cuda:0"]
    assert fast.objective == "latency"
    assert fast.stages[0].transfer_in_s == pytest.approx(1e-4)  # the input copy to the GPU
    assert fast.predicted_latency_s == pytest.approx(0.6e-3 + 1e-4)
    assert plan(synthetic([1.0] * 6, latency_ms=0.01), objective="latency").partition == [6]


def brute_force(prof: Profile) -> tuple[float, int, float, float]:
    """(best bottleneck, then fewest stages, lowest latency; best latency) by enumeration."""
    n, devs = len(prof.layers), list(prof.devices)
    options = []
    for k in range(1, min(n, len(devs)) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = [0, *cuts, n]
            for chosen in itertools.combinations(devs, k):
                times = []
                for i, dev in enumerate(chosen):
                    start, end = bounds[i], bounds[i + 1]
                    compute = sum(x.forward_s for x in prof.layers[start:end])
                    transfer = (
                        prof.input_transfer_s(dev)
                        if i == 0
                        else prof.transfer_s(
                            prof.layers[start - 1].activation_bytes, chosen[i - 1], dev
                        )
                    )
                    times.append(compute * prof.compute_scale(dev) + transfer)
                options.append((max(times), k, sum(times)))
    best = min(o[0] for o in options)
    k, lat = min((o[1], o[2]) for o in options if o[0] <= best * (1 + 1e-9))
    return best, k, lat, min(o[2] for o in options)


@pytest.mark.parametrize("seed", range(12))
def test_plan_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    link = HandoffModel(latency_s=rng.uniform(0, 2e-3), s_per_byte=rng.uniform(0, 1e-6))
    prof = synthetic(
        [rng.uniform(0.1, 3.0) for _ in range(n)],
        devices=("cpu:0", "cuda:0", "cpu:1", "cuda:1")[: rng.randint(1, 4)],
        latency_ms=rng.uniform(0, 1.5),
        ms_per_kb=rng.uniform(0, 0.5),
        activation_bytes=[rng.randint(0, 4000) for _ in range(n)],
        device_scale={"cpu": 1.0, "cuda:0": rng.uniform(0.1, 2), "cuda:1": rng.uniform(0.1, 2)},
        links={
            f"{a}->{b}": link
            for a in ("cpu", "cuda:0", "cuda:1")
            for b in ("cpu", "cuda:0", "cuda:1")
            if a != b
        },
        input_bytes=rng.randint(0, 4000),
    )
    best, k, lat, best_lat = brute_force(prof)
    fast = plan(prof)
    assert fast.bottleneck_s == pytest.approx(best, rel=1e-9)
    assert len(fast.stages) == k
    assert fast.predicted_latency_s == pytest.approx(lat, rel=1e-9)
    assert plan(prof, objective="latency").predicted_latency_s == pytest.approx(best_lat, rel=1e-9)


def test_plan_explicit_partition() -> None:
    prof = synthetic([1.0] * 8)
    fixed = plan(prof, partition=[3, 5])
    assert fixed.partition == [3, 5]
    assert [(s.layer_start, s.layer_end) for s in fixed.stages] == [(0, 3), (3, 8)]
    assert fixed.stages[1].layer_names == ("l3", "l4", "l5", "l6", "l7")
    assert plan(prof, partition=fixed.partition) == fixed


@pytest.mark.parametrize(
    ("partition", "message"),
    [
        ([3, 4], "covers 7 layers but the profile has 8"),
        ([4, 0, 4], "positive ints"),
        ([9, -1], "positive ints"),
        ([4.0, 4.0], "positive ints"),
        ([], "non-empty"),
        ([2, 2, 4], "3 stages but only 2 devices"),
    ],
)
def test_plan_explicit_partition_errors(partition: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(synthetic([1.0] * 8), partition=partition)


def test_plan_rejects_bad_arguments() -> None:
    prof = synthetic([1.0] * 4)
    with pytest.raises(ValueError, match="objective"):
        plan(prof, objective="speed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad device name"):
        plan(prof, ["gpu0"])
    with pytest.raises(TypeError, match="list of names"):
        plan(prof, "cpu:0")
    with pytest.raises(ValueError, match="not profiled"):
        plan(synthetic([1.0], device_scale={"cpu": 1.0}), ["cpu:0", "cuda:1"])


# ------------------------------------------------------------------ plan objects


def test_plan_json_round_trip(tmp_path: Path) -> None:
    prof = synthetic([1.0, 2.0, 3.0, 1.5], latency_ms=0.02, ms_per_kb=0.01)
    original = plan(prof)
    assert Plan.from_json(original.to_json()) == original
    original.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == original
    assert Profile.from_json(prof.to_json()) == prof
    with pytest.raises(ValueError, match=r"streamflow\.plan"):
        Plan.from_json(prof.to_json())


def test_plan_str_is_a_readable_table() -> None:
    text = str(plan(synthetic([1.0] * 8, latency_ms=0.01)))
    lines = text.splitlines()
    assert "cpu:0" in text and "cpu:1" in text
    assert "throughput" in text and "latency" in text
    assert "0-3 (4)" in text and "4-7 (4)" in text
    assert len(lines) == 4  # header, two stages, summary


def test_stage_plan_validates_its_range() -> None:
    with pytest.raises(ValueError, match="layer range"):
        StagePlan("cpu:0", 2, 2, [], 0.0, 0.0, 0)


# ------------------------------------------------------------------------- profile


def test_profile_real_mlp_is_positive_finite_and_repeatable() -> None:
    torch.manual_seed(0)
    model = mlp(depth=8, width=256)
    x = torch.randn(128, 256)
    threads = torch.get_num_threads()
    first = profile(model, x, ["cpu:0", "cpu:1"], warmup=3, repeats=7)
    second = profile(model, x, ["cpu:0", "cpu:1"], warmup=3, repeats=7)
    assert torch.get_num_threads() == threads
    assert all(p.grad is None for p in model.parameters())
    assert len(first.layers) == 16
    assert first.layers[0].name == "0.0"
    assert first.layers[0].param_bytes == (256 * 256 + 256) * 4
    assert all(layer.activation_bytes == 128 * 256 * 4 for layer in first.layers)
    for layer in first.layers:
        assert math.isfinite(layer.forward_s) and layer.forward_s > 0
        assert math.isfinite(layer.backward_s) and layer.backward_s > 0
    assert first.handoff.latency_s > 0 and first.handoff.s_per_byte > 0
    assert first.transfer_s(1 << 20, "cpu:0", "cpu:1") > first.handoff.latency_s
    assert first.transfer_s(1 << 20, "cpu:0", "cpu:0") == 0
    assert first.batch_size == 128 and first.input_bytes == 128 * 256 * 4
    total = [sum(layer.forward_s for layer in p.layers) for p in (first, second)]
    assert 0.5 < total[0] / total[1] < 2.0
    assert Profile.from_json(first.to_json()) == first
    chosen = plan(first)
    assert sum(chosen.partition) == 16 and chosen.predicted_throughput > 0


def test_profile_times_a_hooked_layer_with_its_hooks() -> None:
    """Parts call a layer with hooks through ``__call__``, so the profile must time it that
    way: every timed run of the chain (without autograd) runs the hook."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: list[bool] = []
    model[2].register_forward_hook(lambda module, args, out: calls.append(out.requires_grad))
    profile(model, torch.randn(1, 4), ["cpu:0"], warmup=2, repeats=5)
    assert calls.count(False) >= 2 + 5  # one more: the run that checks the example fits


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.act(self.norm(self.fc(x)))
        return y


def test_profile_restores_buffers_and_handles_in_place_layers() -> None:
    model = Normed().train()
    stats, count = model.norm.running_mean, model.norm.num_batches_tracked
    assert stats is not None and count is not None
    before = stats.clone()
    prof = profile(model, torch.randn(16, 4) + 3.0, ["cpu:0"], warmup=1, repeats=3)
    torch.testing.assert_close(stats, before)
    assert count.item() == 0
    assert [layer.name for layer in prof.layers] == ["fc", "norm", "act"]
    assert all(layer.backward_s > 0 for layer in prof.layers)


def test_profile_rejects_bad_input() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="tensor"):
        profile(model, [1.0, 2.0], ["cpu:0"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeats"):
        profile(model, torch.randn(2, 4), ["cpu:0"], repeats=0)
    with pytest.raises(ValueError, match=r"does not run through layer 0 \(Linear\) on cpu:0"):
        profile(model, torch.randn(2, 5), ["cpu:0"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            profile(model, torch.randn(2, 4), ["cpu:0", "cuda:0"])
