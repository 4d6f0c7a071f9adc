"""The engine layer, as the API sees it: load the models, resolve the one a request names,
submit a ``GenerationRequest`` and get a ``Handle`` (its events, its result, ``cancel``).
Everything a route may import from the engine is named here; the rest of the package is its
inside (the decode loop, the scheduling policy, the outbox). It imports the runner layer
(app/runner) and ``charrnn``, never the API."""

from app.engine.engine import (
    DefaultModel,
    Engine,
    LoadedModel,
    ModelExists,
    ModelFacts,
    NotReady,
    UnknownModel,
    WarmUpFailed,
)
from app.engine.handle import GenerationFailed, Handle, results
from app.engine.request import (
    Done,
    Event,
    Failed,
    FinishReason,
    GenerationRequest,
    Logprobs,
    Scored,
    TextRun,
    Timings,
)
from app.engine.scheduler import Overloaded, ShuttingDown
from app.runner import Top

__all__ = [
    "DefaultModel",
    "Done",
    "Engine",
    "Event",
    "Failed",
    "FinishReason",
    "GenerationFailed",
    "GenerationRequest",
    "Handle",
    "LoadedModel",
    "Logprobs",
    "ModelExists",
    "ModelFacts",
    "NotReady",
    "Overloaded",
    "Scored",
    "ShuttingDown",
    "TextRun",
    "Timings",
    "Top",
    "UnknownModel",
    "WarmUpFailed",
    "results",
]
