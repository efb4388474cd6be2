"""The plan chooser behind sf.pipeline() and OnlineTrainer: canonical cuts, the measured
trial between plans predicted within noise, explicit partitions, provenance and JSON."""

import json
import math
import time

import pytest
import torch
from torch import nn

import streamflow as sf
from streamflow.parallel import (
    HandoffModel,
    LayerProfile,
    Objective,
    Pipeline,
    Plan,
    Profile,
    plan,
    profile,
)
from streamflow.parallel._choose import (
    _challenge,
    _incumbent_first,
    canonical_cuts,
    choose_auto,
)
from streamflow.parallel._plan import plan_within

CPUS = ["cpu:0", "cpu:1"]


class Sleep(nn.Module):
    """A layer that takes ``seconds`` without holding the GIL or a core: two of them on two
    threads overlap completely, one after the other they do not."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x + 1


def crafted(
    forward_ms: list[float], *, latency_ms: float, contention: float = 1.0, **extra: object
) -> Profile:
    return Profile(
        layers=[LayerProfile(f"l{i}", f / 1e3, 0.0, 0, 64) for i, f in enumerate(forward_ms)],
        devices=tuple(CPUS),
        handoff=HandoffModel(latency_s=latency_ms / 1e3, s_per_byte=0.0),
        contention=contention,
        **extra,  # type: ignore[arg-type]
    )


def choose(
    prof: Profile,
    layers: list[tuple[str, nn.Module]],
    devices: list[str],
    example: torch.Tensor,
    objective: Objective = "throughput",
) -> Plan:
    """The auto choice, its trial running each candidate as ``sf.pipeline`` would."""
    modules = [m for _, m in layers]
    return choose_auto(
        prof, layers, devices, example, objective, build=lambda p: Pipeline(modules, p)
    )


def notes(p: Plan) -> dict[str, str]:
    return dict(p.provenance)


def nested() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 4))


# ----------------------------------------------------------------- the measured trial


@pytest.mark.asyncio
async def test_a_predicted_tie_goes_to_the_candidate_the_trial_measures_faster() -> None:
    """Crafted costs make one stage and two stages tie exactly (1 + 1 ms alone, or 1 ms
    then a 1 ms hand-off plus 1 ms), so the prediction alone takes the single stage. Really
    each layer sleeps 2 ms: split over two threads they overlap, twice the throughput, and
    the trial on the device threads must see that."""
    layers = [("a", Sleep(0.002)), ("b", Sleep(0.002))]
    prof = crafted([1.0, 1.0], latency_ms=1.0)
    assert plan(prof).partition == [2]  # the tie: fewer stages
    chosen = choose(prof, layers, CPUS, torch.zeros(1, 4))
    assert chosen.partition == [1, 1]
    assert chosen.devices == CPUS
    how = notes(chosen)["chosen by"]
    assert how.startswith("a measured trial of 2 candidates")
    assert "[1, 1]" in how and "[2]" in how


@pytest.mark.asyncio
async def test_no_trial_when_no_other_plan_is_predicted_close() -> None:
    layers = [("a", Sleep(0.0)), ("b", Sleep(0.0))]
    prof = crafted([1.0, 1.0], latency_ms=0.0)  # split: 1 ms, alone: 2 ms
    chosen = choose(prof, layers, CPUS, torch.zeros(1, 4))
    assert chosen.partition == [1, 1]
    assert notes(chosen)["chosen by"].startswith("prediction (no other plan within ")


@pytest.mark.asyncio
async def test_the_latency_objective_is_decided_by_prediction() -> None:
    layers = [("a", Sleep(0.0)), ("b", Sleep(0.0))]
    prof = crafted([1.0, 1.0], latency_ms=1.0)
    chosen = choose(prof, layers, CPUS, torch.zeros(1, 4), "latency")
    assert chosen.partition == [2] and chosen.objective == "latency"
    assert notes(chosen)["chosen by"].startswith("prediction")


@pytest.mark.asyncio
async def test_the_trial_restores_training_flags_and_buffers() -> None:
    norm = nn.BatchNorm1d(4)
    layers = [("a", Sleep(0.001)), ("n", norm), ("b", Sleep(0.001))]
    model = nn.Sequential(*[m for _, m in layers]).train()
    before = norm.running_mean.clone() if norm.running_mean is not None else None
    prof = crafted([1.0, 0.5, 1.0], latency_ms=1.5)  # [3] and [2, 1] tie at 2.5 ms
    chosen = choose(prof, layers, CPUS, torch.randn(3, 4))
    assert notes(chosen)["chosen by"].startswith("a measured trial")
    assert all(m.training for m in model.modules())
    assert before is not None and norm.running_mean is not None
    torch.testing.assert_close(norm.running_mean, before)


def test_only_a_clear_measured_gain_overturns_the_incumbent_and_layout_decides_the_rest() -> None:
    """Candidate 0 is the incumbent; the trial's rates (samples/s) may overturn it only by
    more than 12%; challengers measured within 12% of each other go by layout: fewest stages,
    then the earliest cuts."""
    prof = crafted([1.0, 1.0, 1.0, 0.1], latency_ms=0.0)
    alone = plan(prof, ["cpu:0"], partition=[4])
    even, early, late = (plan(prof, partition=p) for p in ([2, 2], [1, 3], [3, 1]))
    assert _challenge([alone, even], [1000.0, 1070.0]) == 0  # 7% faster: within noise
    assert _challenge([alone, even], [1000.0, 1000.0]) == 0
    assert _challenge([alone, even, late], [1000.0, 1200.0, 1300.0]) == 1  # alike: [2, 2] first
    assert _challenge([alone, late, even], [1000.0, 1300.0, 1200.0]) == 2  # whatever the order
    assert _challenge([alone, even, early], [1000.0, 1500.0, 1200.0]) == 1  # clearly fastest
    assert _challenge([even, alone, early], [1000.0, 500.0, 990.0]) == 0
    # [1, 3] is predicted within 8% of [2, 2] (2.1 ms against 2): the earlier cuts; alone: 3.1
    assert _incumbent_first([even, early, alone], "throughput")[0] is early
    assert _incumbent_first([even, late, alone], "throughput")[0] is even


# ------------------------------------------------------------------- canonical cuts


def test_a_cheap_elementwise_layer_stays_with_the_layer_before_it() -> None:
    modules: list[nn.Module] = [
        nn.Linear(4, 4),  # 0
        nn.ReLU(),  # 1: cheap
        nn.Linear(4, 4),  # 2
        nn.ReLU(),  # 3: cheap
        nn.Dropout(),  # 4: cheap
        nn.MaxPool1d(1),  # 5: no parameters, but a pooling can cost a lot: not cheap
        nn.PReLU(),  # 6: has a parameter: not cheap
        nn.Tanh(),  # 7: element-wise but slow here (over 5% of the time): not cheap
        nn.Linear(4, 4),  # 8
    ]
    ms = [1.0, 0.001, 1.0, 0.001, 0.001, 0.001, 0.001, 1.0, 1.0]
    prof = Profile(
        layers=[LayerProfile(f"l{i}", f / 1e3, 0.0, 0, 64) for i, f in enumerate(ms)],
        devices=tuple(CPUS),
        handoff=HandoffModel(latency_s=0.0, s_per_byte=0.0),
    )
    # cut 1 (before the first ReLU) goes, so do 3 and 4 (before the ReLU and the dropout)
    assert canonical_cuts(prof, modules) == [2, 5, 6, 7, 8]


def test_plan_within_restricts_the_cut_points_and_plan_stays_pure() -> None:
    prof = crafted([1.0] * 6, latency_ms=0.0)
    assert plan(prof).partition == [3, 3]
    assert plan_within(prof, cuts=[2, 5]).partition == [2, 4]
    assert plan_within(prof, cuts=[]).partition == [6]
    assert plan(prof) == plan(prof)


@pytest.mark.asyncio
async def test_many_devices_fall_back_to_the_best_plans_neighbours() -> None:
    """31 layers on 4 workers: too many splits to enumerate one by one; the candidates are
    the best split's neighbours (each cut moved by one), never a single stage here."""
    devices = [f"cpu:{i}" for i in range(4)]
    layers = [(f"l{i}", Sleep(0.0)) for i in range(31)]
    prof = Profile(
        layers=[LayerProfile(f"l{i}", 1e-3, 0.0, 0, 64) for i in range(31)],
        devices=tuple(devices),
        handoff=HandoffModel(latency_s=0.0, s_per_byte=0.0),
    )
    chosen = choose(prof, layers, devices, torch.zeros(1, 4))
    assert len(chosen.stages) == 4 and sum(chosen.partition) == 31
    assert chosen.bottleneck_s <= plan(prof).bottleneck_s * 1.15


# ------------------------------------------------- explicit partitions, names, costs


@pytest.mark.asyncio
async def test_explicit_partitions_keep_the_model_names_and_get_profiled_costs() -> None:
    x = torch.randn(1, 8)
    want = plan(profile(nested(), x, CPUS), partition=[2, 1])
    assert [s.layer_names for s in want.stages] == [("0.0", "0.1"), ("1",)]
    pipe = sf.pipeline(nested(), CPUS, x, partition=[2, 1])
    trainer = sf.OnlineTrainer(
        nested(),
        CPUS,
        x,
        loss_fn=nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        partition=[2, 1],
    )
    for chosen in (pipe.plan, trainer.plan):
        assert [s.layer_names for s in chosen.stages] == [("0.0", "0.1"), ("1",)]
        assert chosen.partition == [2, 1]
        assert all(math.isfinite(s.compute_s) and s.compute_s > 0 for s in chosen.stages)
        assert math.isfinite(chosen.predicted_throughput)
        assert notes(chosen)["chosen by"] == "the explicit partition [2, 1]"
        assert "in-chain runs" in notes(chosen)["layer times"]


@pytest.mark.asyncio
async def test_auto_plans_keep_the_model_names_in_pipeline_and_trainer() -> None:
    x = torch.randn(1, 8)
    pipe = sf.pipeline(nested(), CPUS, x)
    trainer = sf.OnlineTrainer(
        nested(),
        CPUS,
        x,
        loss_fn=nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    for chosen in (pipe.plan, trainer.plan):
        assert [n for s in chosen.stages for n in s.layer_names] == ["0.0", "0.1", "1"]
        assert "chosen by" in notes(chosen)


@pytest.mark.asyncio
async def test_an_explicit_partition_without_example_is_not_profiled_in_either() -> None:
    pipe = sf.pipeline(nested(), CPUS, partition=[2, 1])
    trainer = sf.OnlineTrainer(
        nested(),
        CPUS,
        loss_fn=nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        partition=[2, 1],
    )
    for chosen in (pipe.plan, trainer.plan):
        assert [s.layer_names for s in chosen.stages] == [("0.0", "0.1"), ("1",)]
        assert math.isnan(chosen.predicted_throughput)
        assert notes(chosen)["costs"] == "not profiled: no example= given"
    assert not pipe.inline
    frames = [torch.randn(1, 8) for _ in range(5)]
    async with pipe.open(frames) as outputs:
        got = [y async for y in outputs]
    with torch.no_grad():
        for x, y in zip(frames, got, strict=True):
            torch.testing.assert_close(y, nested()(x))


@pytest.mark.parametrize(
    ("partition", "message"),
    [([2, 2], "covers 4 layers but the model has 3"), ([1, 1, 1], "3 stages but only 2")],
)
def test_bad_explicit_partitions_are_refused_alike(partition: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sf.pipeline(nested(), CPUS, torch.randn(1, 8), partition=partition)
    with pytest.raises(ValueError, match=message):
        sf.OnlineTrainer(
            nested(),
            CPUS,
            loss_fn=nn.functional.mse_loss,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            partition=partition,
        )


# ------------------------------------------------------------ provenance and JSON


@pytest.mark.asyncio
async def test_the_table_says_how_each_input_was_measured_and_the_plan_chosen() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    pipe = sf.pipeline(model, CPUS, torch.randn(1, 32))
    text = pipe.plan.table()
    assert text == str(pipe.plan)
    lines = text.splitlines()
    for key in ("layer times", "hand-off", "contention", "cut points", "chosen by"):
        assert sum(line.startswith(f"{key}: ") for line in lines) == 1, key
    how = notes(pipe.plan)
    assert how["layer times"].startswith("median of ")
    assert "round trips" in how["hand-off"]
    assert "measured on the cut [" in how["contention"]


def test_profile_provenance_for_one_and_two_cpu_workers() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    two = profile(model, torch.randn(1, 16), CPUS, warmup=1, repeats=3)
    one = profile(model, torch.randn(1, 16), ["cpu:0"], warmup=1, repeats=3)
    assert "measured on the cut [" in dict(two.provenance)["contention"]
    assert dict(one.provenance)["contention"].startswith("not measured")
    assert one.contention == 1.0
    assert plan(two).provenance == two.provenance  # plan() carries them on, measures nothing


def test_provenance_round_trips_and_old_documents_still_load() -> None:
    prof = crafted([1.0, 2.0], latency_ms=0.01, provenance=[("layer times", "median of 11")])
    chosen = Plan(
        plan(prof).stages,
        1.0,
        2.0,
        "throughput",
        provenance={"layer times": "median of 11", "chosen by": "a trial: [2] 9/s"},
    )
    assert chosen.provenance == (
        ("layer times", "median of 11"),
        ("chosen by", "a trial: [2] 9/s"),
    )
    assert Plan.from_json(chosen.to_json()) == chosen
    assert Profile.from_json(prof.to_json()) == prof
    old_plan = json.loads(chosen.to_json())
    del old_plan["provenance"]
    assert Plan.from_json(json.dumps(old_plan)).provenance == ()
    old_profile = json.loads(prof.to_json())
    del old_profile["provenance"]
    assert Profile.from_json(json.dumps(old_profile)).provenance == ()
    with pytest.raises(ValueError, match="string pairs"):
        Plan(chosen.stages, 1.0, 2.0, "throughput", provenance=[("only one",)])  # type: ignore[list-item]
