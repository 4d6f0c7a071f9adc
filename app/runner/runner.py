"""The model runner: a loaded checkpoint on its device, and the one call the decode loop makes
of it, ``execute(plan)`` (app/runner/plan.py; its state across calls is app/runner/execute.py).

Underneath, the work in explicit phases, with no callbacks, that ``execute`` combines:

- Primes: ``prime`` (a part, continued from a state), ``prime_all`` (keeping the logits after
  every position, for scoring) and ``prime_batched`` (several primes side by side). Each gives
  logits and a state; a prime-state LRU cache saves repeating popular primes.
- The decode step on a ``Batch`` of rows: ``sample`` draws one character per row (through the
  per-row stage, app/runner/stage.py) and ``forward`` runs the network on it; or ``decode``
  makes several characters per row in one call: one fused call (the native kernels; a CUDA
  graph) when no row has per-row work, runs of masked steps when rows are constrained, else
  one step at a time. Each returns the ids per row and each row's logprobs.

Everything here is synchronous torch code; the engine decides when it runs."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from app.runner.batch import NO_LOGPROBS, Batch, RowLogprobs, Sampled
from app.runner.execute import Executor
from app.runner.graphs import PaddedStep
from app.runner.plan import Output, Plan, Top
from app.runner.stage import BatchStage, RowStage, network_chars
from charrnn.checkpoint import Checkpoint
from charrnn.controls import DEFAULT, Controls, ControlsBatch
from charrnn.decode import Precision, StepDecoder
from charrnn.model import State
from charrnn.quantization import choose_precision
from charrnn.sampling import SamplingBatch, SamplingParams, uniforms
from charrnn.structured import Matcher, new_masks
from charrnn.textindex import TextIndex


def decode_precision(setting: str, device: torch.device) -> tuple[Precision, str]:
    """The decode step's weight precision for ``CHARRNN_DECODE_WEIGHTS`` on ``device`` and
    why: int8 where its sums are exact (charrnn/quantization.py), else fp32; ValueError if
    the setting is refused."""
    return choose_precision(setting, device)


class ModelRunner:
    def __init__(
        self,
        checkpoint: Checkpoint,
        device: torch.device,
        *,
        cache_size: int = 256,
        weights: Precision = "fp32",
        threads: int | None = None,
        native_kernels: bool = True,
        decode_reason: str = "",
        index: TextIndex | None = None,
    ):
        self.ckpt = checkpoint
        # The training text's index, for the copy guard (None: the model has none).
        self.index = index
        self.decode_reason = decode_reason  # why the step runs in this precision
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
        """Held by the thread that runs this runner's steps, for as long as it runs them:
        its torch threads, and inference mode entered once rather than per step (a
        decorator's enter and exit would hold the GIL for microseconds on every call)."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            yield

    @property
    def dtype(self) -> torch.dtype:
        return self.model.head.weight.dtype

    def encode(self, prime: str) -> torch.Tensor:
        """The ids [T] of a prime (validated: every character is in the vocabulary) on the
        device, through a table by code point: a Python loop over a long prime would hold the
        GIL, which a burst of them takes from the event loop."""
        codes = np.frombuffer(prime.encode("utf-32-le"), dtype=np.uint32)
        return torch.from_numpy(self._ids_by_code[codes]).to(self.device)

    # -- what the scheduling policy needs to know ----------------------------------------------

    @property
    def prime_align(self) -> int:
        return self.decoder.prime_align

    @property
    def exact_steps(self) -> bool:
        return self.decoder.exact_steps

    @property
    def multi_step(self) -> bool:
        """Whether ``decode`` can make several characters per row in one call."""
        return self.graphed is None and self.decoder.multi_step

    def fusable(self, batch: Batch) -> bool:
        """Whether ``decode`` can run ``batch`` as one fused call (native kernels or a CUDA
        graph), which samples inside: only where no row has per-row work."""
        if batch.stage is None:
            return self.multi_step or self.graphed is not None
        # The native call reads the controls; a CUDA graph captures none.
        return self.multi_step and batch.stage.fusable

    @property
    def splits_early(self) -> bool:
        """Whether sampling before the step hands a row its first character sooner: on the
        CPU the ids exist before the network runs; on CUDA they reach the host after it."""
        return self.device.type == "cpu"

    # -- the prime cache -----------------------------------------------------------------------

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

    # -- primes --------------------------------------------------------------------------------

    def prime(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """A prime continued from ``state`` (None: from zero) over ``ids`` [T]: logits [1, V]
        and the state. Parts give exactly the numbers of one pass (``StepDecoder.prime``)."""
        return self.decoder.prime(ids, state)

    def prime_all(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """``prime`` keeping the logits after every position: [T, V], for scoring."""
        return self.decoder.prime_all(ids, state)

    def prime_batched(
        self, ids: torch.Tensor, starts: list[State | None], every: bool = False
    ) -> tuple[torch.Tensor, State]:
        """Several primes side by side: row i continues from ``starts[i]`` (None: zero) over
        ``ids[i]`` ([R, T] in all), one batched step per position. Only for decoders with
        ``exact_steps``, where that gives the numbers of ``prime``. Returns logits [R, V]
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

    # -- the decode step -----------------------------------------------------------------------

    def new_row(
        self,
        logits: torch.Tensor,
        state: State,
        sampling: SamplingParams,
        logprobs: int | None = None,
        constraint: Matcher | None = None,
        controls: Controls = DEFAULT,
        prime: str = "",
    ) -> Batch:
        """A one-row batch that starts from a primed state. ``constraint``: the row's matcher;
        ``controls``: its generation controls, their state taken from ``prime`` (both held
        and advanced by the per-row stage)."""
        stage = None
        if constraint is not None or controls.active:
            state_of_controls = None
            if controls.active:
                state_of_controls = ControlsBatch.of(
                    controls,
                    len(self.vocab),
                    self.vocab.encode(prime),
                    self.vocab.encode,
                    self.index,
                )
            row = RowStage(constraint, state_of_controls)
            stage = BatchStage.of(row, self._mask_words, len(self.vocab))
        return Batch(
            logits,
            state,
            SamplingBatch.of([sampling], len(self.vocab), self.device),
            np.array([-1 if logprobs is None else logprobs]),
            stage,
        )

    @functools.cached_property
    def _mask_words(self) -> int:
        return new_masks(1, self.vocab).shape[1]

    def sample(self, batch: Batch, positions: np.ndarray) -> Sampled:
        """One character per row from the batch's logits, through each row's stage.
        ``positions`` [B] is each row's count of characters generated so far; with the row's
        seed it keys the row's draw."""
        ids, chars = self._draw(
            batch, batch.logits, batch.sampling.uniforms(positions, self.device)
        )
        return Sampled(ids[None], self._row_logprobs(batch, batch.logits[None], chars[None]))

    def forward(self, batch: Batch, sampled: Sampled) -> Batch:
        """The batch after the network has read the characters just sampled."""
        return self.read(batch, network_chars(sampled.ids[-1], batch.stage))

    def read(self, batch: Batch, chars: torch.Tensor) -> Batch:
        """The batch after the network has read ``chars`` [B]."""
        logits, state = self.decoder.step(chars, batch.state)
        return batch.moved(logits, state)

    def _draw(
        self, batch: Batch, logits: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids drawn from ``logits`` with the uniforms ``u`` (through the rows' stage:
        masks filled, then the matchers moved on), and the characters the network reads
        next."""
        stage = batch.stage
        if stage is None:
            ids = self.decoder.sample(logits, *batch.sampling.filters, u)
            return ids, ids
        masks = stage.fill().to(self.device) if stage.matchers else None
        ids = self.decoder.sample(
            logits, *batch.sampling.filters, u, masks, controls=stage.controls
        )
        if stage.matchers:
            stage.advance(ids.tolist())
        return ids, network_chars(ids, stage)

    def decode(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]:
        """Up to ``steps`` characters per row, sampled and run through the network in one call:
        the same ids as ``sample`` then ``forward`` per character, however the characters are
        split into calls. One fused call (the native kernels; a CUDA graph) where no row has
        per-row work; runs of masked steps in one native call each where only constraints do;
        else one step at a time here. The ids returned have the steps that ran (a masked run
        may stop early). Several steps need ``multi_step``. Run it in inference mode
        (``worker``)."""
        if steps > 1 and not self.multi_step:
            raise ValueError("several steps per call need the native kernels")
        if self.fusable(batch):
            return self._fused(batch, positions, steps)
        if self.multi_step and batch.stage is not None and batch.stage.matchers:
            return self._masked(batch, batch.stage, positions, steps)
        return self._stepwise(batch, positions, steps)

    def _fused(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]:
        if self.graphed is not None:
            if steps != 1:
                raise ValueError("a CUDA graph runs one step per call")
            u = batch.sampling.uniforms(positions, self.device)
            ids, logits, state = self.graphed(batch.logits, batch.state, batch.sampling, u)
            sampled = Sampled(ids[None], self._row_logprobs(batch, batch.logits[None], ids[None]))
            return sampled, batch.moved(logits, state)
        seen = None
        if batch.logprobs.max() >= 0:
            seen = torch.empty(steps, *batch.logits.shape, dtype=batch.logits.dtype)
        controls = batch.stage.controls if batch.stage is not None else None
        ids, logits, state = self.decoder.decode_batch(
            batch.logits, batch.state, batch.sampling, positions, steps, seen, controls=controls
        )
        # A row that drew "end" (its bans or copy guard left nothing) has no logprob there.
        logprobs = self._row_logprobs(batch, seen, network_chars(ids, batch.stage))
        return Sampled(ids, logprobs), batch.moved(logits, state)

    def _stepwise(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]:
        """``sample`` then ``forward``, ``steps`` times, in one tight loop (without the native
        kernels, or on CUDA with per-row work)."""
        rows = len(batch)
        at = (positions[None, :] + np.arange(steps, dtype=np.uint64)[:, None]).reshape(-1)
        u = torch.from_numpy(uniforms(np.tile(batch.sampling.seeds, steps), at)).view(steps, rows)
        u = u.to(self.device)
        logits, state = batch.logits, batch.state
        drawn, read, seen = [], [], []
        asking = batch.logprobs.max() >= 0
        for s in range(steps):
            ids, chars = self._draw(batch, logits, u[s])
            if asking:
                seen.append(logits)
            drawn.append(ids)
            read.append(chars)
            logits, state = self.decoder.step(chars, state)
        seen_all = torch.stack(seen) if asking else None
        logprobs = self._row_logprobs(batch, seen_all, torch.stack(read))
        return Sampled(torch.stack(drawn), logprobs), batch.moved(logits, state)

    def _masked(
        self, batch: Batch, stage: BatchStage, positions: np.ndarray, steps: int
    ) -> tuple[Sampled, Batch]:
        """Runs of masked steps in one native call each; the stage guesses how long the
        masks hold and replays where one did not (``BatchStage.masked_steps``)."""
        asking = batch.logprobs.max() >= 0
        seeds = torch.from_numpy(batch.sampling.seeds.view(np.int64))
        at = torch.from_numpy(positions.view(np.int64))

        def call(n: int, masks: torch.Tensor):  # type: ignore[no-untyped-def]
            seen = torch.empty(n, *batch.logits.shape) if asking else None
            ids, logits, state = self.decoder.decode(
                batch.logits,
                batch.state,
                *batch.sampling.filters,
                seeds,
                at,
                n,
                seen,
                masks,
                controls=stage.controls,  # read at each call: a replay restores them first
            )
            return ids, logits, state, seen

        ids, logits, state, seen = stage.masked_steps(call, steps)
        logprobs = self._row_logprobs(batch, seen, network_chars(ids, stage))
        return Sampled(ids, logprobs), batch.moved(logits, state)

    def _row_logprobs(
        self, batch: Batch, seen: torch.Tensor | None, ids: torch.Tensor
    ) -> list[RowLogprobs]:
        """Each row's logprobs, ``NO_LOGPROBS`` for the rows that did not ask: ``seen``
        [S, B, V] the logits each of the ``ids`` [S, B] was sampled from (None when no row
        asked)."""
        out = [NO_LOGPROBS] * len(batch)
        if seen is None:
            return out
        for b in np.flatnonzero(batch.logprobs >= 0).tolist():
            out[b] = self.logprobs(seen[:, b], ids[:, b], int(batch.logprobs[b]))
        return out

    # -- the one call the decode loop makes ----------------------------------------------------

    def execute(self, plan: Plan) -> Output:
        """Carry out one iteration's ``plan`` (app/runner/plan.py) and say what came of it."""
        return self._executor.execute(plan)

    @functools.cached_property
    def _executor(self) -> Executor:
        return Executor(self)
