"""The decode thread: one per model. It alone owns the waiting queue, the primes in progress
and the batch; the event loop reaches it only by messages (``submit``, ``cancel``) and hears
back only through ``hand_over`` (app/engine.py holds the event loop's side).

Each iteration:

1. reads its messages: new generations join the queue, cancelled ones leave it, their
   prime or the batch, wherever they are;
2. admits queued generations while ``max_concurrent`` allows (a cached prime goes straight
   into the batch);
3. advances the primes in progress by at most ``prime_budget`` positions in all (chunked
   prefill, as TGI's ``max_batch_prefill_tokens`` and vLLM's chunked prefill): a burst of
   long primes can no longer stall the rows that are streaming. Several int8 primes advance
   side by side as one batched step per position (integer sums: the same numbers as one
   prime pass); otherwise each prime continues from its state in a part of its own, shortest
   first so a short prime does not wait behind long ones;
4. advances every row of the batch with one call: one character while primes are waiting
   or a row waits for its first character, else as many as fit in ``CALL_S``.

Each row's characters of a call go on as one run, and runs reach the event loop in one
hand-over, so the event loop streams call *n* while this thread computes call *n + 1* (torch
releases the GIL in its kernels). An exception fails the generations it touched, is logged
with its traceback, and the loop goes on for everyone else; ``FAILING_AFTER`` failed units
in a row mark the model as failing (``/ready`` 503) until one succeeds."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from app.backend import Batch, ModelBackend, RowLogprobs
from app.generation import Done, Event, Failed, Logprobs, Scored, Top
from app.metrics import Metrics
from charrnn.model import State

if TYPE_CHECKING:
    from app.engine import Generation

log = logging.getLogger("charrnn.batcher")

# Characters are handed to the event loop at most this often (a final event or a request's
# first character goes at once). Each hand-over costs the event loop a wake-up and a socket
# write per stream; batching a few milliseconds of characters makes that cost per write, not
# per character, and leaves the GIL to the decode thread: with 32 streams, 5 ms meant 6,400
# writes/s on one core. 20 ms (50 updates/s) still reads as a continuous stream.
HAND_OVER_S = 0.02
# With the native kernels one decode call makes several characters per row, paying the Python
# around a step (~50 us at batch 1) and the wait for the GIL after it once for all of them.
# A call is sized to take about CALL_S, so a request that arrives meanwhile waits at most
# about that long. 3 ms (three steps at batch 32) streamed ~8% more than 1 ms to 32 clients;
# 5 ms no more than 3 ms.
CALL_S = 0.003
MAX_STEPS = 32
# A hand-over also goes out after this many calls, so one holds at most
# HAND_OVER_CALLS * MAX_STEPS characters of a row: the least backlog a client may be given
# (app/config.py) for a reader at full speed never to be cut off.
HAND_OVER_CALLS = 16
MIN_BACKLOG = HAND_OVER_CALLS * MAX_STEPS
# From this many primes in progress, int8 primes advance side by side as batched steps. On the
# shipped model one prime alone runs ~26-31k positions/s (its layers overlap on two threads);
# side by side (budget 512), 8 primes run ~20k, 16 ~28k, 32 ~36k and 64 ~41k, measured with
# ``prime_part`` and ``prime_batched``. Below 16, one prime after another is as fast, and its
# first primes finish early.
LOCKSTEP_ROWS = 16
# A prime that runs alone gets at least this many positions per iteration.
MIN_PRIME_PART = 32
# An iteration's prime work also stops after about ``prime_slice_s`` (CHARRNN_PRIME_SLICE_MS),
# however many positions the budget allows: on a slower or busier CPU the budget's positions
# take longer, and the rows that are streaming wait for them. Measured per position as the
# primes run.
# Failed units of work in a row (a prime part, a decode call) before the model is failing.
FAILING_AFTER = 3

Results = list[tuple["Generation", list[Event]]]
Message = tuple[Literal["submit", "cancel", "stop"], "Generation | None"]


@dataclass
class Priming:
    """A prime in progress: ``ids`` [T], ``done`` of them run; the logits and state so far.
    A scored prime (``/score``, OpenAI's ``echo`` with ``logprobs``) also gathers, part by
    part, the logprob of each character from ``score_from`` on given those before it."""

    gen: Generation
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
        return self.gen.request.score_from is not None


class Batcher:
    def __init__(
        self,
        name: str,
        backend: ModelBackend,
        metrics: Metrics,
        *,
        max_concurrent: int,
        prime_budget: int,
        prime_slice_s: float,
        hand_over: Callable[[Results, str | None], None],
    ):
        self.name = name
        self.backend = backend
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.prime_budget = prime_budget
        self.prime_slice_s = prime_slice_s
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.waiting: deque[Generation] = deque()
        self.priming: list[Priming] = []
        self.rows: list[Generation] = []
        self.batch: Batch | None = None
        self._hand_over_to_loop = hand_over
        self._stopped = False
        self._pending: Results = []
        self._last_hand_over = 0.0
        self._calls_since = 0
        self._failures = 0
        self._failing: str | None = None  # why the model is failing, once it is
        # Seconds per position of a prime part, and of a side-by-side step at each group size:
        # what fits in ``prime_slice_s`` (a guess until measured).
        self._part_s = 40e-6
        self._side_s: dict[int, float] = {}
        self._call_logprobs: RowLogprobs | None = None  # of the decode call being emitted
        # Seconds per step at each batch size, from the last call at that size.
        self._step_s: dict[int, float] = {}
        # The per-step series, looked up once: ``labels()`` costs more than ``observe()``.
        self._inter_char = metrics.inter_char_seconds.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._generated = metrics.generated_chars.labels(name)
        self._decode_seconds = metrics.decode_seconds.labels(name)
        self._ttfc = metrics.ttfc_seconds.labels(name)
        self._prime_chars = metrics.prime_chars.labels(name)

    # -- messages (called on the event loop; the only entry points from other threads) ------

    def submit(self, gen: Generation) -> None:
        self.inbox.put(("submit", gen))

    def cancel(self, gen: Generation) -> None:
        self.inbox.put(("cancel", gen))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        with self.backend.worker():
            while not self._stopped:
                try:
                    self._iterate()
                except Exception as exc:  # a bug outside the guarded units: still never die
                    log.exception("decode iteration failed for model %s", self.name)
                    held = [p.gen for p in self.priming] + self.rows
                    self.priming, self.rows, self.batch = [], [], None
                    self._failed(held, exc)
                    self._set_gauges()
                    self._flush()

    def _iterate(self) -> None:
        idle = not (self.waiting or self.priming or self.rows)
        if idle:
            self._flush()
        self._read_inbox(block=idle)
        self._admit()
        if self.priming:
            self._prime()
            self._read_inbox(block=False)  # cancels that came in during the prime work
        if self.rows:
            self._decode()

    def _read_inbox(self, block: bool) -> None:
        try:
            message = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            while True:
                self._handle(*message)
                message = self.inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, kind: str, gen: Generation | None) -> None:
        if kind == "stop":
            self._stopped = True
        elif kind == "submit" and gen is not None:
            self.waiting.append(gen)
            self._set_gauges()
        elif kind == "cancel" and gen is not None:
            self._remove(gen)

    def _remove(self, gen: Generation) -> None:
        """Take a cancelled generation out wherever it is."""
        if gen in self.waiting:
            self.waiting.remove(gen)
        self.priming = [p for p in self.priming if p.gen is not gen]
        if gen in self.rows:
            self._keep_rows([i for i, g in enumerate(self.rows) if g is not gen])
        self._set_gauges()

    def _keep_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self.batch = self.batch.select(keep) if keep and self.batch is not None else None

    # -- admission and primes ------------------------------------------------------------------

    def _admit(self) -> None:
        if not self.waiting or len(self.rows) + len(self.priming) >= self.max_concurrent:
            return
        while self.waiting and len(self.rows) + len(self.priming) < self.max_concurrent:
            gen = self.waiting.popleft()
            gen.timings.started = time.perf_counter()
            # A scored prime needs its pass run: its logprobs are what it asks for.
            scored = gen.request.score_from is not None
            if gen.request.max_new == 0 and not scored:  # nothing to compute (OpenAI echo)
                self._score_only_done(gen)
                continue
            cached = None if scored else self.backend.cached_prime(gen.request.prime)
            self.metrics.prime_cache.labels(self.name, "hit" if cached else "miss").inc()
            if cached is not None:
                self._join_batch(gen, *cached)
            else:
                self.priming.append(Priming(gen, self.backend.encode(gen.request.prime)))
        self._set_gauges()

    def _join_batch(self, gen: Generation, logits: torch.Tensor, state: State) -> None:
        gen.timings.warmed = time.perf_counter()
        row = self.backend.new_row(logits, state, gen.request.sampling, gen.request.logprobs)
        self.batch = row if self.batch is None else Batch.concat([self.batch, row])
        self.rows.append(gen)

    def _prime(self) -> None:
        """At most ``prime_budget`` positions of prime work (at least one part)."""
        if self.backend.exact_steps and len(self.priming) >= LOCKSTEP_ROWS:
            group = self.priming
            positions = max(1, self.prime_budget // len(group))
            step_s = self._side_s.get(len(group))
            if step_s is not None:
                positions = max(1, min(positions, int(self.prime_slice_s / step_s)))
            self._guarded([p.gen for p in group], self._prime_side_by_side, group, positions)
        else:
            in_slice = max(MIN_PRIME_PART, int(self.prime_slice_s / self._part_s))
            budget = min(self.prime_budget, in_slice)
            share = max(MIN_PRIME_PART, budget // len(self.priming))
            # The primes that end within their share first (shortest first), then the others
            # in arrival order: a short prime never waits behind long ones, and long ones are
            # finished one after another rather than all late.
            short = sorted((p for p in self.priming if p.left <= share), key=lambda p: p.left)
            long = [p for p in self.priming if p.left > share]
            for p in short + long:
                if budget <= 0:
                    break
                n = self._part(p, max(share, budget))
                self._guarded([p.gen], self._prime_part, p, n)
                budget -= n
        finished = [p for p in self.priming if p.left == 0]
        if finished:
            self.priming = [p for p in self.priming if p.left > 0]
            for p in finished:
                assert p.logits is not None and p.state is not None
                if p.scored:
                    scored = self._scores(p)
                    p.gen.text.scored = scored  # its final event carries it
                    if p.gen.request.stream:
                        self._pending.append((p.gen, [scored]))
                if p.gen.request.max_new == 0:  # scoring only: it never joins the batch
                    self._score_only_done(p.gen)
                    continue
                self.backend.cache_prime(p.gen.request.prime, p.logits, p.state)
                self._join_batch(p.gen, p.logits, p.state)
            self._set_gauges()
            if any(p.scored for p in finished):
                self._flush()

    def _scores(self, p: Priming) -> Scored:
        """The scored part of a finished prime; a first character with nothing before it
        has no logprob."""
        request = p.gen.request
        start = request.score_from or 0
        head: list[float | None] = [None] if start == 0 else []
        top: list[Top | None] | None = None
        if request.score_top:
            top = [None] * len(head) + list(p.top)
        tokens = request.prime[start:]
        return Scored(start, Logprobs(tokens, head + list(p.logprobs), top))

    def _score_only_done(self, gen: Generation) -> None:
        now = time.perf_counter()
        gen.timings.warmed = gen.timings.ended = now
        lp = Logprobs("", [], [] if gen.request.logprobs else None)
        done = Done("", "length", lp if gen.request.logprobs is not None else None)
        done.prime = gen.text.scored
        gen.text.finished = True
        self._pending.append((gen, [done]))

    def _collect(self, p: Priming, start: int, logits: torch.Tensor) -> None:
        """Scores from the logits after positions ``start``, ``start + 1``, … of ``p``'s
        prime ([n, V]): row i gives the distribution of character ``start + i + 1``."""
        request = p.gen.request
        assert request.score_from is not None
        lo = max(start + 1, request.score_from)
        hi = min(start + logits.shape[0], p.ids.shape[0] - 1)  # inclusive
        if lo > hi:
            return
        rows = logits[lo - 1 - start : hi - start]
        chosen, top = self.backend.logprobs(rows, p.ids[lo : hi + 1], request.score_top)
        p.logprobs.extend(chosen)
        if top is not None:
            p.top.extend(top)

    def _part(self, p: Priming, most: int) -> int:
        """Positions for ``p``'s next part: all that is left if it fits in ``most``, else
        ``most`` cut down to the decoder's alignment (fp32 parts start on fixed blocks)."""
        if p.left <= most:
            return p.left
        align = self.backend.prime_align
        return min(p.left, max(align, most // align * align))

    def _prime_part(self, p: Priming, n: int) -> None:
        ids = p.ids[p.done : p.done + n]
        t0 = time.perf_counter()
        if p.scored:
            every, p.state = self.backend.prime_part_all(ids, p.state)
            self._collect(p, p.done, every)
            p.logits = every[-1:]
        else:
            p.logits, p.state = self.backend.prime_part(ids, p.state)
        if n >= MIN_PRIME_PART:  # short parts are mostly the call's fixed cost
            self._part_s = (time.perf_counter() - t0) / n
        p.done += n
        self._prime_chars.inc(n)

    def _prime_side_by_side(self, group: list[Priming], positions: int) -> None:
        """Advance every prime of ``group`` by the same number of positions, as batched steps:
        at most ``positions``, and no further than the shortest ends."""
        n = min(positions, min(p.left for p in group))
        ids = torch.stack([p.ids[p.done : p.done + n] for p in group])
        starts = [p.state for p in group]
        every = any(p.scored for p in group)
        t0 = time.perf_counter()
        logits, state = self.backend.prime_batched(ids, starts, every)
        self._side_s[len(group)] = (time.perf_counter() - t0) / n
        for i, p in enumerate(group):
            if every:
                if p.scored:
                    self._collect(p, p.done, logits[i])
                p.logits = logits[i, -1:]
            else:
                p.logits = logits[i : i + 1]
            p.state = tuple(s[:, i : i + 1] for s in state)
            p.done += n
        self._prime_chars.inc(n * len(group))

    def _guarded(self, gens: list[Generation], work: Callable[..., None], *args: object) -> None:
        """Run one unit of work; if it raises, fail the generations it touched (and only
        them), log it, and go on."""
        try:
            work(*args)
        except Exception as exc:
            log.exception("decode work failed for model %s", self.name)
            dropped = set(map(id, gens))
            self.priming = [p for p in self.priming if id(p.gen) not in dropped]
            keep = [i for i, g in enumerate(self.rows) if id(g) not in dropped]
            if len(keep) < len(self.rows):  # a decode call's rows; a prime's are not there yet
                self._keep_rows(keep)
            self._failed(gens, exc)
            self._set_gauges()
        else:
            self._succeeded()

    # -- decode ------------------------------------------------------------------------------

    def _decode(self) -> None:
        self._guarded(list(self.rows), self._decode_call)
        keep = [i for i, g in enumerate(self.rows) if not g.text.finished]
        if len(keep) < len(self.rows):
            self._keep_rows(keep)
            self._set_gauges()

    def _decode_call(self) -> None:
        assert self.batch is not None
        rows = self.rows
        # A row waiting for its first character gets it before the network step runs.
        early = any(not len(g.text) for g in rows)
        steps = 1 if early or self.priming else self._steps()
        positions = np.fromiter((len(g.text) for g in rows), dtype=np.uint64, count=len(rows))
        t0 = time.perf_counter()
        # Only when a row asked for logprobs: the others' calls are exactly as before.
        asked = {"on_logprobs": self._keep_call_logprobs} if self.batch.logprobs.max() >= 0 else {}
        self.batch = self.backend.advance(self.batch, positions, self._emit, steps, early, **asked)
        elapsed = time.perf_counter() - t0
        per_step = elapsed / steps
        self._step_s[len(rows)] = per_step
        self._decode_seconds.inc(elapsed)
        self._inter_char.observe(per_step)
        self._batch_size.observe(len(rows))

    def _steps(self) -> int:
        """Characters per row for the next call: as many as fit in ``CALL_S`` at this batch
        size and every row still wants (one without the native kernels)."""
        rows = self.rows
        if not self.backend.multi_step:
            return 1
        per_step = self._step_s.get(len(rows))
        if per_step is None:
            return 1  # this batch size has not been timed yet
        left = min(g.request.max_new - len(g.text) for g in rows)
        return max(1, min(MAX_STEPS, left, int(CALL_S / per_step)))

    def _keep_call_logprobs(self, rows: RowLogprobs) -> None:
        self._call_logprobs = rows

    def _emit(self, runs: list[list[int]]) -> None:
        """Characters just sampled, one list of ids per row: each row's run into its text,
        and its events on. A row that finishes part-way through a run drops the rest."""
        now = time.perf_counter()
        decode = self.backend.vocab.decode
        results: Results = []
        generated = 0
        urgent = False  # a first character or a final event: no reason to wait
        logprobs, self._call_logprobs = self._call_logprobs, None
        for b, (gen, ids) in enumerate(zip(self.rows, runs, strict=True)):
            text = gen.text
            if text.finished:
                continue
            if not len(text):
                self._ttfc.observe(now - gen.timings.submitted)
                urgent = True
            row = logprobs[b] if logprobs is not None else None
            events = text.push(decode(ids), *row) if row is not None else text.push(decode(ids))
            results.append((gen, events))
            generated += len(ids)
            if text.finished:
                gen.timings.ended = now
                urgent = True
        self._generated.inc(generated)
        self._pending.extend(results)
        self._calls_since += 1
        # While primes are in progress an iteration takes a budget's prime work: waiting for
        # HAND_OVER_S on top would double the running streams' gaps.
        due = now - self._last_hand_over >= HAND_OVER_S or bool(self.priming)
        if urgent or due or self._calls_since >= HAND_OVER_CALLS:
            self._flush()

    # -- results -----------------------------------------------------------------------------

    def _failed(self, gens: list[Generation], exc: Exception) -> None:
        self._failures += 1
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        if self._failures >= FAILING_AFTER and self._failing is None:
            self._failing = f"decode failed {self._failures} times in a row; last: {reason}"
            log.error("model %s is failing: %s", self.name, self._failing)
        failed = Failed(f"generation failed inside the model ({reason})", "internal")
        self._pending.extend((g, [failed]) for g in gens)
        self._flush()

    def _succeeded(self) -> None:
        if self._failures:
            self._failures = 0
            if self._failing is not None:
                log.info("model %s decodes again", self.name)
                self._failing = None
                self._flush(force=True)

    def _flush(self, force: bool = False) -> None:
        if not self._pending and not force:
            return
        results, self._pending = self._pending, []
        self._last_hand_over = time.perf_counter()
        self._calls_since = 0
        self._hand_over_to_loop(results, self._failing)

    def _set_gauges(self) -> None:
        self.metrics.active.labels(self.name).set(len(self.rows))
        self.metrics.priming.labels(self.name).set(len(self.priming))
        self.metrics.queue_depth.labels(self.name).set(len(self.waiting))
