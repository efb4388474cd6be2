"""Online training over a pipeline: a model split over device threads learns while the stream
flows, under a schedule chosen by name (see ``_schedules.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import nn

from .._devices import resolve_future
from .._stage import StageContext
from ._choose import Partition, choose_plan
from ._devices import resolve_devices
from ._layers import named_layers
from ._parts import PartsStage, split, timed
from ._pipeline import Pipeline
from ._plan import Objective, Plan
from ._schedules import SCHEDULES, Job, Schedule
from ._trainmetrics import Tally, TrainerMetrics
from ._trainpart import OptimizerFactory, TrainPart

if TYPE_CHECKING:
    from .._channel import Overflow
    from .._graph import Stream
    from .._policy import ErrorPolicy

__all__ = ["OnlineTrainer", "TrainingError"]

ScheduleName = Literal["sync", "partime", "nf1b"]
R = TypeVar("R")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingError(Exception):
    """A layer, the loss or an optimizer raised inside a trainer part; the message names the
    part, its layers and device, and ``__cause__`` is the original exception. The trainer's
    state is then undefined, so every later item of that run fails with the same error."""


class OnlineTrainer:
    """A model split over devices that learns from a stream of ``(x, y)`` pairs.

    Use it as a flow stage: ``stream.map("learn", trainer)``. For each ``(x, y)`` it emits
    the model's output for ``x`` computed *before* any update that used ``y``
    (prequential), then learns from the pair under ``schedule``:

    - ``"sync"``: micro-batches with a flush; exactly sequential training on mini-batches
      of ``microbatches`` items. Staleness 0.
    - ``"partime"``: every part steps on every sample; part ``s`` of ``S`` applies a
      gradient ``2(S-1-s)`` ticks (samples) old. ``microbatches`` is not used.
    - ``"nf1b"``: TiMePReSt, ``microbatches`` pipelined forwards then one backward on the
      latest weights; weight-version gap ``floor((S + N - 2 - s) / N)`` at part ``s``.

    ``model``: an ``nn.Sequential``, a list of modules or an ``fx``-traceable module (see
    :func:`streamflow.parallel.named_layers`); the trainer shares (and trains) its
    parameters. ``partition``: ``"auto"`` profiles the layers on ``example`` and plans the
    cut points by their forward costs, the way :func:`streamflow.pipeline` does (it may use
    fewer parts than devices, and a measured trial of forward pipelines decides between
    plans predicted within noise of each other); a list gives the layers per part
    (deterministic; profiled for the plan's predicted costs when ``example`` is given); a
    :class:`Plan` is used as it is. ``optimizer(params)`` is
    called once per part with that part's parameters. ``loss_fn(output, y)`` returns the
    mean loss over the rows of a batch (PyTorch's default reduction). ``capacity`` is how
    many items may wait per part. Parts appear in flow metrics as ``name[0]``, ...
    A trainer runs in one flow at a time; its weights and optimizer state carry over from
    one run to the next.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
        devices: Sequence[str] | Literal["auto"] = "auto",
        example: torch.Tensor | None = None,
        *,
        loss_fn: LossFn,
        optimizer: OptimizerFactory,
        schedule: ScheduleName = "partime",
        microbatches: int = 4,
        partition: Partition = "auto",
        objective: Objective = "throughput",
        capacity: int = 2,
        window: int = 100,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        for label, value in (("microbatches", microbatches), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if not callable(loss_fn) or not callable(optimizer):
            raise TypeError("loss_fn and optimizer must be callables")
        self._whole = model if isinstance(model, nn.Module) else nn.Sequential(*model)
        devs = resolve_devices(devices)
        layers = named_layers(model, example)
        self.plan = choose_plan(
            layers,
            devs,
            example,
            partition,
            objective,
            caller="OnlineTrainer",
            build=lambda p: Pipeline([m for _, m in layers], p),  # a trial runs inference
        )
        modules = [m for _, m in layers]
        _check_no_shared_parameters(modules, self.plan)
        self.parts = [
            TrainPart(
                module,
                s.device,
                index=i,
                layers=(s.layer_start, s.layer_end),
                threads=threads,
                optimizer=optimizer,
            )
            for i, (module, s, threads) in enumerate(split(modules, self.plan))
        ]
        self.schedule: Schedule = SCHEDULES[schedule](self.parts, microbatches)
        self.loss_fn = loss_fn
        self.in_flight = capacity * len(self.parts) + microbatches
        self._tally = Tally(window)
        self._running = False

    def __repr__(self) -> str:
        devices = ", ".join(p.target for p in self.parts)
        return f"<OnlineTrainer {self.schedule.name!r}, {len(self.parts)} parts on {devices}>"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Predict without learning, in eval mode, running the parts in turn on the calling
        thread (not while the trainer runs in a flow)."""
        modes = [part.module.training for part in self.parts]
        try:
            with torch.no_grad():
                for part in self.parts:
                    x = part.module.eval()(x.to(part.torch_device))
        finally:
            for part, mode in zip(self.parts, modes, strict=True):
                part.module.train(mode)
        return x

    def metrics(self) -> TrainerMetrics:
        """Prequential loss and accuracy, and per-part updates, staleness and memory."""
        tally, parts = self._tally, self.parts
        recent = list(tally.recent)
        recent_rows = sum(r for _, _, r in recent)
        return TrainerMetrics(
            schedule=self.schedule.name,
            samples=tally.samples,
            items=tally.items,
            loss=sum(loss for loss, _, _ in recent) / len(recent) if recent else None,
            accuracy=tally.correct / tally.classified if tally.classified else None,
            recent_accuracy=sum(h for _, h, _ in recent) / recent_rows if recent_rows else None,
            updates=tuple(p.version for p in parts),
            staleness=tuple(p.staleness for p in parts),
            staleness_bound=tuple(self.schedule.staleness_bound(p.index) for p in parts),
            activation_bytes=tuple(p.peak_bytes for p in parts),
            weight_bytes=tuple(p.weight_bytes for p in parts),
        )

    def model(self, device: str | torch.device = "cpu") -> nn.Module:
        """A copy of the trained model, whole, on ``device`` (not while it runs in a flow)."""
        return copy.deepcopy(self._whole).to(device)

    def state_dict(self) -> dict[str, Any]:
        """Everything the trainer learned, to carry on after a restart: the model's weights
        (CPU copies, keyed like ``model().state_dict()``), each part's optimizer state and
        weight version (updates so far), and the prequential counters behind
        :meth:`metrics`: copies, that later training does not change. Take it while the
        trainer is not running in a flow (the parts' threads write these); in a flow with
        checkpoints, the checkpoint takes it at a quiet point."""
        weights = {k: v.detach().cpu().clone() for k, v in self._whole.state_dict().items()}
        return {
            "model": weights,
            "optimizers": [
                None if p.optimizer is None else _cloned(p.optimizer.state_dict())
                for p in self.parts
            ],
            "versions": [p.version for p in self.parts],
            "metrics": self._tally.snapshot(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`state_dict` output, or a plain model ``state_dict`` (weights only).
        Output of an older version without ``versions`` and ``metrics`` loads too (the
        counters then start again from zero)."""
        if isinstance(state.get("model"), Mapping) and "optimizers" in state:
            self._whole.load_state_dict(state["model"])
            optimizers = state["optimizers"]
            if len(optimizers) != len(self.parts):
                raise ValueError(
                    f"the state has {len(optimizers)} optimizers, the trainer {len(self.parts)} parts"
                )
            for part, opt_state in zip(self.parts, optimizers, strict=True):
                if part.optimizer is not None and opt_state is not None:
                    part.optimizer.load_state_dict(opt_state)
            for part, version in zip(self.parts, state.get("versions", ()), strict=False):
                part.version = int(version)
            if "metrics" in state:
                self._tally.restore(state["metrics"])
        else:
            self._whole.load_state_dict(state)

    def add_stages(
        self,
        stream: Stream[Any],
        name: str,
        *,
        capacity: int,
        overflow: Overflow,
        errors: ErrorPolicy,
    ) -> Stream[Any]:
        return stream.map(
            name,
            _TrainerStage(self, name),
            capacity=capacity,
            overflow=overflow,
            errors=errors,
            concurrency=self.in_flight,
        )


def _check_no_shared_parameters(modules: list[nn.Module], chosen: Plan) -> None:
    owner: dict[int, int] = {}
    for i, s in enumerate(chosen.stages):
        for module in modules[s.layer_start : s.layer_end]:
            for p in module.parameters():
                j = owner.setdefault(id(p), i)
                if j != i:
                    raise ValueError(
                        f"parts {j} and {i} share a parameter (tied weights); "
                        "choose a partition that keeps the layers sharing it in one part"
                    )


class _TrainerStage(PartsStage[TrainPart]):
    """The flow stage behind ``stream.map(name, trainer)``: feeds the part threads and
    resolves each item's future with its prediction."""

    def __init__(self, trainer: OnlineTrainer, name: str) -> None:
        super().__init__(trainer.parts, name, trainer.in_flight)
        self.trainer = trainer
        self.schedule = trainer.schedule
        self.title = f"trainer {self.schedule.name}"
        self.futures: dict[int, asyncio.Future[torch.Tensor]] = {}
        self.failure: TrainingError | None = None
        self.closing = False
        # sync: the (x, y) of the mini-batch in progress, and how many of the first jobs
        # are a restored mini-batch learned again (no prediction, no counting)
        self.batch_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replayed = 0

    async def setup(self, context: StageContext) -> None:
        """Place the parts on the flow's device workers (see ``PartsStage.place``) and
        start the schedule. One trainer runs in one flow at a time."""
        trainer = self.trainer
        if trainer._running:
            raise RuntimeError("this OnlineTrainer already runs in a flow; use one at a time")
        trainer._running = True
        self.done = [self._on_done(part) for part in self.parts]
        try:
            await self.place(context, TrainPart.prepare)
        except BaseException:  # no teardown follows a failed setup: release here
            self._close()
            raise
        self.schedule.begin(self._hand, self._finish)

    async def teardown(self) -> None:
        flushed = self.failure is None and not self.futures
        try:
            if flushed:
                for s in reversed(range(len(self.parts))):
                    await self.workers[s].run(_training, self.schedule.flush, (s,))
        finally:
            self._close()
        if flushed and self.failure is not None:
            raise self.failure

    def _close(self) -> None:
        """No more work goes to the part threads (the flow joins them when it ends)."""
        self.closing = True
        self.trainer._running = False

    def process(self, item: Any) -> asyncio.Future[torch.Tensor]:
        """Start ``item`` on the first part's thread; the future resolves on the loop."""
        if self.failure is not None:
            raise self.failure
        x, y = _pair(item)
        rows = int(x.shape[0]) if x.dim() > 1 else 1
        assert self.loop is not None
        future: asyncio.Future[torch.Tensor] = self.loop.create_future()
        k = self._started
        self.futures[k] = future
        self.started()
        if self.schedule.name != "partime":
            if k % self.schedule.microbatches == 0:
                self.batch_pairs = []
            self.batch_pairs.append((x, y))
        self._hand(0, self.schedule.forward, 0, Job(k, x, y, rows))
        return future

    # -- checkpoints -------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """What the trainer learned, at a checkpoint (the flow is quiet: every prediction
        is out). Every part first finishes the work queued on it, then:

        - ``sync``: the state is taken in the mini-batch in progress; its items so far are
          kept (``pending``) and learned again, silently, on restore, so training goes on
          exactly as without the checkpoint (or the crash);
        - ``nf1b``: the complete mini-batches in flight are applied and the one in
          progress is forwarded again from its first item (kept as ``pending`` too): the
          checkpoint falls on a mini-batch boundary;
        - ``partime``: the gradients in flight are applied at once, and the pipeline
          starts over (it fills again: ``2(S-1-s)`` samples without a gradient at part
          ``s``).

        Every item is learned exactly once in each case."""
        if self.failure is not None:
            raise self.failure
        n, schedule = len(self.parts), self.schedule
        for s in [*range(n), *reversed(range(n))]:  # forwards, then gradients, drained
            await self.workers[s].run(_noop)
        m = schedule.microbatches
        pending = [] if schedule.name == "partime" or not self._started % m else self.batch_pairs
        pending = list(pending)
        if schedule.resets:
            for s in reversed(range(n)):
                await self.workers[s].run(_training, schedule.settle, (s,))
        if self.failure is not None:
            raise self.failure
        state = await self.workers[0].run(self.trainer.state_dict)
        if schedule.resets:
            schedule.begin(self._hand, self._finish)
            self._started = self._finished = self.replayed = 0
            self._replay(pending)
        return {"trainer": state, "pending": pending}

    async def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's :meth:`snapshot` (after setup, before the first item); the
        mini-batch in progress is learned again, silently."""
        await self.workers[0].run(self.trainer.load_state_dict, state["trainer"])
        self._replay(state["pending"])

    def _replay(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start ``pairs`` as the first jobs of the run, without predicting or counting
        them (they were, before the checkpoint)."""
        self.replayed = self._started + len(pairs)
        for x, y in pairs:
            k = self._started
            self.started()
            if k % self.schedule.microbatches == 0:
                self.batch_pairs = []
            self.batch_pairs.append((x, y))
            rows = int(x.shape[0]) if x.dim() > 1 else 1
            self._hand(0, self.schedule.forward, 0, Job(k, x, y, rows))

    def _hand(self, s: int, fn: Callable[..., None], *args: Any) -> None:
        if not self.closing:
            part = self.parts[s]
            self.workers[s].submit(_training, (timed, (part, fn, args)), self.done[s])

    def _finish(self, job: Job, out: torch.Tensor) -> torch.Tensor:
        """On the last part's thread: emit the prediction, then return the loss. A job
        learned again from a checkpoint (``replayed``) was predicted and counted before."""
        pred = out.detach()
        replay = job.k < self.replayed
        if replay:
            self._finished += 1
        else:
            self.deliver(job.k, pred, None)
        y = job.y.to(out.device)
        loss = self.trainer.loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError("loss_fn must return a scalar tensor (use a mean reduction)")
        if not replay:
            self.trainer._tally.add(pred, y, loss.detach(), job.rows)
        return loss.reshape(())

    def resolve(self, key: Any, result: Any, error: BaseException | None) -> None:
        future = self.futures.pop(key, None)
        if future is not None:
            resolve_future(future, result, error)

    def _on_done(self, part: TrainPart) -> Callable[[Any, BaseException | None], None]:
        def done(result: Any, error: BaseException | None) -> None:  # on the part's thread
            if error is None or self.failure is not None:
                return
            failure = TrainingError(f"{part.describe(self.name)}: {type(error).__name__}: {error}")
            failure.__cause__ = error
            self.failure = failure
            assert self.loop is not None
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._fail_all, failure)

        return done

    def _fail_all(self, failure: TrainingError) -> None:
        futures, self.futures = self.futures, {}
        for future in futures.values():
            resolve_future(future, None, failure)
            if not future.cancelled():
                future.exception()  # the runner awaits only the first: don't log the rest


def _cloned(value: Any) -> Any:
    """``value`` with every tensor in it copied (to the CPU) and every container rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cloned(v) for v in value)
    return value


def _noop() -> None:
    """A job that returns once everything queued on a part's thread before it is done."""


def _training(fn: Callable[..., R], args: tuple[Any, ...]) -> R:
    """Run a schedule's job with gradients on (the part's thread may be shared with stages
    that run without)."""
    with torch.enable_grad():
        return fn(*args)


def _pair(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = item
    except (TypeError, ValueError):
        raise TypeError(f"OnlineTrainer consumes (x, y) pairs, got {type(item).__name__}") from None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    return x, y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
