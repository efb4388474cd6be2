"""CPU contention in the cost model: when two workers slow each other down enough, merge."""

import pytest
import torch
from torch import nn

from streamflow.parallel import HandoffModel, LayerProfile, Profile, plan, profile


def synthetic(contention: float) -> Profile:
    return Profile(
        layers=[LayerProfile(f"l{i}", 1e-3, 2e-3, 100, 1000) for i in range(8)],
        devices=("cpu:0", "cpu:1"),
        handoff=HandoffModel(latency_s=1e-5, s_per_byte=0.0),
        contention=contention,
    )


def test_mild_contention_still_splits_and_is_priced_in() -> None:
    p = plan(synthetic(1.2))
    assert p.partition == [4, 4]
    assert p.stages[0].compute_s == pytest.approx(4 * 1e-3 * 1.2)
    assert p.predicted_throughput == pytest.approx(1 / (4.8e-3 + 1e-5))  # + the hand-off


def test_heavy_contention_merges_into_one_stage_without_penalty() -> None:
    p = plan(synthetic(2.5))  # two stages at 2.5x each: 10 ms > 8 ms alone
    assert p.partition == [8]
    assert p.stages[0].compute_s == pytest.approx(8e-3)


def test_explicit_partition_pays_contention() -> None:
    p = plan(synthetic(2.0), partition=[4, 4])
    assert [s.compute_s for s in p.stages] == pytest.approx([8e-3, 8e-3])


def test_contention_round_trips_and_is_validated() -> None:
    prof = synthetic(1.7)
    assert Profile.from_json(prof.to_json()).contention == 1.7
    with pytest.raises(ValueError, match="contention"):
        synthetic(0.5)


def test_profile_measures_contention_for_two_cpu_workers() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    two = profile(model, torch.randn(1, 64), ["cpu:0", "cpu:1"], warmup=1, repeats=5)
    one = profile(model, torch.randn(1, 64), ["cpu:0"], warmup=1, repeats=5)
    assert 1.0 <= two.contention <= 4.0
    assert one.contention == 1.0
