"""Work pinned to a GPU: its own CUDA stream, inputs moved on entry, no sync on the loop.

Imported only when a stage is pinned to ``"cuda:N"`` (the core does not need torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._devices import parse_device
from ._message import Message

__all__ = ["CudaPlacement"]


class CudaPlacement:
    """Runs one stage's function on GPU N, on a CUDA stream of the stage's own.

    Per call, on the device's worker thread (never on the event loop): the tensors in the
    argument (a tensor, or tensors in a tuple, list or dict, or in a Message's value) are
    copied to the GPU without blocking the host, the function runs with the stage's stream
    current, and the thread waits for an event recorded after it, so the result is ready
    when it moves on. Tensors that arrive already on the GPU are recorded on the stage's
    stream, and the tensors of the result on the device's default stream, so that the
    caching allocator never reuses their memory while another stream may still read it.
    """

    def __init__(self, device: str) -> None:
        index = parse_device(device)[1]
        self.device = device
        self.index = 0 if index is None else index
        self.stream: Any = None

    def prepare(self) -> None:
        """On the worker thread: check the GPU, make it current, create the stream."""
        try:
            import torch
        except ModuleNotFoundError:
            raise RuntimeError(f"{self.device} needs PyTorch: pip install torch") from None
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.index >= count:
            raise RuntimeError(
                f"{self.device} is not available ({count} CUDA device(s) here); pin the stage "
                "to 'cpu:N' or choose the device when the flow is built"
            )
        torch.cuda.set_device(self.index)
        self.stream = torch.cuda.Stream(self.index)  # type: ignore[no-untyped-call]

    def wrap(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``fn`` as it runs on the worker thread: on the stage's stream, inputs moved."""

        def call(arg: Any) -> Any:
            return self.run(fn, arg)

        return call

    def run(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """``fn(arg)`` on the stage's stream, ``arg``'s tensors moved to the GPU first."""
        import torch

        stream = self.stream
        target = torch.device("cuda", self.index)
        with torch.cuda.stream(stream):
            if isinstance(arg, Message):
                arg.value = _placed(arg.value, target, stream)
            else:
                arg = _placed(arg, target, stream)
            result = fn(arg)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(stream)
        done.synchronize()  # blocks this worker thread only
        default = torch.cuda.default_stream(target)
        for tensor in _tensors(result):
            if tensor.device == target:
                tensor.record_stream(default)
        return result


def _placed(value: Any, target: Any, stream: Any) -> Any:
    """``value`` with its tensors on ``target`` (copied on the current stream)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.device == target:
            value.record_stream(stream)  # made on another stream: keep its memory for ours
            return value
        if value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()  # a non-blocking copy needs page-locked memory
        return value.to(target, non_blocking=True)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_placed(v, target, stream) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(_placed(v, target, stream) for v in value)
    if isinstance(value, dict):
        return {k: _placed(v, target, stream) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []
