"""The decode thread: one per model. It alone owns the waiting queue, the primes in progress
and the batch; the event loop reaches it only by messages (``submit``, ``cancel``) and hears
back only through the outbox's hand-over (app/engine/scheduler.py holds the other side).

Each iteration reads its messages, then carries out the policy's plan (app/engine/policy.py)
with the model runner (app/runner): admit, prime, one decode call for every running row.
Each unit of work runs guarded: an exception fails the generations it touched, is logged
with its traceback, and the loop goes on for everyone else (app/engine/outbox.py)."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from app.engine.outbox import HandOver, Outbox
from app.engine.policy import MIN_PRIME_PART, Costs, Policy
from app.engine.priming import Priming
from app.engine.request import Done, Logprobs
from app.metrics import Metrics
from app.runner import Batch, ModelRunner, RowLogprobs, Sampled
from charrnn.model import State

if TYPE_CHECKING:
    from app.engine.handle import Generation

log = logging.getLogger("charrnn.engine")

Message = tuple[Literal["submit", "cancel", "stop"], "Generation | None"]


class DecodeLoop:
    def __init__(
        self,
        name: str,
        runner: ModelRunner,
        metrics: Metrics,
        policy: Policy,
        hand_over: HandOver,
    ):
        self.name = name
        self.runner = runner
        self.metrics = metrics
        self.policy = policy
        self.costs = Costs()
        self.outbox = Outbox(name, hand_over)
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.waiting: deque[Generation] = deque()
        self.priming: list[Priming] = []
        self.rows: list[Generation] = []
        self.batch: Batch | None = None
        self._stopped = False
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
        with self.runner.worker():
            while not self._stopped:
                try:
                    self._iterate()
                except Exception as exc:  # a bug outside the guarded units: still never die
                    log.exception("decode iteration failed for model %s", self.name)
                    held = [p.gen for p in self.priming] + self.rows
                    self.priming, self.rows, self.batch = [], [], None
                    self.outbox.failed(held, exc)
                    self._set_gauges()

    def _iterate(self) -> None:
        idle = not (self.waiting or self.priming or self.rows)
        if idle:
            self.outbox.flush()
        self._read_inbox(block=idle)
        self._admit()
        if self.priming:
            self._prime()
            self._read_inbox(block=False)  # cancels that came in during the prime work
        if self.rows:
            self._guarded(list(self.rows), self._decode_call)
            self._drop_finished()

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
            self._drop({id(gen)})

    def _drop(self, gens: set[int]) -> None:
        """Take generations (by id) out wherever they are."""
        self.waiting = deque(g for g in self.waiting if id(g) not in gens)
        self.priming = [p for p in self.priming if id(p.gen) not in gens]
        keep = [i for i, g in enumerate(self.rows) if id(g) not in gens]
        if len(keep) < len(self.rows):
            self._keep_rows(keep)
        self._set_gauges()

    def _keep_rows(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        self.batch = self.batch.select(keep) if keep and self.batch is not None else None

    def _guarded(self, gens: list[Generation], work: Callable[..., None], *args: object) -> None:
        """Run one unit of work; if it raises, fail the generations it touched (and only
        them), log it, and go on."""
        try:
            work(*args)
        except Exception as exc:
            log.exception("decode work failed for model %s", self.name)
            self._drop(set(map(id, gens)))
            self.outbox.failed(gens, exc)
        else:
            self.outbox.succeeded()

    def _row_guarded(self, gen: Generation, work: Callable[..., int | None], *args: object) -> int:
        """Run one row's own work (no network call; it returns a count, or None): if it
        raises, that row ends with an error, is dropped from the batch after this call, and
        nothing else changes."""
        try:
            return work(*args) or 0
        except Exception as exc:
            log.exception("a row's work failed for model %s", self.name)
            gen.matcher.finished = True
            self.outbox.row_failed(gen, exc)
            return 0

    # -- admission and primes ------------------------------------------------------------------

    def _admit(self) -> None:
        active = len(self.rows) + len(self.priming)
        for _ in range(self.policy.admissions(len(self.waiting), active)):
            gen = self.waiting.popleft()
            gen.timings.started = time.perf_counter()
            request = gen.request
            scored = request.score_from is not None  # its pass is what it asks for
            if request.max_new == 0 and not scored:  # nothing to compute (OpenAI echo)
                self._score_only_done(gen)
                continue
            cached = None if scored else self.runner.cached_prime(request.prime)
            self.metrics.prime_cache.labels(self.name, "hit" if cached else "miss").inc()
            if cached is not None:
                self._join_batch(gen, *cached)
            else:
                self.priming.append(Priming(gen, self.runner.encode(request.prime)))
        self._set_gauges()

    def _join_batch(self, gen: Generation, logits: torch.Tensor, state: State) -> None:
        gen.timings.warmed = time.perf_counter()
        r = gen.request
        row = self.runner.new_row(
            logits, state, r.sampling, r.logprobs, r.processors, gen.matcher.constraint
        )
        self.batch = row if self.batch is None else Batch.concat([self.batch, row])
        self.rows.append(gen)

    def _prime(self) -> None:
        work = self.policy.prime_work([p.left for p in self.priming], self.costs)
        if work.side_by_side:
            group = self.priming
            self._guarded([p.gen for p in group], self._side_by_side, group, work.side_by_side)
        for p, n in [(self.priming[i], n) for i, n in work.parts]:  # a failed part drops its own
            self._guarded([p.gen], self._prime_part, p, n)
        finished = [p for p in self.priming if p.left == 0]
        if finished:
            self.priming = [p for p in self.priming if p.left > 0]
            for p in finished:
                self._row_guarded(p.gen, self._primed, p)
            self._set_gauges()
            if any(p.scored for p in finished):
                self.outbox.flush()

    def _primed(self, p: Priming) -> None:
        """A finished prime: its scores go out, and it joins the batch unless it only scores."""
        gen = p.gen
        assert p.logits is not None and p.state is not None
        if p.scored:
            scored = p.scores()
            gen.matcher.scored = scored  # its final event carries it
            if gen.request.stream:
                self.outbox.add(gen, [scored])
        if gen.request.max_new == 0:
            self._score_only_done(gen)
            return
        self.runner.cache_prime(gen.request.prime, p.logits, p.state)
        self._join_batch(gen, p.logits, p.state)

    def _score_only_done(self, gen: Generation) -> None:
        now = time.perf_counter()
        gen.timings.warmed = gen.timings.ended = now
        asked = gen.request.logprobs is not None
        lp = Logprobs("", [], [] if gen.request.logprobs else None) if asked else None
        gen.matcher.finished = True
        self.outbox.add(gen, [Done("", "length", lp, gen.matcher.scored)])

    def _prime_part(self, p: Priming, n: int) -> None:
        ids = p.ids[p.done : p.done + n]
        t0 = time.perf_counter()
        if p.scored:
            every, state = self.runner.prime_all(ids, p.state)
            p.collect(self.runner, p.done, every)
            p.advanced(n, every[-1:], state)
        else:
            p.advanced(n, *self.runner.prime(ids, p.state))
        if n >= MIN_PRIME_PART:  # short parts are mostly the call's fixed cost
            self.costs.part_s = (time.perf_counter() - t0) / n
        self._prime_chars.inc(n)

    def _side_by_side(self, group: list[Priming], n: int) -> None:
        """Advance every prime of ``group`` by ``n`` positions as batched steps."""
        ids = torch.stack([p.ids[p.done : p.done + n] for p in group])
        every = any(p.scored for p in group)
        t0 = time.perf_counter()
        logits, state = self.runner.prime_batched(ids, [p.state for p in group], every)
        self.costs.side_s[len(group)] = (time.perf_counter() - t0) / n
        for i, p in enumerate(group):
            if every and p.scored:
                p.collect(self.runner, p.done, logits[i])
            last = logits[i, -1:] if every else logits[i : i + 1]
            p.advanced(n, last, tuple(s[:, i : i + 1] for s in state))
        self._prime_chars.inc(n * len(group))

    # -- decode ------------------------------------------------------------------------------

    def _decode_call(self) -> None:
        batch, rows, runner = self.batch, self.rows, self.runner
        assert batch is not None
        # A row waiting for its first character gets it before the network step runs.
        early = any(not len(g.matcher) for g in rows)
        steps = self.policy.decode_steps(
            [g.request.max_new - len(g.matcher) for g in rows],
            fused=runner.multi_step,
            first_pending=early,
            priming=bool(self.priming),
            costs=self.costs,
        )
        positions = np.fromiter((len(g.matcher) for g in rows), dtype=np.uint64, count=len(rows))
        t0 = time.perf_counter()
        if early and runner.splits_early:
            sampled = runner.sample(batch, positions)
            self._emit(sampled)
            self.batch = runner.forward(batch, sampled)
        else:
            sampled, self.batch = runner.decode(batch, positions, steps)
            self._emit(sampled)
        elapsed = time.perf_counter() - t0
        per_step = elapsed / steps
        self.costs.step_s[len(rows)] = per_step
        self._decode_seconds.inc(elapsed)
        self._inter_char.observe(per_step)
        self._batch_size.observe(len(rows))

    def _emit(self, sampled: Sampled) -> None:
        """Characters just sampled: each row's run into its text, and its events on. A row
        that finishes part-way through a run drops the rest. A failure in one row's events
        ends that row alone (an ``error`` event); the others go on."""
        now = time.perf_counter()
        generated = 0
        urgent = False  # a first character or a final event: no reason to wait
        for gen, ids, logprobs in zip(self.rows, sampled.runs(), sampled.logprobs, strict=True):
            if gen.matcher.finished:
                continue
            if not len(gen.matcher):
                self._ttfc.observe(now - gen.timings.submitted)
                urgent = True
            generated += self._row_guarded(gen, self._emit_row, gen, ids, logprobs)
            if gen.matcher.finished:
                gen.timings.ended = now
                urgent = True
        self._generated.inc(generated)
        self.outbox.after_call(urgent, bool(self.priming))

    def _emit_row(self, gen: Generation, ids: list[int], logprobs: RowLogprobs) -> int:
        """One row's run into its text and events; the characters it kept."""
        end = len(self.runner.vocab)  # "end": a constrained row's match is over
        ended = end in ids
        if ended:
            ids = ids[: ids.index(end)]  # the match is over: what follows is not its text
        self.outbox.add(
            gen, gen.matcher.push(self.runner.vocab.decode(ids), *logprobs, ended=ended)
        )
        return len(ids)

    def _drop_finished(self) -> None:
        keep = [i for i, g in enumerate(self.rows) if not g.matcher.finished]
        if len(keep) < len(self.rows):
            self._keep_rows(keep)
            self._set_gauges()

    def _set_gauges(self) -> None:
        self.metrics.active.labels(self.name).set(len(self.rows))
        self.metrics.priming.labels(self.name).set(len(self.priming))
        self.metrics.queue_depth.labels(self.name).set(len(self.waiting))
