"""The model runner layer: a checkpoint on its device and the one call the engine makes of it,
``ModelRunner.execute(plan)`` (app/runner/plan.py). It imports only ``charrnn``; the engine
(app/engine) imports it, never the other way round."""

from app.runner.batch import NO_LOGPROBS, Batch, RowLogprobs, Sampled
from app.runner.plan import NewRow, Output, Plan, Primed, PrimeScores, RowKey, RowRun, Top
from app.runner.runner import ModelRunner, decode_precision

__all__ = [
    "NO_LOGPROBS",
    "Batch",
    "ModelRunner",
    "NewRow",
    "Output",
    "Plan",
    "PrimeScores",
    "Primed",
    "RowKey",
    "RowLogprobs",
    "RowRun",
    "Sampled",
    "Top",
    "decode_precision",
]
