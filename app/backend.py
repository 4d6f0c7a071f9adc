"""The model backend: a loaded checkpoint on its device, a prime-state cache, the prime in
parts, and the batched step (fused decode + sampling) the decode thread calls.

Everything here is synchronous torch code; the scheduler decides when it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from app.generation import Top
from app.graphs import PaddedStep
from charrnn.checkpoint import Checkpoint
from charrnn.decode import Precision, StepDecoder
from charrnn.model import State
from charrnn.quantization import choose_precision
from charrnn.sampling import SamplingParams, uniforms


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
    # [B] alternatives each row wants with its logprobs; -1: no logprobs.
    logprobs: np.ndarray

    def select(self, keep: list[int]) -> Batch:
        idx = torch.tensor(keep, device=self.logits.device)
        return Batch(
            self.logits.index_select(0, idx),
            tuple(s.index_select(1, idx) for s in self.state),
            self.temperature.index_select(0, idx),
            self.top_k.index_select(0, idx),
            self.top_p.index_select(0, idx),
            self.seeds[keep],
            self.logprobs[keep],
        )

    def moved(self, logits: torch.Tensor, state: State) -> Batch:
        """The same rows after a step."""
        return dataclasses.replace(self, logits=logits, state=state)

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
            np.concatenate([p.logprobs for p in parts]),
        )


# Per row of a call, the sampled characters' logprobs and alternatives (None for a row that
# did not ask for them).
RowLogprobs = list[tuple[list[float], list[Top] | None] | None]


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
        self._ids_by_code = np.full(max(map(ord, self.vocab.chars)) + 1, -1, dtype=np.int64)
        for i, ch in enumerate(self.vocab.chars):
            self._ids_by_code[ord(ch)] = i
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

    def encode(self, prime: str) -> torch.Tensor:
        """The ids [T] of a prime (validated: every character is in the vocabulary) on the
        device. Through a table by code point: a Python loop over a 4,000-character prime
        holds the GIL ~0.3 ms, which a burst of them takes from the event loop."""
        codes = np.frombuffer(prime.encode("utf-32-le"), dtype=np.uint32)
        return torch.from_numpy(self._ids_by_code[codes]).to(self.device)

    @property
    def prime_align(self) -> int:
        return self.decoder.prime_align

    @property
    def exact_steps(self) -> bool:
        return self.decoder.exact_steps

    def cached_prime(self, prime: str) -> tuple[torch.Tensor, State] | None:
        """Logits [1, V] and state after ``prime``, if they are in the LRU cache."""
        with self._cache_lock:
            hit = self._cache.get(prime)
            if hit is not None:
                self._cache.move_to_end(prime)
            return hit

    def cache_prime(self, prime: str, logits: torch.Tensor, state: State) -> None:
        if not self.cache_size:
            return
        # Copies: the tensors may be views into a larger batch that would stay alive.
        entry = (logits.clone(), tuple(s.clone() for s in state))
        with self._cache_lock:
            self._cache[prime] = entry
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def prime_part(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """A prime continued from ``state`` (None: from zero) over ``ids`` [T]: logits [1, V]
        and the state. Parts give exactly the numbers of one pass (``StepDecoder.prime``)."""
        return self.decoder.prime(ids, state)

    def prime_part_all(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """``prime_part`` keeping the logits after every position: [T, V], for scoring."""
        return self.decoder.prime_all(ids, state)

    def prime_batched(
        self, ids: torch.Tensor, starts: list[State | None], every: bool = False
    ) -> tuple[torch.Tensor, State]:
        """Several primes side by side: row i continues from ``starts[i]`` (None: zero) over
        ``ids[i]`` ([R, T] in all), one batched step per position. Only for decoders with
        ``exact_steps``, where that gives the numbers of ``prime_part``. Returns logits [R, V]
        (with ``every``, after every position: [R, T, V]) and the state [L, R, H]."""
        zero = self.model.init_state(1)
        state = tuple(
            torch.cat([(s if s is not None else zero)[j] for s in starts], dim=1)
            for j in range(len(zero))
        )
        logits = torch.empty(0)
        steps = []
        for t in range(ids.shape[1]):
            logits, state = self.decoder.step(ids[:, t].contiguous(), state)
            if every:
                steps.append(logits)
        return (torch.stack(steps, dim=1) if every else logits), state

    def logprobs(
        self, logits: torch.Tensor, targets: torch.Tensor, n: int
    ) -> tuple[list[float], list[Top] | None]:
        """For each row of ``logits`` [N, V], the logprob of ``targets`` [N] under softmax
        (temperature 1, before top-k/top-p) and, if ``n``, the ``n`` likeliest characters
        with theirs (likeliest first)."""
        lsm = torch.log_softmax(logits.float(), dim=-1)
        chosen = lsm.gather(1, targets.view(-1, 1).to(lsm.device)).view(-1).tolist()
        if not n:
            return chosen, None
        values, idx = lsm.topk(n, dim=-1)
        chars = self.vocab.chars
        top = [
            list(zip([chars[i] for i in row_ids], row_vals, strict=True))
            for row_ids, row_vals in zip(idx.tolist(), values.tolist(), strict=True)
        ]
        return chosen, top

    def new_row(
        self,
        logits: torch.Tensor,
        state: State,
        sampling: SamplingParams,
        logprobs: int | None = None,
    ) -> Batch:
        """A one-row batch that starts from a primed state."""
        dev = self.device
        return Batch(
            logits,
            state,
            torch.tensor([sampling.temperature], device=dev),
            torch.tensor([sampling.top_k or len(self.vocab)], device=dev),
            torch.tensor([sampling.top_p], device=dev),
            np.array([sampling.seed], dtype=np.uint64),
            np.array([-1 if logprobs is None else logprobs]),
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
        on_logprobs: Callable[[RowLogprobs], None] | None = None,
    ) -> Batch:
        """Sample every row's next ``steps`` characters, running them all through the network.

        ``positions`` [B] is each row's count of characters generated so far; with the
        row's seed it keys the row's random draws. The sampled ids go to ``on_sampled``, one
        list per row. ``early`` (one step only) hands them over as soon as they
        exist: on the CPU before the network step, so a request's first character does not
        wait for it. Otherwise, with the native kernels (``multi_step``), the steps are one
        call that pays the Python around a step, and the wait for the GIL after it, once for
        all of them. One device-to-host copy per call. Run it in inference mode (``worker``).

        Rows with ``logprobs`` >= 0 also get each sampled character's logprob and
        alternatives, handed to ``on_logprobs`` just before ``on_sampled``; a call where no
        row asked for them does no more work than before."""
        asking = np.flatnonzero(batch.logprobs >= 0) if on_logprobs else np.empty(0, np.int64)
        if self.multi_step and not early:
            seen = None
            if asking.size:
                seen = torch.empty(steps, *batch.logits.shape, dtype=batch.logits.dtype)
            ids, logits, state = self.decoder.decode(
                batch.logits,
                batch.state,
                batch.temperature,
                batch.top_k,
                batch.top_p,
                torch.from_numpy(batch.seeds.view(np.int64)),
                torch.from_numpy(positions.astype(np.uint64).view(np.int64)),
                steps,
                seen,
            )
            if seen is not None and on_logprobs:
                on_logprobs(self._row_logprobs(batch, asking, seen, ids))
            on_sampled(ids.t().tolist())
            return batch.moved(logits, state)
        if steps != 1:
            raise ValueError("several steps per call need the native kernels, and early=False")
        u = torch.from_numpy(uniforms(batch.seeds, positions))
        if self.device.type != "cpu":
            u = u.to(self.device)
        if self.graphed is not None:
            ids, logits, state = self.graphed(
                batch.logits, batch.state, batch.temperature, batch.top_k, batch.top_p, u
            )
            if asking.size and on_logprobs:
                on_logprobs(self._row_logprobs(batch, asking, batch.logits[None], ids[None]))
            on_sampled(ids[:, None].tolist())
        else:
            ids = self.decoder.sample(batch.logits, batch.temperature, batch.top_k, batch.top_p, u)
            if asking.size and on_logprobs:
                on_logprobs(self._row_logprobs(batch, asking, batch.logits[None], ids[None]))
            on_sampled(ids[:, None].tolist())
            logits, state = self.decoder.step(ids, batch.state)
        return batch.moved(logits, state)

    def _row_logprobs(
        self, batch: Batch, asking: np.ndarray, seen: torch.Tensor, ids: torch.Tensor
    ) -> RowLogprobs:
        """The logprobs of the rows in ``asking``: ``seen`` [S, B, V] the logits each of
        the ``ids`` [S, B] was sampled from."""
        out: RowLogprobs = [None] * len(batch.seeds)
        for b in asking.tolist():
            out[b] = self.logprobs(seen[:, b], ids[:, b], int(batch.logprobs[b]))
        return out
