"""The decode thread: one per model. It alone owns the waiting queue, the primes in progress
and the running rows; the event loop reaches it only by messages (``submit``, ``cancel``) and
hears back only through the outbox's hand-over (app/engine/scheduler.py holds the other side).

Each iteration reads its messages, asks the policy (app/engine/policy.py) for a plan (what to
admit, the prime work, the characters per row) and makes the one call of the model runner,
``execute(plan)`` (app/runner/plan.py); then it turns the output into each generation's
events. A unit of work that failed (the decode call, a prime part) fails the generations it
touched, is logged with its traceback, and the loop goes on for everyone else
(app/engine/outbox.py); a failure in one row's own events ends that row alone."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from app.engine.outbox import HandOver, Outbox
from app.engine.policy import MIN_PRIME_PART, Costs, Policy
from app.engine.request import Done, Logprobs, Scored
from app.metrics import Metrics
from app.runner import ModelRunner, NewRow, Output, Plan, PrimeScores, RowKey, RowRun

if TYPE_CHECKING:
    from app.engine.handle import Generation

log = logging.getLogger("charrnn.engine")

Message = tuple[Literal["submit", "cancel", "stop"], "Generation | None"]


@dataclass
class Priming:
    """A generation whose prime is in progress, and the positions it has left to run."""

    gen: Generation
    left: int
    follows: bool = False  # waits for a prime in progress with the same text: no work of its own


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
        self.priming: dict[RowKey, Priming] = {}  # in arrival order
        self.rows: dict[RowKey, Generation] = {}  # the running rows
        self._forget: set[RowKey] = set()  # for the runner to drop at the next call
        self._stopped = False
        # The per-step series, looked up once: ``labels()`` costs more than ``observe()``.
        self._inter_char = metrics.inter_char_seconds.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._generated = metrics.generated_chars.labels(name)
        self._decode_seconds = metrics.decode_seconds.labels(name)
        self._ttfc = metrics.ttfc_seconds.labels(name)
        self._prime_chars = metrics.prime_chars.labels(name)
        self._cache = {
            hit: metrics.prime_cache.labels(name, "hit" if hit else "miss") for hit in (1, 0)
        }

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
                except Exception as exc:  # a bug outside the units of work: still never die
                    log.exception("decode iteration failed for model %s", self.name)
                    held = [p.gen for p in self.priming.values()] + list(self.rows.values())
                    self._forget.update(self.priming, self.rows)
                    self.priming, self.rows = {}, {}
                    self.outbox.failed(held, exc)
                    self._set_gauges()

    def _iterate(self) -> None:
        idle = not (self.waiting or self.priming or self.rows)
        if idle:
            self.outbox.flush()
        self._read_inbox(block=idle)
        admitted = self._admit()
        plan = self._plan(admitted)
        if plan is not None:
            self._take(admitted, self.runner.execute(plan))

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
            self._drop(gen)

    def _drop(self, gen: Generation) -> None:
        """Take a generation out wherever it is (the runner forgets it at the next call)."""
        if gen in self.waiting:
            self.waiting.remove(gen)
        elif self.priming.pop(gen.key, None) is not None or self.rows.pop(gen.key, None):
            self._forget.add(gen.key)
        self._set_gauges()

    # -- the plan ------------------------------------------------------------------------------

    def _admit(self) -> list[NewRow]:
        """Waiting generations the policy admits: each becomes a prime to run (or a row at
        once, where the runner has its prime cached)."""
        admitted = []
        active = len(self.rows) + len(self.priming)
        for _ in range(self.policy.admissions(len(self.waiting), active)):
            gen = self.waiting.popleft()
            gen.timings.started = time.perf_counter()
            r = gen.request
            if r.max_new == 0 and r.score_from is None:  # nothing to compute (OpenAI echo)
                self._score_only_done(gen)
                continue
            self.priming[gen.key] = Priming(gen, len(r.prime))
            admitted.append(
                NewRow(
                    gen.key,
                    r.prime,
                    r.sampling,
                    r.logprobs,
                    r.score_from,
                    r.score_top,
                    gen.matcher.constraint,
                    generates=r.max_new > 0,
                    controls=r.controls,
                )
            )
        self._set_gauges()
        return admitted

    def _plan(self, admitted: list[NewRow]) -> Plan | None:
        own = [(k, p) for k, p in self.priming.items() if not p.follows]
        work = self.policy.prime_work([p.left for _, p in own], self.costs)
        keys = [k for k, _ in own]
        wanted = [g.request.max_new - len(g.matcher) for g in self.rows.values()]
        # An admitted prime that the runner has cached joins this call's rows.
        maybe = [n.key for n in admitted if n.generates and n.score_from is None]
        wanted += [self.priming[k].gen.request.max_new for k in maybe]
        steps = 0
        if wanted:
            steps = self.policy.decode_steps(
                wanted,
                fused=self.runner.multi_step,
                first_pending=bool(maybe) or any(not len(g.matcher) for g in self.rows.values()),
                priming=bool(self.priming),
                costs=self.costs,
            )
        forget, self._forget = frozenset(self._forget), set()
        parts = tuple((keys[i], n) for i, n in work.parts)
        if not (admitted or forget or steps or work.side_by_side or parts):
            return None
        return Plan(tuple(admitted), forget, steps, work.side_by_side, parts)

    # -- the output ----------------------------------------------------------------------------

    def _take(self, admitted: list[NewRow], out: Output) -> None:
        now = time.perf_counter()
        cached = {p.key for p in out.primed if p.cached}
        for new in admitted:
            self._cache[new.key in cached].inc()
            if new.key in cached:
                self._joined(self.priming.pop(new.key).gen, now)
        self._primes(out)  # first: a prime's scores go before its first character
        if out.decode_error is not None:
            self._failed([r.key for r in out.rows], out.decode_error)
        elif out.rows:
            self._emit(out.rows, now)
            self._decode_costs(out)
            self.outbox.succeeded()
        self._drop_finished()
        self.outbox.after_call(self._urgent, bool(self.priming))
        self._urgent = False

    def _failed(self, keys: list[RowKey], exc: Exception) -> None:
        """A unit of work failed: its generations end with an error (the runner has
        forgotten them)."""
        log.error("decode work failed for model %s", self.name, exc_info=exc)
        gens = [g for k in keys if (g := self.rows.pop(k, None) or self._unprime(k))]
        self.outbox.failed(gens, exc)
        self._set_gauges()

    def _unprime(self, key: RowKey) -> Generation | None:
        p = self.priming.pop(key, None)
        return p.gen if p is not None else None

    def _decode_costs(self, out: Output) -> None:
        """What the policy learns from the call: the time of the steps that ran."""
        self._decode_seconds.inc(out.decode_s)
        self._batch_size.observe(len(out.rows))
        if out.timed and out.steps:
            per_step = out.decode_s / out.steps
            self.costs.step_s[len(out.rows)] = per_step
            self._inter_char.observe(per_step)

    def _primes(self, out: Output) -> None:
        errors: dict[int, tuple[Exception, list[RowKey]]] = {}
        for p in out.primed:
            if p.cached or p.key not in self.priming:
                continue
            if p.error is not None:  # one failure of a group fails the group once
                errors.setdefault(id(p.error), (p.error, []))[1].append(p.key)
                continue
            priming = self.priming[p.key]
            priming.follows = p.follows is not None
            if priming.follows:
                continue
            self.outbox.succeeded()
            self._prime_chars.inc(p.positions)
            if p.positions >= MIN_PRIME_PART and p.seconds:  # short parts: mostly fixed cost
                self.costs.part_s = p.seconds / p.positions
            priming.left = p.left
            if p.left == 0:
                self._primed(self.priming.pop(p.key).gen, p.scores)
        for exc, keys in errors.values():
            self._failed(keys, exc)
        if out.side is not None:
            rows, n, seconds = out.side
            self.costs.side_s[rows] = seconds / n
        self._set_gauges()

    def _primed(self, gen: Generation, scores: PrimeScores | None) -> None:
        """A finished prime: its scores go out, and its row runs (from this call's decode)."""
        if scores is not None:
            start = gen.request.score_from or 0
            tokens = gen.request.prime[start:]
            scored = Scored(start, Logprobs(tokens, scores.logprobs, scores.top))
            gen.matcher.scored = scored  # its final event carries it
            if gen.request.stream:
                self.outbox.add(gen, [scored])
            self._urgent = True
        if gen.request.max_new == 0:
            self._score_only_done(gen)
        else:
            self._joined(gen, time.perf_counter())

    def _joined(self, gen: Generation, now: float) -> None:
        gen.timings.warmed = now
        self.rows[gen.key] = gen

    def _score_only_done(self, gen: Generation) -> None:
        now = time.perf_counter()
        gen.timings.warmed = gen.timings.ended = now
        asked = gen.request.logprobs is not None
        lp = Logprobs("", [], [] if gen.request.logprobs else None) if asked else None
        gen.matcher.finished = True
        self.outbox.add(gen, [Done("", "length", lp, gen.matcher.scored)])
        self._urgent = True

    # -- events ------------------------------------------------------------------------------

    _urgent = False  # a first character or a final event this iteration: hand over at once

    def _emit(self, runs: list[RowRun], now: float) -> None:
        """Each row's run into its text, and its events on. A row that finishes part-way
        through a run drops the rest. A failure in one row's events ends that row alone."""
        generated = 0
        for run in runs:
            gen = self.rows.get(run.key)
            if gen is None or gen.matcher.finished:
                continue
            if not len(gen.matcher):
                self._ttfc.observe(now - gen.timings.submitted)
                self._urgent = True
            generated += self._row_guarded(gen, self._emit_row, gen, run)
            if gen.matcher.finished:
                gen.timings.ended = now
                self._urgent = True
        self._generated.inc(generated)

    def _emit_row(self, gen: Generation, run: RowRun) -> int:
        """One row's run into its text and events; the characters it drew."""
        self.outbox.add(gen, gen.matcher.push(run.text, run.logprobs, run.top, ended=run.ended))
        return len(run.text)

    def _row_guarded(self, gen: Generation, work: Callable[..., int], *args: object) -> int:
        """Run one row's own work (no network call): if it raises, that row ends with an
        error, the runner forgets it at the next call, and nothing else changes."""
        try:
            return work(*args)
        except Exception as exc:
            log.exception("a row's work failed for model %s", self.name)
            gen.matcher.finished = True
            self.outbox.row_failed(gen, exc)
            return 0

    def _drop_finished(self) -> None:
        done = [k for k, g in self.rows.items() if g.matcher.finished]
        for key in done:
            del self.rows[key]
        self._forget.update(done)
        if done:
            self._set_gauges()

    def _set_gauges(self) -> None:
        self.metrics.active.labels(self.name).set(len(self.rows))
        self.metrics.priming.labels(self.name).set(len(self.priming))
        self.metrics.queue_depth.labels(self.name).set(len(self.waiting))
