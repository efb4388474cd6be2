"""Choose pipeline stages from a profile: which contiguous layers run on which device."""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from ._costs import Profile, provenance_pairs
from ._devices import check_devices, is_cuda
from ._search import Split, min_bottleneck, min_latency, min_stages_within
from ._serial import dump_document, load_document

__all__ = ["Objective", "Plan", "StagePlan", "check_partition", "plan", "plan_within"]

Objective = Literal["throughput", "latency"]
_OBJECTIVES = ("throughput", "latency")
_KIND = "streamflow.plan"


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage: layers ``layer_start:layer_end`` (end exclusive) on ``device``.

    ``compute_s`` and ``transfer_in_s`` are predicted seconds per batch; ``transfer_in_s``
    is the handoff into this stage (the input copy for a first stage on CUDA).
    ``activation_out_bytes`` is the size of the stage's output activation.
    """

    device: str
    layer_start: int
    layer_end: int
    layer_names: Sequence[str]
    compute_s: float
    transfer_in_s: float
    activation_out_bytes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_names", tuple(self.layer_names))
        if not 0 <= self.layer_start < self.layer_end:
            raise ValueError(f"bad stage layer range {self.layer_start}:{self.layer_end}")
        if len(self.layer_names) != self.layer_end - self.layer_start:
            raise ValueError("StagePlan.layer_names must name each layer of the stage")

    @property
    def num_layers(self) -> int:
        """Number of layers in the stage."""
        return self.layer_end - self.layer_start

    @property
    def time_s(self) -> float:
        """Predicted seconds per batch: compute plus incoming transfer."""
        return self.compute_s + self.transfer_in_s


@dataclass(frozen=True)
class Plan:
    """A partition of a model's layers into pipeline stages, with predicted performance.

    ``predicted_throughput`` is samples/s (``batch_size`` / slowest stage time);
    ``predicted_latency_s`` is the sum of all stage times for one batch. ``provenance``
    holds ``(input, how it was measured)`` pairs, e.g. ``("contention", "1.34, measured on
    the cut [8, 8] ...")`` and ``("chosen by", "a measured trial of 2 candidates ...")``:
    those of the profile it was planned from, plus how ``sf.pipeline`` or ``OnlineTrainer``
    chose it; :meth:`table` prints them under the stages.
    """

    stages: Sequence[StagePlan]
    predicted_throughput: float
    predicted_latency_s: float
    objective: str
    batch_size: int = 1
    provenance: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "provenance", provenance_pairs(self.provenance))
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"objective must be one of {_OBJECTIVES}, got {self.objective!r}")
        if not self.stages or self.stages[0].layer_start != 0:
            raise ValueError("a Plan needs stages starting at layer 0")
        for a, b in zip(self.stages, self.stages[1:], strict=False):
            if a.layer_end != b.layer_start:
                raise ValueError(f"stages must be contiguous: {a.layer_end} then {b.layer_start}")
        check_devices([s.device for s in self.stages], distinct=False)

    @property
    def devices(self) -> list[str]:
        """Device of each stage, in pipeline order."""
        return [s.device for s in self.stages]

    @property
    def partition(self) -> list[int]:
        """Layers per stage; pass back as ``plan(profile, partition=...)`` to reproduce it."""
        return [s.num_layers for s in self.stages]

    @property
    def bottleneck_s(self) -> float:
        """Predicted seconds per batch of the slowest stage."""
        return max(s.time_s for s in self.stages)

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """The plan as text: a row per stage (layers, device, predicted ms, bytes out, layer
        names), the predicted throughput and latency, then one line per ``provenance`` entry
        saying how each input was measured and how the plan was chosen."""
        dev_w = max(6, *(len(s.device) for s in self.stages))
        rows = [
            f"{'stage':>5}  {'device':<{dev_w}}  {'layers':<12}  {'compute ms':>10}  "
            f"{'xfer-in ms':>10}  {'stage ms':>9}  {'out bytes':>10}  names"
        ]
        for i, s in enumerate(self.stages):
            span = f"{s.layer_start}-{s.layer_end - 1} ({s.num_layers})"
            names = (
                s.layer_names[0]
                if s.num_layers == 1
                else f"{s.layer_names[0]} .. {s.layer_names[-1]}"
            )
            rows.append(
                f"{i:>5}  {s.device:<{dev_w}}  {span:<12}  {s.compute_s * 1e3:>10.3f}  "
                f"{s.transfer_in_s * 1e3:>10.3f}  {s.time_s * 1e3:>9.3f}  "
                f"{_human_bytes(s.activation_out_bytes):>10}  {names}"
            )
        rows.append(
            f"predicted throughput: {self.predicted_throughput:,.1f} samples/s "
            f"(batch {self.batch_size}, bottleneck {self.bottleneck_s * 1e3:.3f} ms); "
            f"latency: {self.predicted_latency_s * 1e3:.3f} ms; "
            f"objective: {self.objective}"
        )
        rows.extend(f"{key}: {note}" for key, note in self.provenance)
        return "\n".join(rows)

    def to_json(self) -> str:
        """Serialise to a JSON document (see :meth:`from_json`)."""
        return dump_document(
            _KIND,
            {
                "objective": self.objective,
                "batch_size": self.batch_size,
                "predicted_throughput": self.predicted_throughput,
                "predicted_latency_s": self.predicted_latency_s,
                "stages": [{**asdict(s), "layer_names": list(s.layer_names)} for s in self.stages],
                "provenance": [list(pair) for pair in self.provenance],
            },
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Parse a document written by :meth:`to_json`; ``ValueError`` if malformed."""
        data = load_document(text, _KIND)
        try:
            return cls(
                stages=[StagePlan(**stage) for stage in data["stages"]],
                predicted_throughput=data["predicted_throughput"],
                predicted_latency_s=data["predicted_latency_s"],
                objective=data["objective"],
                batch_size=data.get("batch_size", 1),
                provenance=data.get("provenance", ()),  # absent from older documents
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed {_KIND} document: {exc!r}") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def plan(
    profile: Profile,
    devices: Sequence[str] | None = None,
    objective: Objective = "throughput",
    *,
    partition: Sequence[int] | None = None,
    tolerance: float = 0.0,
) -> Plan:
    """Split ``profile``'s layers into at most ``len(devices)`` contiguous stages.

    Stages take devices in the given order (devices may be left unused). A stage costs
    its summed layer forward times on its device plus its incoming transfer
    (``profile.transfer_s`` of the activation at the cut; every cut pays the handoff
    latency). ``"throughput"`` minimises the slowest stage, then prefers fewer stages,
    then lower total latency; stages whose bottleneck is within ``tolerance`` (relative)
    of the best count as ties. ``"latency"`` minimises the sum of stage times, then the
    stage count. ``partition`` (layers per stage) skips the search and places stage i on
    ``devices[i]``. ``devices`` defaults to ``profile.devices``. The plan carries the
    profile's ``provenance``. Pure: nothing is measured, the same profile gives the same plan.
    """
    return plan_within(profile, devices, objective, partition=partition, tolerance=tolerance)


def plan_within(
    profile: Profile,
    devices: Sequence[str] | None = None,
    objective: Objective = "throughput",
    *,
    partition: Sequence[int] | None = None,
    tolerance: float = 0.0,
    cuts: Collection[int] | None = None,
) -> Plan:
    """:func:`plan`, with the search's stage boundaries restricted to ``cuts`` (the layer
    indices a stage other than the first may start at; every index when ``None``)."""
    devs = check_devices(
        profile.devices if devices is None else devices, distinct=partition is None
    )
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be 'throughput' or 'latency', got {objective!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    n = len(profile.layers)
    prefix = [0.0]
    for layer in profile.layers:
        prefix.append(prefix[-1] + layer.forward_s)
    scale = [profile.compute_scale(d) for d in devs]

    @cache
    def transfer(cut: int, src: int | None, dst: int) -> float:
        if src is None:
            return profile.input_transfer_s(devs[dst])
        return profile.transfer_s(profile.layers[cut - 1].activation_bytes, devs[src], devs[dst])

    # CPU workers computing at once slow each other down (memory bandwidth, the GIL):
    # multi-stage plans pay profile.contention on their CPU stages, a single stage does not.
    cpu = [not is_cuda(d) for d in devs]
    busy = [scale[d] * (profile.contention if cpu[d] else 1.0) for d in range(len(devs))]

    allowed = None if cuts is None else frozenset(cuts)

    def stage_s(start: int, end: int, dev: int, prev: int | None) -> float:
        if start and allowed is not None and start not in allowed:
            return math.inf
        return (prefix[end] - prefix[start]) * busy[dev] + transfer(start, prev, dev)

    def alone_s(dev: int) -> float:
        return prefix[n] * scale[dev] + transfer(0, None, dev)

    split: Split
    if partition is not None:
        split = _explicit(partition, n, len(devs))
    elif objective == "latency":
        split = min_latency(n, len(devs), stage_s)
    else:
        best = min_bottleneck(n, len(devs), stage_s)
        limit = best * (1 + tolerance) + max(abs(best) * 1e-9, 1e-15)
        split = min_stages_within(n, len(devs), stage_s, limit)
    if partition is None and len(split) > 1:
        solo = min(range(len(devs)), key=alone_s)
        times = [
            stage_s(a, b, d, split[k - 1][2] if k else None) for k, (a, b, d) in enumerate(split)
        ]
        if objective == "latency":
            worth = sum(times) < alone_s(solo)
        else:
            worth = max(times) * (1 + tolerance) < alone_s(solo)
        if not worth:  # merging everything into one stage is as good: fewer stages win
            split = [(0, n, solo)]
    shared = sum(1 for _, _, d in split if cpu[d]) > 1
    factor = [busy[d] if shared and cpu[d] else scale[d] for d in range(len(devs))]

    stages = []
    for k, (start, end, dev) in enumerate(split):
        prev = split[k - 1][2] if k else None
        stages.append(
            StagePlan(
                device=devs[dev],
                layer_start=start,
                layer_end=end,
                layer_names=profile.layer_names[start:end],
                compute_s=(prefix[end] - prefix[start]) * factor[dev],
                transfer_in_s=transfer(start, prev, dev),
                activation_out_bytes=profile.layers[end - 1].activation_bytes,
            )
        )
    bottleneck = max(s.time_s for s in stages)
    return Plan(
        stages=stages,
        predicted_throughput=profile.batch_size / bottleneck if bottleneck > 0 else math.inf,
        predicted_latency_s=sum(s.time_s for s in stages),
        objective=objective,
        batch_size=profile.batch_size,
        provenance=profile.provenance,
    )


def check_partition(
    partition: Sequence[int], n: int, ndev: int, *, of: str = "the profile"
) -> None:
    """``ValueError`` unless ``partition`` is positive layer counts covering ``n`` layers in
    at most ``ndev`` stages (``of`` names what has the layers, for the message)."""
    sizes = list(partition)
    if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
        raise ValueError(f"partition must be a non-empty list of positive ints, got {partition!r}")
    if sum(sizes) != n:
        raise ValueError(f"partition {sizes} covers {sum(sizes)} layers but {of} has {n}")
    if len(sizes) > ndev:
        raise ValueError(f"partition has {len(sizes)} stages but only {ndev} devices are given")


def _explicit(partition: Sequence[int], n: int, ndev: int) -> Split:
    check_partition(partition, n, ndev)
    sizes = list(partition)
    split: Split = []
    start = 0
    for dev, size in enumerate(sizes):
        split.append((start, start + size, dev))
        start += size
    return split


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover
