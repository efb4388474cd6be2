"""The one plan chooser behind ``sf.pipeline(...)`` and ``OnlineTrainer``.

``partition="auto"``: profile the layers (named as the model names them), predict with the
dynamic programme over *canonical* cut points, and when other plans are predicted within
noise of the best, run the candidates for a short while as real pipelines on the device
worker threads, alternating them; the predicted best stands unless another candidate is
measured clearly faster (see ``_challenge``). A list of layer counts is profiled too when
there is an example (its plan has predicted costs), and a :class:`Plan` is used as it is. Every plan
says in its ``provenance`` how its inputs were measured and how it was chosen.

Canonical cut points: a cut just before or just after a cheap layer (an element-wise
activation, dropout, flatten or identity without parameters, at most 5% of the model's
time) costs the same within noise and hands over the same bytes, so of such neighbouring
cuts only the last is a candidate: the cheap layer stays with the layer before it. Without
this, re-profiling flips between ``[7, 9]`` and ``[8, 8]`` on a model of Linear + ReLU
pairs, for nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ._costs import Profile
from ._devices import is_cuda, timing_class
from ._plan import Objective, Plan, StagePlan, check_partition, plan, plan_within
from ._profile import profile
from ._trial import EXTEND_WITHIN, EXTRA_ROUNDS, TRIAL_ROUNDS, TRIAL_TIE, Build, measure

__all__ = ["Build", "Partition", "canonical_cuts", "choose_auto", "choose_plan"]

Partition = Literal["auto"] | Sequence[int] | Plan

# Layers whose cost a cut cannot change (element-wise, reshapes): "cheap" when they also
# have no parameters and take at most _CHEAP_SHARE of the model's time.
_CHEAP_KINDS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
)
_CHEAP_SHARE = 0.05
_CANDIDATE_MARGIN = 0.25  # plans predicted within this of the best are tried
_PREDICTED_NOISE = 0.08  # plans predicted within this of the best are alike: layout decides
_MAX_CANDIDATES = 3
_MAX_ENUMERATED = 2000  # splits evaluated one by one at most; beyond, the best's neighbours


def choose_plan(
    layers: Sequence[tuple[str, nn.Module]],
    devices: Sequence[str],
    example: torch.Tensor | None,
    partition: Partition,
    objective: Objective,
    *,
    caller: str,
    build: Build,
) -> Plan:
    """The plan for ``layers`` (``named_layers`` output) on ``devices``.

    ``caller`` names the API in messages (``"pipeline()"``, ``"OnlineTrainer"``);
    ``build`` makes the stage a measured trial runs for a candidate plan (as
    ``sf.pipeline`` would run it).
    """
    n = len(layers)
    devs = list(devices)
    if isinstance(partition, Plan):
        if partition.stages[-1].layer_end != n:
            raise ValueError(
                f"the plan covers {partition.stages[-1].layer_end} layers, the model has {n}"
            )
        return partition
    if isinstance(partition, str):
        if partition != "auto":
            raise ValueError(
                f"partition must be 'auto', a list of layers per stage or a Plan, got {partition!r}"
            )
        if example is None:
            raise ValueError(
                f"{caller} needs example= (one input batch) to profile the layers; "
                "or pass partition=[layers per stage] or a Plan"
            )
        prof = _profile(layers, devs, example)
        return choose_auto(prof, layers, devs, example, objective, build=build)
    sizes = list(partition)
    check_partition(sizes, n, len(devs), of="the model")
    chosen_by = ("chosen by", f"the explicit partition {sizes}")
    if example is None:
        return _unprofiled(layers, devs, sizes, objective, chosen_by)
    prof = _profile(layers, devs, example)
    fixed = plan(prof, devs, objective, partition=sizes)
    return dataclasses.replace(fixed, provenance=(*fixed.provenance, chosen_by))


def _profile(
    layers: Sequence[tuple[str, nn.Module]], devs: list[str], example: torch.Tensor
) -> Profile:
    """Profile the layers on the distinct devices, keeping the model's own layer names."""
    prof = profile([m for _, m in layers], example, list(dict.fromkeys(devs)))
    named = [
        dataclasses.replace(lp, name=name)
        for lp, (name, _) in zip(prof.layers, layers, strict=True)
    ]
    return dataclasses.replace(prof, layers=named)


def _unprofiled(
    layers: Sequence[tuple[str, nn.Module]],
    devs: list[str],
    sizes: list[int],
    objective: Objective,
    chosen_by: tuple[str, str],
) -> Plan:
    stages, start = [], 0
    for device, size in zip(devs, sizes, strict=False):
        names = [name for name, _ in layers[start : start + size]]
        stages.append(StagePlan(device, start, start + size, names, math.nan, math.nan, 0))
        start += size
    return Plan(
        stages,
        math.nan,
        math.nan,
        objective,
        provenance=(("costs", "not profiled: no example= given"), chosen_by),
    )


def canonical_cuts(prof: Profile, modules: Sequence[nn.Module]) -> list[int]:
    """The cut points worth telling apart (see the module docstring): of neighbouring cuts
    separated only by cheap layers, the last (a cheap layer stays with the one before it)."""
    n = len(prof.layers)
    total = sum(layer.forward_s for layer in prof.layers)
    cheap = [
        isinstance(module, _CHEAP_KINDS)
        and not any(True for _ in module.parameters())
        and layer.forward_s <= _CHEAP_SHARE * total
        for layer, module in zip(prof.layers, modules, strict=True)
    ]
    # cut p lies between layers p - 1 and p: cuts p and p + 1 differ by layer p alone
    return [p for p in range(1, n) if not (p + 1 < n and cheap[p])]


def _score(p: Plan, objective: Objective) -> tuple[float, ...]:
    if objective == "latency":
        return (p.predicted_latency_s, len(p.stages))
    return (p.bottleneck_s, len(p.stages), p.predicted_latency_s)


def _candidates(
    prof: Profile, devs: list[str], objective: Objective, cuts: list[int], best: Plan
) -> list[Plan]:
    """Plans over the canonical cuts, best predicted first: every split when there are few,
    else the best one's neighbours (each cut moved one canonical point) and single stages."""
    n = len(prof.layers)
    stages = range(1, min(len(devs), len(cuts) + 1) + 1)
    count = sum(math.comb(len(cuts), k - 1) * math.comb(len(devs), k) for k in stages)
    options: dict[tuple[tuple[str, ...], tuple[int, ...]], Plan] = {}

    def add(sizes: Sequence[int], on: Sequence[str]) -> None:
        key = (tuple(timing_class(d) for d in on), tuple(sizes))
        if key not in options:
            options[key] = plan(prof, list(on), objective, partition=list(sizes))

    add(best.partition, best.devices)
    if count <= _MAX_ENUMERATED:
        for k in stages:
            for bounds in itertools.combinations(cuts, k - 1):
                edges = [0, *bounds, n]
                sizes = [b - a for a, b in itertools.pairwise(edges)]
                for on in itertools.combinations(devs, k):
                    add(sizes, on)
    else:
        for dev in devs:
            add([n], [dev])
        edges = [s.layer_start for s in best.stages][1:]
        for i, edge in enumerate(edges):
            j = cuts.index(edge) if edge in cuts else None
            if j is None:
                continue
            for moved in (j - 1, j + 1):
                if 0 <= moved < len(cuts):
                    new = sorted({*edges[:i], cuts[moved], *edges[i + 1 :]})
                    if len(new) == len(edges):
                        sizes = [b - a for a, b in itertools.pairwise([0, *new, n])]
                        add(sizes, best.devices)
    ranked = sorted(options.values(), key=lambda p: _score(p, objective))
    first = _score(best, objective)[0]
    return [
        p for p in ranked if p == best or _score(p, objective)[0] <= first * (1 + _CANDIDATE_MARGIN)
    ]


def choose_auto(
    prof: Profile,
    layers: Sequence[tuple[str, nn.Module]],
    devices: Sequence[str],
    example: torch.Tensor,
    objective: Objective = "throughput",
    *,
    build: Build,
) -> Plan:
    """The auto plan from ``prof`` (a profile of ``layers``): the prediction over the
    canonical cuts, or, when other plans are predicted within ``_CANDIDATE_MARGIN`` of it,
    the winner of a measured trial of the candidates on CPU workers."""
    devs = list(devices)
    modules = [m for _, m in layers]
    cuts = canonical_cuts(prof, modules)
    best = plan_within(prof, devs, objective, cuts=cuts)
    notes = [
        (
            "cut points",
            f"{len(cuts)} of {len(layers) - 1}: a cheap element-wise layer stays with the "
            "layer before it",
        )
    ]
    pool = _candidates(prof, devs, objective, cuts, best)
    if best not in pool:
        pool.insert(0, best)
    pool = [best, *[p for p in pool if p != best]][:_MAX_CANDIDATES]
    others = pool[1:]
    if not others:
        rest = f"no other plan within {_CANDIDATE_MARGIN:.0%}"
        return _noted(best, notes, f"prediction ({rest})")
    if objective != "throughput" or any(is_cuda(d) for d in devs):
        why = "objective latency" if objective != "throughput" else "CUDA devices: no trial"
        return _noted(best, notes, f"prediction ({why})")
    pool = _incumbent_first(pool, objective)
    trial = measure(modules, pool, example, build)
    rates = trial.rates
    pick = _challenge(pool, rates)
    measured = ", ".join(f"{p.partition} {r:,.0f}/s" for p, r in zip(pool, rates, strict=True))
    tie = (
        f"; the incumbent {pool[0].partition} (of those predicted within "
        f"{_PREDICTED_NOISE:.0%} of the best: fewest stages, then the earliest cuts) stands "
        f"unless another is measured faster by over {TRIAL_TIE:.0%} (then, of those within "
        f"{TRIAL_TIE:.0%} of the fastest, the same layout rule)"
    )
    extra = (
        f", then {EXTRA_ROUNDS} more of {trial.extra_s:.2f} s for the {trial.extended} "
        f"measured within {EXTEND_WITHIN:.0%} of the fastest"
        if trial.extended
        else ""
    )
    return _noted(
        pool[pick],
        notes,
        f"a measured trial of {len(pool)} candidates predicted within "
        f"{_CANDIDATE_MARGIN:.0%} ({TRIAL_ROUNDS} alternating rounds of {trial.run_s:.2f} s "
        f"each on the device threads{extra}; each rate is a median of within-round ratios): "
        f"{measured}{tie}",
    )


def _incumbent_first(pool: list[Plan], objective: Objective) -> list[Plan]:
    """The candidates with the incumbent first: of those predicted within
    ``_PREDICTED_NOISE`` of the best, the one with fewest stages, then the earliest cuts.
    Predictions of plans that run alike move by several percent from one profile to the
    next; the layout does not, so re-profiling starts the trial from the same plan."""
    first = _score(pool[0], objective)[0]
    close = [p for p in pool if _score(p, objective)[0] <= first * (1 + _PREDICTED_NOISE)]
    top = min(close, key=lambda p: (len(p.stages), tuple(p.partition)))
    return [top, *[p for p in pool if p is not top]]


def _challenge(pool: Sequence[Plan], rates: Sequence[float]) -> int:
    """The incumbent (candidate 0) unless another was measured faster than it by over
    ``TRIAL_TIE``; then, of those, the one with fewest stages and the earliest cuts among
    the ones measured within ``TRIAL_TIE`` of the fastest. A short trial's noise is several
    percent, so only a clear measured gain may decide: candidates that run alike are told
    apart by their layout, and re-profiling picks the same plan."""
    beats = [i for i, r in enumerate(rates) if i and r > rates[0] * (1 + TRIAL_TIE)]
    if not beats:
        return 0
    fastest = max(rates[i] for i in beats)
    near = [i for i in beats if rates[i] >= fastest * (1 - TRIAL_TIE)]
    return min(near, key=lambda i: (len(pool[i].stages), tuple(pool[i].partition)))


def _noted(p: Plan, notes: list[tuple[str, str]], chosen_by: str) -> Plan:
    return dataclasses.replace(p, provenance=(*p.provenance, *notes, ("chosen by", chosen_by)))
