"""What the runner keeps between calls, and how one ``Plan`` is carried out (app/runner/plan.py
says what a plan and an output are; app/runner/runner.py has the work itself).

Between calls the runner holds the batch (each row's logits, state, sampling and stage, with
its key and how many characters it has drawn), the primes in progress and the admissions
following them, and, after a call that handed characters out before the network read them,
those characters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from app.runner.batch import Batch, Sampled
from app.runner.plan import NewRow, Output, Plan, Primed, PrimeScores, RowKey, RowRun, Top
from app.runner.stage import network_chars, text_run
from charrnn.controls import DEFAULT, Controls
from charrnn.model import State
from charrnn.sampling import SamplingParams
from charrnn.structured import Matcher
from charrnn.vocab import Vocabulary


class Steps(Protocol):
    """The runner's primitives that a plan is carried out with (``ModelRunner``'s)."""

    vocab: Vocabulary

    @property
    def splits_early(self) -> bool: ...

    def encode(self, prime: str) -> torch.Tensor: ...

    def cached_prime(self, prime: str) -> tuple[torch.Tensor, State] | None: ...

    def cache_prime(self, prime: str, logits: torch.Tensor, state: State) -> None: ...

    def prime(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]: ...

    def prime_all(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]: ...

    def prime_batched(
        self, ids: torch.Tensor, starts: list[State | None], every: bool = False
    ) -> tuple[torch.Tensor, State]: ...

    def logprobs(
        self, logits: torch.Tensor, targets: torch.Tensor, n: int
    ) -> tuple[list[float], list[Top] | None]: ...

    def new_row(
        self,
        logits: torch.Tensor,
        state: State,
        sampling: SamplingParams,
        logprobs: int | None = None,
        constraint: Matcher | None = None,
        controls: Controls = DEFAULT,
        prime: str = "",
    ) -> Batch: ...

    def sample(self, batch: Batch, positions: np.ndarray) -> Sampled: ...

    def read(self, batch: Batch, chars: torch.Tensor) -> Batch: ...

    def decode(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]: ...


@dataclass
class Prime:
    """A prime in progress: ``ids`` [T], ``done`` of them run; the logits and state so far. A
    scored prime also gathers, part by part, the logprob of each character from
    ``score_from`` on given those before it."""

    new: NewRow
    ids: torch.Tensor
    done: int = 0
    logits: torch.Tensor | None = None
    state: State | None = None
    logprobs: list[float] = field(default_factory=list)
    top: list[Top] = field(default_factory=list)

    @property
    def left(self) -> int:
        return self.ids.shape[0] - self.done

    @property
    def scored(self) -> bool:
        return self.new.score_from is not None

    def advanced(self, n: int, logits: torch.Tensor, state: State) -> None:
        """``n`` more positions run; ``logits`` [1, V] after the last."""
        self.done += n
        self.logits, self.state = logits, state

    def collect(self, steps: Steps, start: int, logits: torch.Tensor) -> None:
        """Scores from the logits after positions ``start``, ``start + 1``, … ([n, V]): row
        i gives the distribution of character ``start + i + 1``."""
        assert self.new.score_from is not None
        lo = max(start + 1, self.new.score_from)
        hi = min(start + logits.shape[0], self.ids.shape[0] - 1)  # inclusive
        if lo > hi:
            return
        rows = logits[lo - 1 - start : hi - start]
        chosen, top = steps.logprobs(rows, self.ids[lo : hi + 1], self.new.score_top)
        self.logprobs.extend(chosen)
        if top is not None:
            self.top.extend(top)

    def scores(self) -> PrimeScores:
        """The scored part of the finished prime; a first character with nothing before it
        has no logprob."""
        start = self.new.score_from or 0
        head: list[float | None] = [None] if start == 0 else []
        top: list[Top | None] | None = None
        if self.new.score_top:
            top = [None] * len(head) + list(self.top)
        return PrimeScores(head + list(self.logprobs), top)


class Executor:
    def __init__(self, steps: Steps):
        self.steps = steps
        self.batch: Batch | None = None
        self.keys: list[RowKey] = []  # the batch's rows, in order
        self.positions = np.zeros(0, dtype=np.uint64)  # characters each row has drawn
        self.unread: torch.Tensor | None = None  # characters drawn that the network has not read
        # Within a call: the rows that join before its decode (empty between calls).
        self.ready: list[tuple[RowKey, Batch]] = []
        self.primes: dict[RowKey, Prime] = {}  # in arrival order
        # Admissions waiting for a prime in progress with the same text, by its key.
        self.followers: dict[RowKey, list[NewRow]] = {}

    def execute(self, plan: Plan) -> Output:
        out = Output()
        try:
            self._drop(plan.drop, out)
            self._read_unread()
            self._admit(plan.admit, out)
            self._prime(plan, out)
            self._join()
            if plan.steps and self.batch is not None:
                self._decode(plan.steps, out)
        except Exception:  # a bug, not a failed unit: start again from nothing
            self.__init__(self.steps)  # type: ignore[misc]
            raise
        return out

    # -- rows in and out ---------------------------------------------------------------------

    def _drop(self, keys: frozenset[RowKey], out: Output) -> None:
        if not keys:
            return
        for leader, rows in list(self.followers.items()):
            self.followers[leader] = [n for n in rows if n.key not in keys]
        for key in keys & self.primes.keys():
            self._forget_prime(key, out)
        keep = [i for i, k in enumerate(self.keys) if k not in keys]
        if len(keep) < len(self.keys):
            self._keep(keep)

    def _forget_prime(self, key: RowKey, out: Output) -> None:
        """A prime nobody waits for any more: its first follower, if any, takes it over (and
        runs from now on as its own)."""
        p = self.primes.pop(key)
        rows = self.followers.pop(key, [])
        if rows:
            p.new = rows[0]
            self.primes[rows[0].key] = p
            self.followers[rows[0].key] = rows[1:]
            out.primed.append(Primed(rows[0].key, 0, p.left))

    def _keep(self, keep: list[int]) -> None:
        self.keys = [self.keys[i] for i in keep]
        self.positions = self.positions[keep]
        if not keep:
            self.batch = self.unread = None
            return
        assert self.batch is not None
        self.batch = self.batch.select(keep)
        if self.unread is not None:
            self.unread = self.unread[keep]

    def _read_unread(self) -> None:
        """The network step that the last call's early hand-out left for this one."""
        if self.unread is not None and self.batch is not None:
            self.batch = self.steps.read(self.batch, self.unread)
        self.unread = None

    def _admit(self, admit: tuple[NewRow, ...], out: Output) -> None:
        """Rows of cached primes are ready to join; the other primes start (or follow one in
        progress with the same text)."""
        for new in admit:
            cached = None if new.score_from is not None else self.steps.cached_prime(new.prime)
            if cached is None:
                leader = self._same_prime(new)
                if leader is not None:
                    self.followers.setdefault(leader, []).append(new)
                    out.primed.append(Primed(new.key, 0, self.primes[leader].left, follows=leader))
                else:
                    self.primes[new.key] = Prime(new, self.steps.encode(new.prime))
                continue
            self.ready.append((new.key, self._row(new, *cached)))
            out.primed.append(Primed(new.key, 0, 0, cached=True))

    def _join(self) -> None:
        """The ready rows (cached primes, primes finished in this call) join the batch, so
        that this call's decode hands them their first character."""
        joining, self.ready = self.ready, []
        if not joining:
            return
        parts = [b for _, b in joining]
        self.batch = Batch.concat([self.batch, *parts] if self.batch is not None else parts)
        self.keys += [k for k, _ in joining]
        self.positions = np.concatenate([self.positions, np.zeros(len(joining), np.uint64)])

    def _same_prime(self, new: NewRow) -> RowKey | None:
        """The prime in progress that ``new`` can wait for: the same text, neither scored."""
        if new.score_from is not None or not new.generates:
            return None
        for key, p in self.primes.items():
            if p.new.prime == new.prime and not p.scored and p.new.generates:
                return key
        return None

    def _row(self, new: NewRow, logits: torch.Tensor, state: State) -> Batch:
        return self.steps.new_row(
            logits,
            state,
            new.sampling,
            new.logprobs,
            new.constraint,
            new.controls,
            new.prime,
        )

    # -- the decode call ---------------------------------------------------------------------

    def _decode(self, steps: int, out: Output) -> None:
        batch = self.batch
        assert batch is not None
        # A row waiting for its first character gets it before the network step, which the
        # next call runs: on the CPU the ids exist before the network runs.
        early = steps == 1 and self.steps.splits_early and not self.positions.all()
        t0 = time.perf_counter()
        try:
            if early:
                sampled = self.steps.sample(batch, self.positions)
                self.unread = network_chars(sampled.ids[-1], batch.stage)
            else:
                sampled, self.batch = self.steps.decode(batch, self.positions, steps)
        except Exception as exc:
            out.decode_error = exc
            out.rows = [RowRun(k, "") for k in self.keys]
            self._keep([])
            return
        out.decode_s, out.timed = time.perf_counter() - t0, not early
        out.steps = sampled.ids.shape[0]
        self.positions += np.uint64(out.steps)
        out.rows = self._runs(sampled, batch)

    def _runs(self, sampled: Sampled, batch: Batch) -> list[RowRun]:
        vocab = self.steps.vocab
        end = batch.stage.end if batch.stage is not None else -1  # "end" needs per-row work
        runs = []
        for key, ids, (lps, top) in zip(self.keys, sampled.runs(), sampled.logprobs, strict=True):
            text, ended = text_run(ids, end)
            runs.append(RowRun(key, vocab.decode(text), ended, lps, top))
        return runs

    # -- primes ------------------------------------------------------------------------------

    def _prime(self, plan: Plan, out: Output) -> None:
        progress: dict[RowKey, Primed] = {}
        if plan.side_by_side and self.primes:
            self._side_by_side(plan.side_by_side, out, progress)
        for key, n in plan.prime_parts:
            p = self.primes.get(key)
            if p is not None:
                progress[key] = self._part(p, n)
        for key in [k for k, p in self.primes.items() if p.left == 0]:
            self._finished(self.primes.pop(key), progress)
        for primed in [p for p in progress.values() if p.error is not None]:
            self.primes.pop(primed.key, None)
            for new in self.followers.pop(primed.key, []):
                progress[new.key] = Primed(new.key, 0, primed.left, error=primed.error)
        out.primed += progress.values()

    def _part(self, p: Prime, n: int) -> Primed:
        ids = p.ids[p.done : p.done + n]
        t0 = time.perf_counter()
        try:
            if p.scored:
                every, state = self.steps.prime_all(ids, p.state)
                p.collect(self.steps, p.done, every)
                p.advanced(n, every[-1:], state)
            else:
                p.advanced(n, *self.steps.prime(ids, p.state))
        except Exception as exc:
            return Primed(p.new.key, 0, p.left, error=exc)
        return Primed(p.new.key, n, p.left, time.perf_counter() - t0)

    def _side_by_side(self, n: int, out: Output, progress: dict[RowKey, Primed]) -> None:
        """Every prime in progress ``n`` positions further, as batched steps."""
        group = list(self.primes.values())
        ids = torch.stack([p.ids[p.done : p.done + n] for p in group])
        every = any(p.scored for p in group)
        t0 = time.perf_counter()
        try:
            logits, state = self.steps.prime_batched(ids, [p.state for p in group], every)
        except Exception as exc:
            progress.update({p.new.key: Primed(p.new.key, 0, p.left, error=exc) for p in group})
            return
        out.side = (len(group), n, time.perf_counter() - t0)
        for i, p in enumerate(group):
            if every and p.scored:
                p.collect(self.steps, p.done, logits[i])
            last = logits[i, -1:] if every else logits[i : i + 1]
            p.advanced(n, last, tuple(s[:, i : i + 1] for s in state))
            progress[p.new.key] = Primed(p.new.key, n, p.left)

    def _finished(self, p: Prime, progress: dict[RowKey, Primed]) -> None:
        """A finished prime: its scores go out, and its row, and its followers', are ready
        to join."""
        assert p.logits is not None and p.state is not None
        primed = progress[p.new.key]
        primed.left = 0
        if p.scored:
            primed.scores = p.scores()
        if p.new.generates:
            self.steps.cache_prime(p.new.prime, p.logits, p.state)
            self.ready.append((p.new.key, self._row(p.new, p.logits, p.state)))
        for new in self.followers.pop(p.new.key, []):
            progress[new.key] = Primed(new.key, 0, 0)
            self.ready.append((new.key, self._row(new, p.logits, p.state)))
