"""Single-request generation: warm up on a prime in one pass, then decode.

The service batches many requests through ``charrnn.decode.StepDecoder`` itself; this module
is the plain loop used by the CLI and as the reference the service must agree with.
"""

from __future__ import annotations

import numpy as np
import torch

from charrnn.decode import StepDecoder
from charrnn.model import CharRNN, State
from charrnn.sampling import SamplingBatch, SamplingParams
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
) -> str:
    """Return ``length`` new characters following ``prime``."""
    decoder = decoder or StepDecoder(model)
    device = model.head.weight.device
    logits, state = run_prime(decoder, vocab.encode(prime))
    sampling = SamplingBatch.of([params], len(vocab), device)
    if decoder.multi_step and length > 0:
        ids, _, _ = decoder.decode_batch(logits, state, sampling, np.zeros(1, np.uint64), length)
        return vocab.decode(ids[:, 0].tolist())
    out: list[int] = []
    for pos in range(length):
        u = sampling.uniforms(np.array([pos], dtype=np.uint64), device)
        nxt, logits, state = decoder.sample_and_step(logits, state, sampling, u)
        out.append(int(nxt[0]))
    return vocab.decode(out)
