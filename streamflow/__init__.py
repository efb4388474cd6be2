"""streamflow: asyncio dataflow for running neural networks over streams.

A :class:`Flow` is a graph of named stages joined by bounded channels with backpressure::

    flow = sf.Flow("demo")
    flow.source("numbers", sf.iterate(range(10))).map("double", double).sink("out", print)
    await flow.run()
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._channel import Channel as Channel
from ._channel import ChannelStatistics as ChannelStatistics
from ._channel import Overflow as Overflow
from ._checkpoint_store import DirectoryStore as DirectoryStore
from ._checkpointer import CheckpointStats as CheckpointStats
from ._checkpoints import CheckpointError as CheckpointError
from ._checkpoints import CheckpointInfo as CheckpointInfo
from ._checkpoints import Checkpoints as Checkpoints
from ._checkpoints import Snapshotting as Snapshotting
from ._describe import FlowDescription as FlowDescription
from ._errors import ChannelClosed as ChannelClosed
from ._errors import ChannelFull as ChannelFull
from ._errors import GraphError as GraphError
from ._errors import StageError as StageError
from ._flowstate import FlowState as FlowState
from ._graph import Composite as Composite
from ._graph import Flow as Flow
from ._graph import KeyedStream as KeyedStream
from ._graph import Stream as Stream
from ._graph import merge as merge
from ._io import Sink as Sink
from ._io import Source as Source
from ._io import collect as collect
from ._io import iterate as iterate
from ._logging import configure_logging as configure_logging
from ._message import AckCallback as AckCallback
from ._message import Message as Message
from ._message import Outcome as Outcome
from ._metrics import StageMetrics as StageMetrics
from ._policy import DeadLetter as DeadLetter
from ._policy import ErrorPolicy as ErrorPolicy
from ._policy import FailedItem as FailedItem
from ._policy import PartialFailure as PartialFailure
from ._policy import Retry as Retry
from ._runtime import RunningFlow as RunningFlow
from ._signals import Interrupted as Interrupted
from ._spec import LOOPS as LOOPS
from ._spec import FlowSpec as FlowSpec
from ._spec import StageSpec as StageSpec
from ._stage import Stage as Stage
from ._stage import StageContext as StageContext
from ._state import KeyedState as KeyedState
from ._window_runner import LateItem as LateItem
from ._windows import Count as Count
from ._windows import Session as Session
from ._windows import Sliding as Sliding
from ._windows import Tumbling as Tumbling
from ._windows import Window as Window
from ._windows import Windower as Windower

if _TYPE_CHECKING:
    from ._live import LiveView as LiveView
    from ._prometheus import FlowCollector as FlowCollector
    from ._prometheus import MetricsServer as MetricsServer
    from ._prometheus import serve_metrics as serve_metrics
    from .parallel import OnlineTrainer as OnlineTrainer
    from .parallel import Pipeline as Pipeline
    from .parallel import pipeline as pipeline

__version__ = "0.1.0"

# Names that need torch, imported on first use so that `import streamflow` stays light.
_LAZY = {
    "pipeline": "streamflow.parallel",
    "Pipeline": "streamflow.parallel",
    "OnlineTrainer": "streamflow.parallel",
    # optional extras: prometheus-client ("prometheus"), rich ("cli")
    "FlowCollector": "streamflow._prometheus",
    "MetricsServer": "streamflow._prometheus",
    "serve_metrics": "streamflow._prometheus",
    "LiveView": "streamflow._live",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamflow' has no attribute {name!r}")


__all__ = [
    "LOOPS",
    "AckCallback",
    "Channel",
    "ChannelClosed",
    "ChannelFull",
    "ChannelStatistics",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStats",
    "Checkpoints",
    "Composite",
    "Count",
    "DeadLetter",
    "DirectoryStore",
    "ErrorPolicy",
    "FailedItem",
    "Flow",
    "FlowCollector",
    "FlowDescription",
    "FlowSpec",
    "FlowState",
    "GraphError",
    "Interrupted",
    "KeyedState",
    "KeyedStream",
    "LateItem",
    "LiveView",
    "Message",
    "MetricsServer",
    "OnlineTrainer",
    "Outcome",
    "Overflow",
    "PartialFailure",
    "Pipeline",
    "Retry",
    "RunningFlow",
    "Session",
    "Sink",
    "Sliding",
    "Snapshotting",
    "Source",
    "Stage",
    "StageContext",
    "StageError",
    "StageMetrics",
    "StageSpec",
    "Stream",
    "Tumbling",
    "Window",
    "Windower",
    "collect",
    "configure_logging",
    "iterate",
    "merge",
    "pipeline",
    "serve_metrics",
]
