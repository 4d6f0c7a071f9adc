"""Validation NLL over a whole text with the hidden state carried from start to end."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def bpc(nll_nats: float) -> float:
    return nll_nats / math.log(2)
