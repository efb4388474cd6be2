"""Device names used by plans: ``"cpu:N"`` (a dedicated CPU worker thread) and ``"cuda:N"``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch

from .._devices import parse_device

__all__ = [
    "check_devices",
    "intra_op_threads",
    "is_cuda",
    "numbered_device",
    "resolve_devices",
    "timing_class",
    "torch_device",
]


def numbered_device(name: str) -> tuple[str, int]:
    """Split ``"cpu:N"``/``"cuda:N"`` into ``(kind, index)``; ``ValueError`` for anything else
    (a plan places each stage on one numbered device, so a bare ``"cpu"`` is refused)."""
    try:
        kind, index = parse_device(name)
    except ValueError:
        index = None
    if index is None:
        raise ValueError(f"bad device name {name!r}: expected 'cpu:N' or 'cuda:N', e.g. 'cpu:0'")
    return kind, index


def check_devices(devices: Sequence[str], *, distinct: bool = True) -> tuple[str, ...]:
    """Validate a non-empty sequence of device names (distinct unless told otherwise) and
    return it as a tuple."""
    if isinstance(devices, str):
        raise TypeError(
            f"devices must be a list of names such as ['cpu:0', 'cpu:1'], not {devices!r}"
        )
    names = tuple(devices)
    if not names:
        raise ValueError("devices is empty: give at least one device such as 'cpu:0'")
    for name in names:
        numbered_device(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates and distinct:
        raise ValueError(f"devices are listed more than once: {', '.join(duplicates)}")
    return names


def is_cuda(name: str) -> bool:
    """Whether ``name`` is a CUDA device."""
    return numbered_device(name)[0] == "cuda"


def torch_device(name: str) -> torch.device:
    """The torch device behind ``name``: ``cuda:N`` itself; every CPU worker is ``cpu``."""
    return torch.device(name) if is_cuda(name) else torch.device("cpu")


def timing_class(name: str) -> str:
    """Devices with identical speed share a class: every CPU worker is ``"cpu"``; GPUs are their own."""
    return "cpu" if numbered_device(name)[0] == "cpu" else name


def intra_op_threads(cpu_parts: int) -> int:
    """PyTorch intra-op threads for each of ``cpu_parts`` CPU workers: the cores left after
    one for the event loop, shared out (at least one each). A worker whose OpenMP threads
    took every core would starve the loop that feeds it."""
    return max(1, ((os.cpu_count() or 1) - 1) // max(1, cpu_parts))


def resolve_devices(devices: Sequence[str] | Literal["auto"]) -> list[str]:
    """The devices a model is split over: ``"auto"`` is every CUDA device, else two CPU
    worker threads (one on a single core); a list is taken as given (checked by the plan)."""
    if devices == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return [f"cpu:{i}" for i in range(min(2, os.cpu_count() or 1))]
    if isinstance(devices, str):
        raise TypeError(
            f"devices must be 'auto' or a list such as ['cpu:0', 'cpu:1'], got {devices!r}"
        )
    return list(devices)
