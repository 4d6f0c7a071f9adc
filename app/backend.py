"""The model backend: a loaded checkpoint on its device, a prime-state cache, and the batched
step (fused decode + sampling) the scheduler calls from its worker thread.

Everything here is synchronous torch code; the scheduler decides when it runs."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from app.graphs import PaddedStep
from charrnn.checkpoint import Checkpoint
from charrnn.decode import Precision, StepDecoder
from charrnn.generate import warm_up
from charrnn.model import State
from charrnn.quantization import choose_precision
from charrnn.sampling import uniforms


def decode_precision(setting: str, device: torch.device) -> Precision:
    """The decode step's weight precision for ``CHARRNN_DECODE_WEIGHTS`` on ``device``: int8
    where its sums are exact (charrnn/quantization.py), else fp32; ValueError if refused."""
    return choose_precision(setting, device)[0]


@dataclass
class Batch:
    """The rows currently decoding: their next-character logits and recurrent state."""

    logits: torch.Tensor  # [B, V]
    state: State  # each [L, B, H]
    temperature: torch.Tensor  # [B]
    top_k: torch.Tensor  # [B]
    top_p: torch.Tensor  # [B]
    seeds: np.ndarray  # [B] uint64

    def select(self, keep: list[int]) -> Batch:
        idx = torch.tensor(keep, device=self.logits.device)
        return Batch(
            self.logits.index_select(0, idx),
            tuple(s.index_select(1, idx) for s in self.state),
            self.temperature.index_select(0, idx),
            self.top_k.index_select(0, idx),
            self.top_p.index_select(0, idx),
            self.seeds[keep],
        )

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        if len(parts) == 1:
            return parts[0]
        return Batch(
            torch.cat([p.logits for p in parts]),
            tuple(torch.cat(s, dim=1) for s in zip(*(p.state for p in parts), strict=True)),
            torch.cat([p.temperature for p in parts]),
            torch.cat([p.top_k for p in parts]),
            torch.cat([p.top_p for p in parts]),
            np.concatenate([p.seeds for p in parts]),
        )


class ModelBackend:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        cache_size: int = 256,
        weights: Precision = "fp32",
        threads: int | None = None,
        native_kernels: bool = True,
    ):
        self.ckpt = checkpoint
        self.model = checkpoint.model
        self.vocab = checkpoint.vocab
        self.device = device
        self.decoder = StepDecoder(self.model, weights, native_kernels=native_kernels)
        # On CUDA the step is replayed from graphs captured per batch-size bucket.
        self.graphed = (
            PaddedStep(self.decoder, len(self.vocab), device) if (device.type == "cuda") else None
        )
        self.threads = threads
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, State]] = OrderedDict()
        self._cache_lock = threading.Lock()

    @contextlib.contextmanager
    def worker(self) -> Iterator[None]:
        """Held by the thread that runs this backend's steps, for as long as it runs them:
        its torch threads, and inference mode entered once rather than per step (``advance``
        and ``StepDecoder.step`` expect it; a decorator's enter and exit cost ~5 µs of
        GIL-held Python per call, a few per cent of a batch-1 step)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            yield

    @property
    def dtype(self) -> torch.dtype:
        return self.model.head.weight.dtype

    def prime(self, prime: str) -> tuple[torch.Tensor, State, bool]:
        """Logits [1, V] and state after the prime, from the LRU cache when possible."""
        with self._cache_lock:
            hit = self._cache.get(prime)
            if hit is not None:
                self._cache.move_to_end(prime)
                return hit[0], hit[1], True
        logits, state = warm_up(self.decoder, self.vocab.encode(prime))
        if self.cache_size:
            with self._cache_lock:
                self._cache[prime] = (logits, state)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return logits, state, False

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def new_row(
        self, prime: str, temperature: float, top_k: int | None, top_p: float, seed: int
    ) -> tuple[Batch, bool]:
        logits, state, cached = self.prime(prime)
        dev = self.device
        return (
            Batch(
                logits,
                state,
                torch.tensor([temperature], device=dev),
                torch.tensor([top_k or len(self.vocab)], device=dev),
                torch.tensor([top_p], device=dev),
                np.array([seed], dtype=np.uint64),
            ),
            cached,
        )

    @property
    def multi_step(self) -> bool:
        """Whether ``advance`` can make several characters per row in one call."""
        return self.graphed is None and self.decoder.multi_step

    def advance(
        self,
        batch: Batch,
        positions: np.ndarray,
        on_sampled: Callable[[list[list[int]]], None],
        steps: int = 1,
        early: bool = False,
    ) -> Batch:
        """Sample every row's next ``steps`` characters, running them all through the network.

        ``positions`` [B] is each row's count of characters generated so far; with the
        row's seed it keys the row's random draws. The sampled ids go to ``on_sampled``, one
        list per row. ``early`` (one step only) hands them over as soon as they
        exist: on the CPU before the network step, so a request's first character does not
        wait for it. Otherwise, with the native kernels (``multi_step``), the steps are one
        call that pays the Python around a step, and the wait for the GIL after it, once for
        all of them. One device-to-host copy per call. Run it in inference mode (``worker``)."""
        if self.multi_step and not early:
            ids, logits, state = self.decoder.decode(
                batch.logits,
                batch.state,
                batch.temperature,
                batch.top_k,
                batch.top_p,
                torch.from_numpy(batch.seeds.view(np.int64)),
                torch.from_numpy(positions.astype(np.uint64).view(np.int64)),
                steps,
            )
            on_sampled(ids.t().tolist())
            return Batch(logits, state, batch.temperature, batch.top_k, batch.top_p, batch.seeds)
        if steps != 1:
            raise ValueError("several steps per call need the native kernels, and early=False")
        u = torch.from_numpy(uniforms(batch.seeds, positions))
        if self.device.type != "cpu":
            u = u.to(self.device)
        if self.graphed is not None:
            ids, logits, state = self.graphed(
                batch.logits, batch.state, batch.temperature, batch.top_k, batch.top_p, u
            )
            on_sampled(ids[:, None].tolist())
        else:
            ids = self.decoder.sample(batch.logits, batch.temperature, batch.top_k, batch.top_p, u)
            on_sampled(ids[:, None].tolist())
            logits, state = self.decoder.step(ids, batch.state)
        return Batch(logits, state, batch.temperature, batch.top_k, batch.top_p, batch.seeds)
