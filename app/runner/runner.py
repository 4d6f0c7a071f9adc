"""The model runner: a loaded checkpoint on its device, and the work the decode thread asks of
it, in explicit phases with no callbacks.

- Primes: ``prime`` (a part, continued from a state), ``prime_all`` (keeping the logits after
  every position, for scoring) and ``prime_batched`` (several primes side by side). Each gives
  logits and a state; a prime-state LRU cache saves repeating popular primes.
- The decode step on a ``Batch`` of rows: ``sample`` draws one character per row (through the
  per-row logits stage, app/runner/logits.py) and ``forward`` runs the network on it; or
  ``decode`` does both for several characters per row in one fused call (the native kernels;
  a CUDA graph) when no row has a logits processor or a constraint (app/runner/constraints.py;
  a constrained row may also draw "end", id V). Each returns the ids per row, and the
  logprobs the rows asked for.

Everything here is synchronous torch code; the engine decides when it runs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.runner import logits as stage
from app.runner.constraints import MAX_RUN, RowConstraints
from app.runner.graphs import PaddedStep
from app.runner.logits import LogitsProcessor, RowStage
from charrnn.checkpoint import Checkpoint
from charrnn.decode import Precision, StepDecoder
from charrnn.model import State
from charrnn.quantization import choose_precision
from charrnn.sampling import SamplingBatch, SamplingParams, uniforms
from charrnn.structured import Matcher, new_masks

# One character's likeliest alternatives, likeliest first: (character, logprob).
Top = list[tuple[str, float]]
# One row's part of a call: its characters' logprobs and their alternatives (None where the
# row asked for none); a row that asked for no logprobs has NO_LOGPROBS, so every reader
# takes every row the same way, whatever the other rows of the call asked for.
RowLogprobs = tuple[list[float] | None, list[Top] | None]
NO_LOGPROBS: RowLogprobs = (None, None)


def decode_precision(setting: str, device: torch.device) -> tuple[Precision, str]:
    """The decode step's weight precision for ``CHARRNN_DECODE_WEIGHTS`` on ``device`` and
    why: int8 where its sums are exact (charrnn/quantization.py), else fp32; ValueError if
    the setting is refused."""
    return choose_precision(setting, device)


@dataclass
class Batch:
    """The rows currently decoding: their next-character logits, recurrent state, sampling
    parameters, the logprobs each wants (-1: none), their logits stages (None: none) and
    the constrained rows' matchers and masks (None: no row has a constraint)."""

    logits: torch.Tensor  # [B, V]
    state: State  # each [L, B, H]
    sampling: SamplingBatch
    logprobs: np.ndarray  # [B]
    stages: list[RowStage | None]
    constraints: RowConstraints | None = None

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def staged(self) -> bool:
        """Whether some row has logits processors."""
        return any(s is not None for s in self.stages)

    def select(self, keep: list[int]) -> Batch:
        idx = torch.tensor(keep, device=self.logits.device)
        return Batch(
            self.logits.index_select(0, idx),
            tuple(s.index_select(1, idx) for s in self.state),
            self.sampling.select(keep),
            self.logprobs[keep],
            [self.stages[i] for i in keep],
            self.constraints.select(keep) if self.constraints is not None else None,
        )

    def moved(self, logits: torch.Tensor, state: State) -> Batch:
        """The same rows after a step."""
        return dataclasses.replace(self, logits=logits, state=state)

    @staticmethod
    def concat(parts: Sequence[Batch]) -> Batch:
        if len(parts) == 1:
            return parts[0]
        return Batch(
            torch.cat([p.logits for p in parts]),
            tuple(torch.cat(s, dim=1) for s in zip(*(p.state for p in parts), strict=True)),
            SamplingBatch.concat([p.sampling for p in parts]),
            np.concatenate([p.logprobs for p in parts]),
            [s for p in parts for s in p.stages],
            RowConstraints.concat([(p.constraints, len(p)) for p in parts]),
        )


@dataclass
class Sampled:
    """What one call drew: ``ids`` [S, B] (S characters for each of B rows) and each row's
    logprobs (``NO_LOGPROBS`` for a row that did not ask)."""

    ids: torch.Tensor
    logprobs: list[RowLogprobs]

    def runs(self) -> list[list[int]]:
        """Each row's characters, in order."""
        return self.ids.t().tolist()


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
    ):
        self.ckpt = checkpoint
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
        """Whether ``decode`` can run ``batch``: a fused call (native kernels or a CUDA graph)
        samples inside, so no row may need its logits stage or a constraint's mask."""
        return (
            (self.multi_step or self.graphed is not None)
            and not batch.staged
            and batch.constraints is None
        )

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
        processors: Sequence[LogitsProcessor] = (),
        constraint: Matcher | None = None,
    ) -> Batch:
        """A one-row batch that starts from a primed state (``constraint``: the row's matcher,
        which ``sample`` advances)."""
        words = self._mask_words
        return Batch(
            logits,
            state,
            SamplingBatch.of([sampling], len(self.vocab), self.device),
            np.array([-1 if logprobs is None else logprobs]),
            [RowStage(tuple(processors)) if processors else None],
            RowConstraints.of(constraint, words) if constraint is not None else None,
        )

    @functools.cached_property
    def _mask_words(self) -> int:
        return new_masks(1, self.vocab).shape[1]

    def sample(self, batch: Batch, positions: np.ndarray) -> Sampled:
        """One character per row from the batch's logits, through each row's logits stage and
        constraint. ``positions`` [B] is each row's count of characters generated so far; with
        the row's seed it keys the row's draw."""
        ids, chars = self._draw(
            batch, batch.logits, batch.sampling.uniforms(positions, self.device)
        )
        return Sampled(ids[None], self._row_logprobs(batch, batch.logits[None], chars[None]))

    def forward(self, batch: Batch, sampled: Sampled) -> Batch:
        """The batch after the network has read the characters just sampled (a row that
        drew "end" reads any character: its text is over)."""
        ids = self._chars(sampled.ids[-1], batch.constraints)
        logits, state = self.decoder.step(ids, batch.state)
        return batch.moved(logits, state)

    def _draw(
        self, batch: Batch, logits: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids drawn from ``logits`` with the uniforms ``u`` (through the rows' logits
        stage, and their constraints' masks, filled and then moved on, one call each), and the
        characters the network reads next: a row that drew "end" reads character 0."""
        x = stage.apply(logits, batch.stages) if batch.staged else logits
        constraints = batch.constraints
        if constraints is None:
            ids = chars = self.decoder.sample(x, *batch.sampling.filters, u)
        else:
            masks = constraints.fill().to(self.device)
            ids = chars = self.decoder.sample(x, *batch.sampling.filters, u, masks)
            drawn = ids.tolist()
            constraints.advance(drawn)
            if constraints.end in drawn:
                chars = self._chars(ids, constraints)
        if batch.staged:
            stage.record(batch.stages, ids.tolist())
        return ids, chars

    @staticmethod
    def _chars(ids: torch.Tensor, constraints: RowConstraints | None) -> torch.Tensor:
        """``ids`` with "end" (a constrained row's id V) as character 0."""
        if constraints is None:
            return ids
        return torch.where(ids == constraints.end, 0, ids)

    def decode(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]:
        """``steps`` characters per row, sampled and run through the network in one call: the
        same ids as ``sample`` then ``forward`` per character, however the characters are
        split into calls. One fused call (the native kernels; a CUDA graph) where no row needs
        anything between the network and the sampler; else every row is stepped here, one
        character at a time (a constrained row among free ones costs the batch that loop,
        not a second read of the weights). Several steps need ``multi_step``. Run it in
        inference mode (``worker``)."""
        if steps > 1 and not self.multi_step:
            raise ValueError("several steps per call need the native kernels")
        if self.fusable(batch):
            return self._fused(batch, positions, steps)
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
        ids, logits, state = self.decoder.decode_batch(
            batch.logits, batch.state, batch.sampling, positions, steps, seen
        )
        return Sampled(ids, self._row_logprobs(batch, seen, ids)), batch.moved(logits, state)

    def _stepwise(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]:
        """``sample`` then ``forward``, ``steps`` times, in one tight loop; where only
        constraints stand between the network and the sampler, runs of masked steps in one
        native call each (``_masked_steps``)."""
        constraints = batch.constraints
        if self.multi_step and constraints is not None and not batch.staged:
            return self._masked_steps(batch, constraints, positions, steps)
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
        logprobs = self._row_logprobs(
            batch, torch.stack(seen) if asking else None, torch.stack(read)
        )
        return Sampled(torch.stack(drawn), logprobs), batch.moved(logits, state)

    def _masked_steps(
        self, batch: Batch, constraints: RowConstraints, positions: np.ndarray, steps: int
    ) -> tuple[Sampled, Batch]:
        """Up to ``steps`` characters per row in one native call, on a guess that each row's
        mask for its next character holds for a run of them (a regex's character class often
        does): the matchers then check the guess along the draws. Where a mask changed at step
        s, the draws before s stand (they were made with their true masks) and the call is
        made again for s + 1 steps, step s with its true masks: the same ids, bit for bit, as
        one step at a time. The run grows while guesses hold and shrinks to what held when
        one does not, so a grammar whose masks change at every character costs about one
        step per call, as without the guess."""
        stepper = constraints.stepper
        stepper.fill()
        run = min(steps, constraints.run)
        asking = batch.logprobs.max() >= 0
        ids, logits, state, seen = self._masked_call(batch, positions, run, stepper.masks, asking)
        held, true = stepper.walk(ids.tolist())
        if true is None:
            constraints.run = min(2 * run, MAX_RUN)
        else:
            masks = stepper.masks.expand(held + 1, *stepper.masks.shape).clone()
            masks[held] = true
            ids, logits, state, seen = self._masked_call(batch, positions, held + 1, masks, asking)
            stepper.settle(ids[held].tolist())
            constraints.run = held + 1
        logprobs = self._row_logprobs(batch, seen, self._chars(ids, constraints))
        return Sampled(ids, logprobs), batch.moved(logits, state)

    def _masked_call(
        self, batch: Batch, positions: np.ndarray, steps: int, masks: torch.Tensor, asking: bool
    ) -> tuple[torch.Tensor, torch.Tensor, State, torch.Tensor | None]:
        seen = torch.empty(steps, *batch.logits.shape) if asking else None
        seeds = torch.from_numpy(batch.sampling.seeds.view(np.int64))
        at = torch.from_numpy(positions.view(np.int64))
        ids, logits, state = self.decoder.decode(
            batch.logits, batch.state, *batch.sampling.filters, seeds, at, steps, seen, masks
        )
        return ids, logits, state, seen

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
