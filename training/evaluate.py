"""Validation NLL: the whole held-out tail as one stream, or a fixed sample of it as parallel
streams (sharded across DDP ranks and all-reduced)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from charrnn.decode import StepDecoder
from charrnn.model import CharRNN

# Long enough that per-call overhead vanishes, short enough to bound activation memory.
CHUNK = 2048
# Logit elements (streams x time x vocabulary) one forward call may hold: 64 MiB of fp32.
MAX_LOGITS = 1 << 24
# A sampled stream scores this many characters...
WINDOW = 2048
# ...after reading this many before them (not scored), so it does not start from a blank state
# and the sample estimates the one-stream figure.
BURN_IN = 256


@dataclass(frozen=True)
class Window:
    """Score ``ids[start + 1 : start + 1 + count]``, reading from ``start - burn``."""

    start: int
    burn: int
    count: int


def eval_windows(n: int, chars: int | None) -> list[Window]:
    """The fixed, deterministic sample of ``chars`` predictions from ``n`` ids: the whole text
    as one stream when ``chars`` is None or covers it; else windows of about WINDOW predictions
    at evenly spaced places, each after a BURN_IN of context."""
    whole = Window(0, 0, n - 1)
    if chars is None or chars >= n - 1:
        return [whole]
    streams = math.ceil(chars / WINDOW)
    count = chars // streams
    burn = min(BURN_IN, max(n - 1 - count, 0))
    last = n - 1 - count  # the latest start that fits
    if last < burn:
        return [whole]
    span = last - burn
    starts = [burn + (span * j) // max(streams - 1, 1) for j in range(streams)]
    return [Window(s, burn, count) for s in starts]


@torch.inference_mode()
def windows_nll(
    model: CharRNN,
    ids: np.ndarray | torch.Tensor,
    windows: list[Window],
    device: torch.device | None = None,
) -> tuple[float, int]:
    """Summed NLL (nats) and the number of predictions over ``windows`` of ``ids``, all
    windows of one length run side by side as a batch of streams, the state carried."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    device = device or model.head.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    by_len: dict[tuple[int, int], list[Window]] = {}
    for w in windows:
        by_len.setdefault((w.burn, w.count), []).append(w)
    for (burn, n), group in by_len.items():
        rows = np.stack([ids[w.start - burn : w.start + n + 1] for w in group])
        t, c = _streams_nll(model, rows, burn, device)
        total, count = total + t, count + c
    model.train(was_training)
    return total, count


def _streams_nll(
    model: CharRNN, rows: np.ndarray, burn: int, device: torch.device
) -> tuple[float, int]:
    batch, length = rows.shape
    vocab = model.config.vocab_size
    chunk = max(16, min(CHUNK, MAX_LOGITS // (batch * vocab)))
    total, count, state = 0.0, 0, None
    for start in range(0, length - 1, chunk):
        x = torch.from_numpy(rows[:, start : start + chunk + 1].astype(np.int64)).to(device)
        y, x = x[:, 1:], x[:, :-1]
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
        skip = max(burn - start, 0)  # the burn-in's predictions are read, not scored
        if skip < loss.shape[1]:
            total += loss[:, skip:].double().sum().item()
            count += loss[:, skip:].numel()
    return total, count


def sharded_nll(
    model: CharRNN,
    ids: np.ndarray,
    windows: list[Window],
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
) -> float:
    """Mean NLL over ``windows``, each rank scoring every world-th window, all-reduced."""
    device = device or model.head.weight.device
    total, count = windows_nll(model, ids, windows[rank::world], device)
    if world > 1:
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)


def nll(
    model: CharRNN, ids: np.ndarray | torch.Tensor, chars: int | None = None
) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/char) of ids[1:] given everything before, as one
    stream from a zero state (or over a sample of ``chars`` predictions); returns (nll, number
    of predicted characters)."""
    n = len(ids)
    total, count = windows_nll(model, ids, eval_windows(n, chars))
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
