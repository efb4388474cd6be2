"""One part of an online trainer: consecutive layers on one device, with their own optimizer.

A part counts the memory its schedule makes it hold: the bytes of the tensors autograd saved
for each forward that still waits for its backward (the activations), and the bytes of its
weights (one copy: a backward always uses the live weights, nothing is stashed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ._parts import Part

__all__ = ["Activation", "OptimizerFactory", "TrainPart"]

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Activation:
    """One forward of a part that may still be back-propagated: its input leaf, its output,
    the rows it carried, the part's version when it ran, and the bytes its graph holds."""

    __slots__ = ("nbytes", "out", "rows", "version", "x")

    def __init__(self, x: torch.Tensor, out: torch.Tensor, rows: int, version: int, nbytes: int):
        self.x = x
        self.out = out
        self.rows = rows
        self.version = version
        self.nbytes = nbytes


class _Saved:
    """Saved-tensor hooks for one forward: count what autograd keeps, keep weights live.

    A saved tensor that shares storage with one of the part's parameters is kept as the live
    parameter (a backward that runs after later updates sees the latest weights, never a
    copy). Any other saved tensor is an activation: its storage is counted once, and the hook
    still refuses a backward through an activation that was modified in place afterwards (the
    check autograd itself makes when no hooks are set). A view counts its own bytes, not its
    base's (an input sliced from a data set does not count the data set).
    """

    __slots__ = ("nbytes", "params", "seen")

    def __init__(self, params: frozenset[int]) -> None:
        self.params = params
        self.seen: set[int] = set()
        self.nbytes = 0

    def count(self, t: torch.Tensor) -> bool:
        """Count ``t``'s bytes once; False if it is (a view of) a weight."""
        try:
            if t.untyped_storage().data_ptr() in self.params:
                return False
            key = t.data_ptr()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            key = id(t)
        if key not in self.seen:
            self.seen.add(key)
            self.nbytes += t.numel() * t.element_size()
        return True

    def pack(self, t: torch.Tensor) -> Any:
        if not self.count(t):
            return t
        return (t, t._version)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        t, version = packed
        if t._version != version:
            raise RuntimeError(
                "an activation saved for backward was modified in place after the forward "
                f"(version {version} -> {t._version}); avoid in-place ops on it"
            )
        return t  # type: ignore[no-any-return]


class TrainPart(Part):
    """Consecutive layers pinned to one device, trained by their own optimizer.

    ``version`` counts the optimizer steps applied (weight versions). The part's methods run
    on the part's own thread only.
    """

    def __init__(
        self,
        module: nn.Module,
        target: str,
        *,
        index: int,
        layers: tuple[int, int],
        threads: int,
        optimizer: OptimizerFactory,
    ) -> None:
        super().__init__(module, target, index=index, layers=layers, threads=threads)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = optimizer(self.params) if self.params else None
        self.weight_bytes = sum(t.numel() * t.element_size() for t in _state_tensors(module))
        self.version = 0
        self.staleness = 0
        self.held_bytes = 0
        self.peak_bytes = 0
        self._param_storages: frozenset[int] = frozenset()

    def prepare(self) -> None:
        """On the part's thread: pin intra-op threads, place the weights, enable training
        (the thread may be shared with other stages: each job enables gradients itself)."""
        if self.is_cuda:
            torch.cuda.set_device(self.torch_device)
        else:
            torch.set_num_threads(self.threads)
        self.module.to(self.torch_device).train()
        self._param_storages = frozenset(
            p.untyped_storage().data_ptr() for p in self.module.parameters()
        )

    def forward(self, x: torch.Tensor, rows: int, *, leaf: bool) -> Activation:
        """Run the layers on ``x``, keeping the graph for a later backward.

        ``leaf=True`` makes the input a leaf that requires grad, so the backward yields the
        gradient to send upstream.
        """
        x = x.to(self.torch_device)
        if leaf:
            x = x.detach().requires_grad_()
        saved = _Saved(self._param_storages)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a part must return one tensor, got {type(out).__name__}")
        saved.count(out)
        self.counters.items_in += 1
        self.counters.items_out += 1
        self.held_bytes += saved.nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return Activation(x, out, rows, self.version, saved.nbytes)

    def release(self, acts: Iterable[Activation]) -> None:
        """The graphs of ``acts`` are done with (back-propagated or dropped)."""
        for act in acts:
            self.held_bytes -= act.nbytes

    def step(self, oldest: int, scale: float = 1.0) -> None:
        """Apply the accumulated gradients (times ``scale``) and start a new weight version.

        ``oldest`` is the version the oldest forward behind these gradients ran with; the
        difference to the current version is the update's staleness.
        """
        self.staleness = max(self.staleness, self.version - oldest)
        if self.optimizer is not None:
            if scale != 1.0:
                for p in self.params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.version += 1


def _state_tensors(module: nn.Module) -> Sequence[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]
