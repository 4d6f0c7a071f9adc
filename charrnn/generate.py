"""Single-request generation: warm up on a prime in one pass, then decode.

The service batches many requests through ``charrnn.decode.StepDecoder`` itself; this module
is the plain loop used by the CLI and as the reference the service must agree with.
"""

from __future__ import annotations

import numpy as np
import torch

from charrnn.controls import Controls, ControlsBatch
from charrnn.decode import StepDecoder
from charrnn.model import CharRNN, State
from charrnn.sampling import SamplingBatch, SamplingParams
from charrnn.textindex import TextIndex
from charrnn.vocab import Vocabulary


def run_prime(decoder: StepDecoder, ids: list[int]) -> tuple[torch.Tensor, State]:
    """Run the prime through the network: the last position's logits [1, V] and the state."""
    device = decoder.model.head.weight.device
    out = decoder.prime(torch.tensor(ids, dtype=torch.long, device=device))
    if device.type == "cuda":
        # CUDA runs asynchronously: without this, whoever times the prime (the service's
        # warmup_ms) times the kernel launches, not the work.
        torch.cuda.synchronize(device)
    return out


@torch.inference_mode()
def generate(
    model: CharRNN,
    vocab: Vocabulary,
    prime: str,
    length: int,
    params: SamplingParams,
    decoder: StepDecoder | None = None,
    controls: Controls | None = None,
    index: TextIndex | None = None,
) -> str:
    """Return ``length`` new characters following ``prime``; with ``controls``, fewer where
    its banned strings leave no character to draw, or where a mask (the copy guard, which
    reads the training text's ``index``) draws "end": the text ends there."""
    decoder = decoder or StepDecoder(model)
    device = model.head.weight.device
    prime_ids = vocab.encode(prime)
    logits, state = run_prime(decoder, prime_ids)
    sampling = SamplingBatch.of([params], len(vocab), device)
    rows = None
    if controls is not None and controls.active:
        rows = ControlsBatch.of(controls, len(vocab), prime_ids, vocab.encode, index)
    if decoder.multi_step and length > 0:
        ids, _, _ = decoder.decode_batch(
            logits, state, sampling, np.zeros(1, np.uint64), length, controls=rows
        )
        return vocab.decode(_until_end(ids[:, 0].tolist(), len(vocab)))
    out: list[int] = []
    for pos in range(length):
        u = sampling.uniforms(np.array([pos], dtype=np.uint64), device)
        nxt, logits, state = decoder.sample_and_step(logits, state, sampling, u, controls=rows)
        out.append(int(nxt[0]))
        if out[-1] == len(vocab):
            break
    return vocab.decode(_until_end(out, len(vocab)))


def _until_end(ids: list[int], end: int) -> list[int]:
    """``ids`` up to the first "end" (id ``end``), which only controls draw."""
    return ids[: ids.index(end)] if end in ids else ids
