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
from charrnn.model import CharRNN, State

# Positions one call of the recurrence may cover (streams x time): long enough that the
# per-call overhead vanishes, short enough to bound activation memory.
RECUR_POSITIONS = 1 << 16
CHUNK = 2048  # time steps per call at most
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
    """The recurrence runs over long chunks (few calls: oneDNN re-packs its weights on each);
    the head and the loss over slices of them, so the logits stay within MAX_LOGITS even with
    a vocabulary of thousands; the burn-in's outputs skip the head."""
    batch, length = rows.shape
    head_len = max(1, MAX_LOGITS // (batch * model.config.vocab_size))
    chunk = max(16, min(CHUNK, RECUR_POSITIONS // batch))
    total, count, state = 0.0, 0, None
    for start in range(0, length - 1, chunk):
        x = torch.from_numpy(rows[:, start : start + chunk + 1].astype(np.int64)).to(device)
        y, x = x[:, 1:], x[:, :-1]
        out, state = _recur(model, x, state)
        for a in range(max(burn - start, 0), out.shape[1], head_len):
            logits = model.head(out[:, a : a + head_len])
            loss = F.cross_entropy(
                logits.float().transpose(1, 2), y[:, a : a + head_len], reduction="sum"
            )
            total += float(loss)
            count += logits.shape[0] * logits.shape[1]
    return total, count


def _recur(model: CharRNN, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
    """The model's forward pass up to the head (in eval mode: no dropout)."""
    h = model.embed(x)
    if state is None:
        out, new = model.rnn(h)
    else:
        out, new = model.rnn(h, state if model.n_state == 2 else state[0])
    return out, tuple(new) if isinstance(new, tuple) else (new,)


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


def utf8_bytes(chars: str, ids: np.ndarray, windows: list[Window]) -> int:
    """The UTF-8 size of the characters the windows predict (``chars``: the vocabulary), so a
    model's score can be put per byte, comparable across vocabularies and with byte models."""
    sizes = np.array([len(c.encode("utf-8")) for c in chars], dtype=np.int64)
    return sum(int(sizes[ids[w.start + 1 : w.start + 1 + w.count]].sum()) for w in windows)
