"""The model runner layer: a checkpoint on its device and the work the engine asks of it
(primes, the decode step, the per-row logits stage, CUDA graphs). It imports only
``charrnn``; the engine (app/engine) imports it, never the other way round."""

from app.runner.logits import LogitsProcessor
from app.runner.runner import (
    NO_LOGPROBS,
    Batch,
    ModelRunner,
    RowLogprobs,
    Sampled,
    Top,
    decode_precision,
)

__all__ = [
    "NO_LOGPROBS",
    "Batch",
    "LogitsProcessor",
    "ModelRunner",
    "RowLogprobs",
    "Sampled",
    "Top",
    "decode_precision",
]
