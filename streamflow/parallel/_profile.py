"""Measure the per-layer costs and device handoffs that the partitioner plans with."""

from __future__ import annotations

import copy
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._costs import HandoffModel, LayerProfile, Profile
from ._devices import check_devices, is_cuda, parse_device, timing_class, torch_device
from ._forward import layer_call
from ._layers import named_layers, preserved_buffers

__all__ = ["profile"]

_HANDOFF_ROUNDS = 200
_MIN_COPY_BYTES = 1 << 20
_MAX_COPY_BYTES = 64 << 20
_NO_ARG: Any = object()


def profile(
    model: nn.Module | Sequence[nn.Module],
    example: torch.Tensor,
    devices: Sequence[str],
    *,
    warmup: int = 3,
    repeats: int = 11,
) -> Profile:
    """Profile each layer of ``model`` (see ``split_layers``) on the batch ``example``.

    Layer times are medians over ``repeats`` runs after ``warmup`` runs, measured on
    ``devices[0]``; a CPU worker is timed on the calling thread with one intra-op thread
    (the caller's thread count is restored). Other device kinds get a speed factor
    relative to it. Backward time is per layer in isolation (input requires grad, output
    gradient all ones), without touching ``.grad``; buffers (e.g. BatchNorm statistics)
    are restored afterwards. Also measures the CPU-worker handoff (thread round trip / 2
    plus a per-byte copy cost) and, with CUDA devices, the copies between devices.
    """
    devs = check_devices(devices)
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a tensor batch, got {type(example).__name__}")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    for dev in devs:
        _check_available(dev)
    owners = list(model) if isinstance(model, (list, tuple)) else [model]
    ref = devs[0]
    with preserved_buffers(owners):
        pairs = named_layers(model, example)
        layers = [layer for _, layer in pairs]
        forward, backward, out_bytes = _measure_layers(layers, example, ref, warmup, repeats)
        scale = {timing_class(ref): 1.0}
        for dev in devs:
            if timing_class(dev) not in scale:
                other, _, _ = _measure_layers(layers, example, dev, warmup, repeats, grad=False)
                scale[timing_class(dev)] = max(sum(other), 1e-12) / max(sum(forward), 1e-12)
    with _bench_context("cpu:0"):
        handoff = _measure_handoff(max([*out_bytes, _MIN_COPY_BYTES]), warmup, repeats)
        cpus = sum(1 for d in devs if not is_cuda(d))
        contention = _measure_contention(layers, example, repeats) if cpus > 1 else 1.0
    return Profile(
        layers=[
            LayerProfile(name, f, b, _state_bytes(layer), a)
            for (name, layer), f, b, a in zip(pairs, forward, backward, out_bytes, strict=True)
        ],
        devices=devs,
        handoff=handoff,
        device_scale=scale,
        links=_measure_links(devs, max(out_bytes), handoff.latency_s, repeats),
        batch_size=int(example.shape[0]) if example.dim() > 0 else 1,
        input_bytes=_nbytes(example),
        contention=contention,
    )


def _check_available(device: str) -> None:
    kind, index = parse_device(device)
    if kind == "cuda" and not (torch.cuda.is_available() and index < torch.cuda.device_count()):
        raise ValueError(f"{device} is not available (CUDA devices: {torch.cuda.device_count()})")


def _measure_layers(
    layers: list[nn.Module],
    example: torch.Tensor,
    device: str,
    warmup: int,
    repeats: int,
    *,
    grad: bool = True,
) -> tuple[list[float], list[float], list[int]]:
    """Per-layer (forward seconds, backward seconds, output bytes) on ``device``.

    Forward times are taken in context: the whole chain runs ``warmup + repeats`` times and
    each layer is timed where it sits, so a layer pays the cache misses that the layers
    around it cause (timed alone, a layer whose weights fit in cache looks faster than it
    will be in a stage). Backward times are per layer in isolation.
    """
    backward: list[float] = []
    out_bytes: list[int] = []
    with _bench_context(device):
        start: Any = example.to(torch_device(device))
        placed = [_placed(layer, device) for layer in layers]
        x = start
        for i, layer in enumerate(placed):
            try:
                with torch.no_grad():  # a fresh copy per run: layers may work in place
                    y = layer(_fresh(x))
            except Exception as exc:
                raise ValueError(
                    f"the example does not run through layer {i} ({type(layer).__name__}) "
                    f"on {device}: {type(exc).__name__}: {exc}. Pass example= as one input "
                    "batch of the model, shaped like the items of the stream"
                ) from exc
            backward.append(_backward_time(layer, x, device, warmup, repeats) if grad else 0.0)
            out_bytes.append(_nbytes(y))
            x = y
        forward = _chain_times(placed, start, device, warmup, repeats)
    return forward, backward, out_bytes


def _chain_times(
    layers: list[nn.Module], example: Any, device: str, warmup: int, repeats: int
) -> list[float]:
    """Median seconds of each layer, timed inside full runs of the chain and called the way
    pipeline parts call it."""
    samples: list[list[float]] = [[] for _ in layers]
    calls = [layer_call(layer) for layer in layers]
    cuda = is_cuda(device)
    with torch.no_grad():
        for run in range(warmup + repeats):
            x = example
            for i, call in enumerate(calls):
                arg = _fresh(x)  # untimed copy: layers may work in place
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                x = call(arg)
                if cuda:
                    torch.cuda.synchronize(device)
                if run >= warmup:
                    samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def _backward_time(layer: nn.Module, x: Any, device: str, warmup: int, repeats: int) -> float:
    params = [p for p in layer.parameters() if p.requires_grad]
    samples: list[float] = []
    for i in range(warmup + repeats):
        leaf = x.detach().requires_grad_() if _is_float(x) else x
        with torch.enable_grad():  # the clone lets in-place layers modify their input
            outs = [t for t in _tensors(layer(_fresh(leaf))) if t.requires_grad]
        targets = ([leaf] if _is_float(x) else []) + params
        if not outs or not targets:
            return 0.0
        grads = [torch.ones_like(t) for t in outs]

        def step(
            o: list[torch.Tensor] = outs,
            g: list[torch.Tensor] = grads,
            t: list[torch.Tensor] = targets,
        ) -> None:
            torch.autograd.grad(o, t, grad_outputs=g, allow_unused=True)

        elapsed = _timed(step, device)
        if i >= warmup:
            samples.append(elapsed)
    return statistics.median(samples)


def _measure_contention(layers: list[nn.Module], example: torch.Tensor, repeats: int) -> float:
    """Slow-down of the whole chain on one thread while another thread runs it too."""

    def chain() -> None:
        x = example
        with torch.no_grad():
            for layer in layers:
                x = layer(_fresh(x))

    def timed() -> float:
        samples = []
        for _ in range(max(repeats, 5)):
            start = time.perf_counter()
            chain()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    with preserved_buffers(layers):
        chain()  # warm up
        alone = timed()
        stop = threading.Event()

        def busy() -> None:
            torch.set_num_threads(1)
            while not stop.is_set():
                chain()

        other = threading.Thread(target=busy, name="streamflow-profile-load", daemon=True)
        other.start()
        try:
            loaded = timed()
        finally:
            stop.set()
            other.join()
    return min(4.0, max(1.0, loaded / max(alone, 1e-12)))


def _measure_handoff(nbytes: int, warmup: int, repeats: int) -> HandoffModel:
    """Thread round trip through two queues / 2, plus ``clone()`` seconds per byte."""
    to_worker: queue.SimpleQueue[object] = queue.SimpleQueue()
    back: queue.SimpleQueue[object] = queue.SimpleQueue()

    def echo() -> None:
        while (item := to_worker.get()) is not None:
            back.put(item)

    worker = threading.Thread(target=echo, name="streamflow-profile-echo", daemon=True)
    worker.start()
    token = object()
    rtts: list[float] = []
    try:
        for i in range(warmup + _HANDOFF_ROUNDS):
            start = time.perf_counter()
            to_worker.put(token)
            back.get()
            if i >= warmup:
                rtts.append(time.perf_counter() - start)
    finally:
        to_worker.put(None)
        worker.join()
    buffer = torch.empty(min(nbytes, _MAX_COPY_BYTES), dtype=torch.uint8)
    copy_s = _median_time(buffer.clone, "cpu:0", warmup, repeats)
    return HandoffModel(latency_s=statistics.median(rtts) / 2, s_per_byte=copy_s / buffer.numel())


def _measure_links(
    devices: tuple[str, ...], nbytes: int, thread_s: float, repeats: int
) -> dict[str, HandoffModel]:
    """Copy costs between timing classes involving CUDA, each plus a thread handoff."""
    gpus = [d for d in devices if is_cuda(d)]
    if not gpus:
        return {}
    pairs = {("cpu:0", g) for g in gpus} | {(g, "cpu:0") for g in gpus}
    pairs |= {(a, b) for a in gpus for b in gpus if a != b}
    big = min(max(nbytes, _MIN_COPY_BYTES), _MAX_COPY_BYTES)
    links: dict[str, HandoffModel] = {}
    for src, dst in sorted(pairs):
        small_s = _copy_time(src, dst, 4096, repeats)
        big_s = _copy_time(src, dst, big, repeats)
        per_byte = max(big_s - small_s, 0.0) / (big - 4096)
        links[f"{timing_class(src)}->{timing_class(dst)}"] = HandoffModel(
            latency_s=thread_s + small_s, s_per_byte=per_byte
        )
    return links


def _copy_time(src: str, dst: str, nbytes: int, repeats: int) -> float:
    """Median seconds to copy ``nbytes`` from ``src`` to ``dst``, timed with CUDA events."""
    data = torch.empty(nbytes, dtype=torch.uint8, device=torch_device(src))
    target = torch_device(dst)
    stream = torch.cuda.current_stream(target if is_cuda(dst) else torch_device(src))
    samples: list[float] = []
    with torch.cuda.device(stream.device):
        for i in range(2 + repeats):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            torch.cuda.synchronize()
            start.record(stream)
            data.to(target)
            end.record(stream)
            end.synchronize()
            if i >= 2:
                samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def _median_time(
    fn: Callable[..., object],
    device: str,
    warmup: int,
    repeats: int,
    *,
    arg: Any = _NO_ARG,
) -> float:
    """Median seconds of ``fn()``, or of ``fn(copy of arg)`` with the copy made untimed."""
    for _ in range(warmup):
        fn() if arg is _NO_ARG else fn(_fresh(arg))
    return statistics.median(_timed(fn, device, arg) for _ in range(repeats))


def _timed(fn: Callable[..., object], device: str, arg: Any = _NO_ARG) -> float:
    cuda = is_cuda(device)
    args = () if arg is _NO_ARG else (_fresh(arg),)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(*args)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@contextmanager
def _bench_context(device: str) -> Iterator[None]:
    """One intra-op thread for a CPU worker (restored after); the current GPU for CUDA."""
    if is_cuda(device):
        with torch.cuda.device(torch.device(device)):
            yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _placed(layer: nn.Module, device: str) -> nn.Module:
    """``layer`` itself if its state is on ``device``, else a copy moved there."""
    target = torch_device(device)
    state = [*layer.parameters(), *layer.buffers()]
    if all(_same_device(t.device, target) for t in state):
        return layer
    return copy.deepcopy(layer).to(target)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def _state_bytes(layer: nn.Module) -> int:
    unique = {id(t): t for t in [*layer.parameters(), *layer.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _fresh(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
