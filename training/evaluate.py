"""Validation NLL over a whole text with the hidden state carried from start to end."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from charrnn.decode import StepDecoder
from charrnn.model import CharRNN

# Long enough that per-call overhead vanishes, short enough to bound activation memory.
CHUNK = 2048


@torch.inference_mode()
def nll(model: CharRNN, ids: torch.Tensor, chunk: int = CHUNK) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/char) of ids[1:] given everything before, as one
    stream from a zero state; returns (nll, number of predicted characters)."""
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    ids = ids.view(1, -1)
    for start in range(0, ids.shape[1] - 1, chunk):
        x = ids[:, start : start + chunk]
        y = ids[:, start + 1 : start + chunk + 1]
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total += F.cross_entropy(logits[0], y[0], reduction="sum").item()
        count += y.shape[1]
    model.train(was_training)
    return total / max(count, 1), count


@torch.inference_mode()
def step_nll(decoder: StepDecoder, ids: torch.Tensor) -> tuple[float, int]:
    """Like ``nll``, but one character at a time through the service's decode step, so a
    reduced-precision step (int8) is scored exactly as it serves."""
    total = 0.0
    state = decoder.model.init_state(1)
    for prev, nxt in zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True):
        logits, state = decoder.step(torch.tensor([prev]), state)
        total -= torch.log_softmax(logits[0].double(), -1)[nxt].item()
    return total / max(len(ids) - 1, 1), len(ids) - 1


def bpc(nll_nats: float) -> float:
    return nll_nats / math.log(2)
