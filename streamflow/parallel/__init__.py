"""Layer-wise pipeline partitioning, pipelined inference and online training over the pipeline.

Typical use::

    prof = profile(model, example_batch, ["cpu:0", "cpu:1"])
    p = plan(prof)            # fewer stages than devices when a cut costs more than it gains
    str(p)                    # a table: layers, device and predicted ms per stage
    p.save("plan.json")
"""

from ._costs import HandoffModel, LayerProfile, Profile
from ._layers import named_layers, split_layers
from ._pipeline import Pipeline, PipelineError, PipelinePart, pipeline
from ._plan import Objective, Plan, StagePlan, plan
from ._profile import profile
from ._training import OnlineTrainer, TrainingError
from ._trainmetrics import TrainerMetrics

__all__ = [
    "HandoffModel",
    "LayerProfile",
    "Objective",
    "OnlineTrainer",
    "Pipeline",
    "PipelineError",
    "PipelinePart",
    "Plan",
    "Profile",
    "StagePlan",
    "TrainerMetrics",
    "TrainingError",
    "named_layers",
    "pipeline",
    "plan",
    "profile",
    "split_layers",
]
