"""Measure the per-layer costs and device handoffs that the partitioner plans with."""

from __future__ import annotations

import copy
import math
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
from ._devices import check_devices, is_cuda, numbered_device, timing_class, torch_device
from ._forward import layer_call
from ._layers import named_layers, preserved_buffers

__all__ = ["profile"]

_HANDOFF_BLOCKS = 5  # the hand-off latency: median of the medians of blocks of round trips
_HANDOFF_ROUNDS = 64
_CHAIN_BUDGET_S = 0.05  # layer times: more runs of the chain while they fit in this...
_CHAIN_MAX_RUNS = 8  # ...up to this many times ``repeats``
_PAIR_BLOCKS = 5  # contention: pairs of blocks, the cut's two stages alone then pipelined,
_PAIR_BLOCK_S = 0.015  # each this long (or 8 predicted periods), the pipelined one after a
_PAIR_WARMUP_S = 0.005  # warm-up this long (or 2 predicted periods)
_PAIR_IN_FLIGHT = 16  # samples at most between the two threads (a pipeline part's capacity)
_MAX_CONTENTION = 4.0
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

    Layer times are medians over at least ``repeats`` runs of the whole chain after
    ``warmup`` runs (more while they take under 50 ms, up to 8 x ``repeats``), measured on
    ``devices[0]``; a CPU worker is timed on the calling thread with one intra-op thread
    (the caller's thread count is restored). Other device kinds get a speed factor
    relative to it. Backward time is per layer in isolation (input requires grad, output
    gradient all ones), without touching ``.grad``; buffers (e.g. BatchNorm statistics)
    are restored afterwards. Also measures the CPU-worker handoff (thread round trip / 2,
    median of the medians of 5 blocks of 64, plus a per-byte copy cost) and, with CUDA
    devices, the copies between devices. With two or more CPU workers, ``contention`` is
    measured on the cut a two-stage plan would make: the two stages run as a pipeline on
    two threads, in turn with the same stages one after the other on one thread (5 pairs,
    about 0.2 s), and the factor is what makes the predicted period of that cut equal the
    measured one (the median over the pairs, between 1 and 4). ``Profile.provenance`` says
    how each input was measured.
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
    notes: list[tuple[str, str]] = []
    with preserved_buffers(owners):
        pairs = named_layers(model, example)
        layers = [layer for _, layer in pairs]
        forward, backward, out_bytes, runs = _measure_layers(layers, example, ref, warmup, repeats)
        notes.append(
            ("layer times", f"median of {runs} in-chain runs after {warmup} warm-up, on {ref}")
        )
        scale = {timing_class(ref): 1.0}
        for dev in devs:
            if timing_class(dev) not in scale:
                other, _, _, runs = _measure_layers(
                    layers, example, dev, warmup, repeats, grad=False
                )
                scale[timing_class(dev)] = max(sum(other), 1e-12) / max(sum(forward), 1e-12)
                notes.append(
                    (
                        f"speed of {timing_class(dev)}",
                        f"{scale[timing_class(dev)]:.3g}x the time on {ref}: whole chain, "
                        f"median of {runs} runs",
                    )
                )
    with _bench_context("cpu:0"):
        handoff = _measure_handoff(max([*out_bytes, _MIN_COPY_BYTES]), warmup, repeats)
        notes.append(
            (
                "hand-off",
                f"{handoff.latency_s * 1e6:.1f} us + {handoff.s_per_byte * 1e9:.3g} ns/byte: "
                f"median of {_HANDOFF_BLOCKS} blocks of {_HANDOFF_ROUNDS} thread round trips"
                f" / 2, copy cost median of {repeats} copies",
            )
        )
        cpus = sum(1 for d in devs if not is_cuda(d))
        if cpus > 1:
            with preserved_buffers(owners):
                contention, note = _measure_contention(layers, example, forward, handoff, out_bytes)
        else:
            contention, note = 1.0, "not measured: fewer than two CPU workers"
        notes.append(("contention", note))
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
        provenance=notes,
    )


def _check_available(device: str) -> None:
    kind, index = numbered_device(device)
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
) -> tuple[list[float], list[float], list[int], int]:
    """Per-layer (forward seconds, backward seconds, output bytes) on ``device``, and the
    number of timed runs of the chain.

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
        forward, runs = _chain_times(placed, start, device, warmup, repeats)
    return forward, backward, out_bytes, runs


def _chain_times(
    layers: list[nn.Module], example: Any, device: str, warmup: int, repeats: int
) -> tuple[list[float], int]:
    """Median seconds of each layer, timed inside full runs of the chain and called the way
    pipeline parts call it; at least ``repeats`` runs, more while the timed runs take less
    than ``_CHAIN_BUDGET_S`` (small models get more samples for little time)."""
    samples: list[list[float]] = [[] for _ in layers]
    calls = [layer_call(layer) for layer in layers]
    cuda = is_cuda(device)
    limit = warmup + repeats * _CHAIN_MAX_RUNS
    began = 0.0
    with torch.no_grad():
        run = 0
        while run < warmup + repeats or (
            run < limit and time.perf_counter() - began < _CHAIN_BUDGET_S
        ):
            if run == warmup:
                began = time.perf_counter()
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
            run += 1
    return [statistics.median(s) for s in samples], run - warmup


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


def _measure_contention(
    layers: list[nn.Module],
    example: torch.Tensor,
    forward: list[float],
    handoff: HandoffModel,
    out_bytes: list[int],
) -> tuple[float, str]:
    """The contention factor, measured on the cut a two-stage plan would make, and a note
    on how.

    The cut is the one with the smallest predicted bottleneck without contention. Its two
    stages run as a pipeline on two threads (the first hands each output to the second
    through a queue, at most ``_PAIR_IN_FLIGHT`` apart), so each stage pays what the other
    costs it while both compute (memory bandwidth, the GIL, the hand-off); right before,
    the same two stages run one after the other on this thread, timed apart (``s0``,
    ``s1``). A pair's factor is the one that makes the cost model's period of that cut,
    ``max(c * s0, c * s1 + hand-off)``, equal the measured period; the result is the median
    over ``_PAIR_BLOCKS`` pairs, clamped to [1, 4]. Pairing the two measurements in time
    keeps the factor a ratio of like with like while the machine's speed drifts.
    """
    n = len(layers)
    if n < 2:
        return 1.0, "not measured: a single layer has no cut"
    prefix = [0.0]
    for f in forward:
        prefix.append(prefix[-1] + f)

    def bottleneck(k: int) -> float:
        return max(prefix[k], prefix[n] - prefix[k] + handoff.cost_s(out_bytes[k - 1]))

    cut = min(range(1, n), key=bottleneck)
    hand = handoff.cost_s(out_bytes[cut - 1])
    estimate = bottleneck(cut)
    block_s = max(_PAIR_BLOCK_S, 8 * estimate)
    warm_s = max(_PAIR_WARMUP_S, 2 * estimate)
    calls = ([layer_call(m) for m in layers[:cut]], [layer_call(m) for m in layers[cut:]])
    factors, ratios = [], []
    for _ in range(_PAIR_BLOCKS):
        s0, s1 = _stages_alone(calls, example, block_s)
        period = _pipelined_period(calls, example, block_s, warm_s)
        factor = min(
            period / s0 if s0 > 0 else math.inf,
            (period - hand) / s1 if s1 > 0 else math.inf,
        )
        factors.append(factor if math.isfinite(factor) else 1.0)
        ratios.append(period / max(s0, s1 + hand, 1e-12))
    factor = statistics.median(factors)
    contention = min(_MAX_CONTENTION, max(1.0, factor))
    clamped = " (clamped)" if contention != factor else ""
    note = (
        f"{contention:.2f}{clamped}, measured on the cut {[cut, n - cut]}: its two stages as a "
        f"pipeline on two threads against the same stages one after the other on one thread, "
        f"median of {_PAIR_BLOCKS} pairs of {block_s * 1e3:.0f} ms blocks (the pipeline's "
        f"period {statistics.median(ratios):.2f}x the slower stage alone)"
    )
    return contention, note


_Calls = tuple[list[Callable[[Any], Any]], list[Callable[[Any], Any]]]


def _stages_alone(calls: _Calls, example: torch.Tensor, block_s: float) -> tuple[float, float]:
    """Median seconds per sample of each stage, run one after the other on this thread for
    about ``block_s``."""
    times: tuple[list[float], list[float]] = ([], [])
    until = time.perf_counter() + block_s
    with torch.no_grad():
        while time.perf_counter() < until or len(times[0]) < 3:
            x: Any = example.clone()
            for part, samples in zip(calls, times, strict=True):
                start = time.perf_counter()
                for call in part:
                    x = call(x)
                samples.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _pipelined_period(calls: _Calls, example: torch.Tensor, block_s: float, warm_s: float) -> float:
    """Seconds per sample of the two stages run as a two-thread pipeline: the spacing of the
    outputs over ``block_s`` after ``warm_s``."""
    handed: queue.SimpleQueue[Any] = queue.SimpleQueue()
    slots = threading.Semaphore(_PAIR_IN_FLIGHT)
    stamps: list[float] = []
    errors: list[BaseException] = []
    stop = object()
    began = time.perf_counter()
    low, high = began + warm_s, began + warm_s + block_s

    def produce() -> None:
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                while time.perf_counter() < high or len(stamps) < 3:
                    slots.acquire()
                    if errors:
                        break
                    x: Any = example.clone()
                    for call in calls[0]:
                        x = call(x)
                    handed.put(x)
        except BaseException as exc:
            errors.append(exc)
        handed.put(stop)

    def consume() -> None:
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                while (x := handed.get()) is not stop:
                    for call in calls[1]:
                        x = call(x)
                    stamps.append(time.perf_counter())
                    slots.release()
        except BaseException as exc:
            errors.append(exc)
            slots.release(_PAIR_IN_FLIGHT + 1)  # let the producer see the error

    threads = [
        threading.Thread(target=produce, name="streamflow-profile-stage0", daemon=True),
        threading.Thread(target=consume, name="streamflow-profile-stage1", daemon=True),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    inside = [t for t in stamps if low <= t <= high]
    if len(inside) < 2:  # slower than the estimate by far: the spacing over the whole run
        inside = stamps[len(stamps) // 2 :] if len(stamps) >= 4 else stamps
    return (inside[-1] - inside[0]) / max(len(inside) - 1, 1)


def _measure_handoff(nbytes: int, warmup: int, repeats: int) -> HandoffModel:
    """Thread round trip through two queues / 2 (the median of the medians of
    ``_HANDOFF_BLOCKS`` blocks), plus ``clone()`` seconds per byte."""
    to_worker: queue.SimpleQueue[object] = queue.SimpleQueue()
    back: queue.SimpleQueue[object] = queue.SimpleQueue()

    def echo() -> None:
        while (item := to_worker.get()) is not None:
            back.put(item)

    worker = threading.Thread(target=echo, name="streamflow-profile-echo", daemon=True)
    worker.start()
    token = object()
    blocks: list[float] = []
    try:
        for _ in range(max(warmup, 3)):
            to_worker.put(token)
            back.get()
        for _ in range(_HANDOFF_BLOCKS):
            rtts: list[float] = []
            for _ in range(_HANDOFF_ROUNDS):
                start = time.perf_counter()
                to_worker.put(token)
                back.get()
                rtts.append(time.perf_counter() - start)
            blocks.append(statistics.median(rtts))
    finally:
        to_worker.put(None)
        worker.join()
    buffer = torch.empty(min(nbytes, _MAX_COPY_BYTES), dtype=torch.uint8)
    copy_s = _median_time(buffer.clone, "cpu:0", warmup, repeats)
    return HandoffModel(latency_s=statistics.median(blocks) / 2, s_per_byte=copy_s / buffer.numel())


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
