"""The cost model the partitioner plans with: per-layer costs plus device-to-device handoffs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._devices import check_devices, is_cuda, timing_class
from ._serial import dump_document, load_document

__all__ = ["HandoffModel", "LayerProfile", "Profile", "provenance_pairs"]

_KIND = "streamflow.profile"


def _check_cost(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def _check_bytes(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int number of bytes, got {value!r}")
    if value < 0:
        raise ValueError(f"{owner}.{name} must be >= 0, got {value!r}")


def provenance_pairs(
    value: Mapping[str, str] | Sequence[Sequence[str]],
) -> tuple[tuple[str, str], ...]:
    """``(input, note)`` string pairs from a mapping or a sequence of pairs, in order."""
    items = list(value.items()) if isinstance(value, Mapping) else list(value)
    pairs = []
    for item in items:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 2
            or not all(isinstance(v, str) for v in item)
        ):
            raise ValueError(f"provenance must be (input, note) string pairs, got {item!r}")
        pairs.append((item[0], item[1]))
    return tuple(pairs)


@dataclass(frozen=True)
class LayerProfile:
    """Measured costs of one layer for one batch: seconds on the reference device, bytes."""

    name: str
    forward_s: float
    backward_s: float
    param_bytes: int
    activation_bytes: int

    def __post_init__(self) -> None:
        _check_cost("LayerProfile", "forward_s", self.forward_s)
        _check_cost("LayerProfile", "backward_s", self.backward_s)
        _check_bytes("LayerProfile", "param_bytes", self.param_bytes)
        _check_bytes("LayerProfile", "activation_bytes", self.activation_bytes)


@dataclass(frozen=True)
class HandoffModel:
    """Cost of handing an activation over: ``latency_s + nbytes * s_per_byte`` seconds."""

    latency_s: float
    s_per_byte: float

    def __post_init__(self) -> None:
        _check_cost("HandoffModel", "latency_s", self.latency_s)
        _check_cost("HandoffModel", "s_per_byte", self.s_per_byte)

    def cost_s(self, nbytes: int) -> float:
        """Seconds to hand over ``nbytes``."""
        return self.latency_s + nbytes * self.s_per_byte


@dataclass(frozen=True)
class Profile:
    """Per-layer costs of a model on the devices it was profiled for.

    ``layers`` hold times on ``devices[0]``; a layer takes ``forward_s * compute_scale(d)``
    on device ``d``. ``handoff`` is the CPU-worker-to-CPU-worker hand-off; ``links`` holds
    measured copies keyed ``"src->dst"`` by timing class (``"cpu->cuda:0"``, ...).
    ``batch_size`` is the number of samples the times are for; ``input_bytes`` the size
    of one input batch. ``contention`` is how much slower CPU layers run when another CPU
    worker computes at the same time (shared memory bandwidth, the GIL); 1.0 if unmeasured.
    ``provenance`` holds ``(input, how it was measured)`` pairs, e.g. ``("contention",
    "1.34, measured on the cut [8, 8] ...")``; plans made from the profile carry them on.
    """

    layers: Sequence[LayerProfile]
    devices: Sequence[str]
    handoff: HandoffModel
    device_scale: Mapping[str, float] = field(default_factory=dict)
    links: Mapping[str, HandoffModel] = field(default_factory=dict)
    batch_size: int = 1
    input_bytes: int = 0
    contention: float = 1.0
    provenance: Sequence[tuple[str, str]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "provenance", provenance_pairs(self.provenance))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "devices", check_devices(self.devices))
        object.__setattr__(self, "device_scale", dict(self.device_scale))
        object.__setattr__(self, "links", dict(self.links))
        if not self.layers:
            raise ValueError("a Profile needs at least one layer")
        if not all(isinstance(layer, LayerProfile) for layer in self.layers):
            raise TypeError("Profile.layers must be LayerProfile objects")
        for key, scale in self.device_scale.items():
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"device_scale[{key!r}] must be a finite number > 0, got {scale!r}"
                )
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        _check_bytes("Profile", "input_bytes", self.input_bytes)
        if not (math.isfinite(self.contention) and self.contention >= 1.0):
            raise ValueError(f"contention must be a finite number >= 1, got {self.contention!r}")

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers, in order."""
        return [layer.name for layer in self.layers]

    def compute_scale(self, device: str) -> float:
        """Multiplier from reference-device times to times on ``device``."""
        if not self.device_scale:
            timing_class(device)  # validates the name
            return 1.0
        key = timing_class(device)
        if key not in self.device_scale:
            raise ValueError(f"device {device!r} was not profiled; profile with it in devices")
        return self.device_scale[key]

    def transfer_s(self, nbytes: int, src: str, dst: str) -> float:
        """Seconds to hand ``nbytes`` of activation from device ``src`` to ``dst`` (0 if same)."""
        if src == dst:
            return 0.0
        link = self.links.get(f"{timing_class(src)}->{timing_class(dst)}")
        if link is not None:
            return link.cost_s(nbytes)
        if is_cuda(src) or is_cuda(dst):
            raise ValueError(f"no measured transfer from {src} to {dst}; profile with both devices")
        return self.handoff.cost_s(nbytes)

    def input_transfer_s(self, device: str) -> float:
        """Seconds to bring one input batch from the host to ``device`` (0 for CPU workers)."""
        return self.transfer_s(self.input_bytes, "cpu:0", device) if is_cuda(device) else 0.0

    def to_json(self) -> str:
        """Serialise to a JSON document (see :meth:`from_json`)."""
        return dump_document(
            _KIND,
            {
                "devices": list(self.devices),
                "batch_size": self.batch_size,
                "input_bytes": self.input_bytes,
                "contention": self.contention,
                "handoff": asdict(self.handoff),
                "device_scale": dict(self.device_scale),
                "links": {key: asdict(link) for key, link in self.links.items()},
                "layers": [asdict(layer) for layer in self.layers],
                "provenance": [list(pair) for pair in self.provenance],
            },
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Profile:
        """Parse a document written by :meth:`to_json`; ``ValueError`` if malformed."""
        data = load_document(text, _KIND)
        try:
            return cls(
                layers=[LayerProfile(**layer) for layer in data["layers"]],
                devices=data["devices"],
                handoff=HandoffModel(**data["handoff"]),
                device_scale=data.get("device_scale", {}),
                links={k: HandoffModel(**v) for k, v in data.get("links", {}).items()},
                batch_size=data.get("batch_size", 1),
                input_bytes=data.get("input_bytes", 0),
                contention=data.get("contention", 1.0),
                provenance=data.get("provenance", ()),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed {_KIND} document: {exc!r}") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        """Read a profile written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
