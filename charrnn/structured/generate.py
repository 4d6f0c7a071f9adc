"""The single-request constrained loop: the reference the service agrees with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from charrnn.decode import StepDecoder
from charrnn.generate import run_prime
from charrnn.model import CharRNN
from charrnn.sampling import SamplingParams, uniforms
from charrnn.structured.matcher import Grammar, advance, fill_masks, new_masks
from charrnn.vocab import Vocabulary


@dataclass(frozen=True)
class ConstrainedText:
    text: str
    finish_reason: Literal["stop", "length"]
    matched: bool  # whether ``text`` is a complete match


@torch.inference_mode()
def generate_constrained(
    model: CharRNN,
    vocab: Vocabulary,
    prime: str,
    length: int,
    params: SamplingParams,
    grammar: Grammar,
    decoder: StepDecoder | None = None,
) -> ConstrainedText:
    """At most ``length`` new characters after ``prime`` that keep the text a possible start
    of a ``grammar`` match (the prime is not part of it). Each step draws one character with
    the row's mask, or "end"; the i-th draw uses the uniform of (seed, i), as
    ``charrnn.generate.generate`` does. It stops at "end", where nothing may follow, or after
    ``length`` characters."""
    decoder = decoder or StepDecoder(model)
    device = model.head.weight.device
    logits, state = run_prime(decoder, vocab.encode(prime))
    t = torch.tensor([params.temperature], device=device)
    k = torch.tensor([params.top_k or len(vocab)], device=device)
    p = torch.tensor([params.top_p], device=device)
    seed = np.array([params.seed], dtype=np.uint64)
    matcher = grammar.matcher()
    masks = new_masks(1, vocab)
    out: list[int] = []
    reason: Literal["stop", "length"] = "length"
    for pos in range(length):
        if matcher.done:
            reason = "stop"
            break
        fill_masks([(0, matcher)], masks)
        u = torch.from_numpy(uniforms(seed, np.array([pos], dtype=np.uint64))).to(device)
        nxt = decoder.sample(logits, t, k, p, u, masks.to(device))
        char = int(nxt[0])
        if char == matcher.end:
            reason = "stop"
            break
        advance([(matcher, char)])
        out.append(char)
        if pos + 1 < length:
            logits, state = decoder.step(nxt, state)
    else:
        # The last character may have completed a match that cannot go on: nothing was cut.
        if matcher.done and length > 0:
            reason = "stop"
    return ConstrainedText(vocab.decode(out), reason, matcher.matched)
