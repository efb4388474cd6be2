"""Layer-wise pipeline partitioning: split a model, profile its layers, plan stages.

Typical use::

    prof = profile(model, example_batch, ["cpu:0", "cpu:1"])
    p = plan(prof)            # fewer stages than devices when a cut costs more than it gains
    print(p)
    p.save("plan.json")
"""

from ._costs import HandoffModel, LayerProfile, Profile
from ._layers import named_layers, split_layers
from ._pipeline import Pipeline, PipelineError, PipelinePart, pipeline
from ._plan import Objective, Plan, StagePlan, plan
from ._profile import profile

__all__ = [
    "HandoffModel",
    "LayerProfile",
    "Objective",
    "Pipeline",
    "PipelineError",
    "PipelinePart",
    "Plan",
    "Profile",
    "StagePlan",
    "named_layers",
    "pipeline",
    "plan",
    "profile",
    "split_layers",
]
