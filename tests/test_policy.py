"""The scheduling policy on numbers alone, the decode loop against a fake runner, and the
per-row stage: microseconds each, no model beyond a tiny one."""

from __future__ import annotations

import time

import numpy as np
import torch

from app.engine.policy import MAX_STEPS, MIN_PRIME_PART, Costs, Policy
from app.engine.request import Done
from app.runner import Batch, ModelRunner, Sampled
from charrnn import SamplingParams, Vocabulary
from charrnn.checkpoint import Checkpoint
from charrnn.structured import Constraint, compile_constraint, generate_constrained
from tests.conftest import make_text, tiny_model
from tests.fakes import FakeRunner, make_gen, make_loop

POLICY = Policy(max_concurrent=8, prime_budget=512, prime_slice_s=0.012)


def test_admission_fills_free_places_only():
    assert POLICY.admissions(waiting=10, active=3) == 5
    assert POLICY.admissions(waiting=2, active=3) == 2
    assert POLICY.admissions(waiting=4, active=8) == 0


def test_short_primes_go_first_and_the_budget_holds():
    work = POLICY.prime_work([2000, 10, 300, 40], Costs())
    order = [i for i, _ in work.parts]
    assert order[:2] == [1, 3]  # the primes that fit their share, shortest first
    assert sum(n for _, n in work.parts) <= 512
    assert dict(work.parts)[1] == 10 and dict(work.parts)[3] == 40


def test_the_time_slice_bounds_the_work_on_a_slow_cpu():
    slow = Costs(part_s=1e-3)  # 12 positions fit in 12 ms: the part is the minimum
    work = POLICY.prime_work([5000], slow)
    assert work.parts == ((0, MIN_PRIME_PART),)


def test_fp32_parts_are_cut_on_their_blocks():
    fp32 = Policy(8, 800, 1.0, prime_align=256)
    assert fp32.prime_work([1000], Costs()).parts == ((0, 768),)
    assert fp32.prime_work([700], Costs()).parts == ((0, 700),)  # the rest fits: all of it


def test_many_exact_primes_go_side_by_side():
    lockstep = Policy(64, 512, 0.012, lockstep=True)
    work = lockstep.prime_work([100] * 16 + [20], Costs())
    assert work.side_by_side == 20 and not work.parts  # no further than the shortest
    timed = Costs(side_s={17: 1e-3})
    assert lockstep.prime_work([100] * 17, timed).side_by_side == 12
    assert lockstep.prime_work([100] * 15, Costs()).parts  # below 16: one after another


def test_decode_calls_are_sized_to_the_measured_step():
    costs = Costs(step_s={4: 100e-6})
    steps = POLICY.decode_steps
    assert steps([500] * 4, fused=True, first_pending=False, priming=False, costs=costs) == 30
    assert (
        steps([5, 500, 500, 500], fused=True, first_pending=False, priming=False, costs=costs) == 5
    )
    assert steps([500] * 4, fused=True, first_pending=True, priming=False, costs=costs) == 1
    assert steps([500] * 4, fused=True, first_pending=False, priming=True, costs=costs) == 1
    assert steps([500] * 4, fused=False, first_pending=False, priming=False, costs=costs) == 1
    assert steps([500] * 3, fused=True, first_pending=False, priming=False, costs=costs) == 1
    fast = Costs(step_s={1: 1e-6})
    assert steps([500], fused=True, first_pending=False, priming=False, costs=fast) == MAX_STEPS


def test_the_loop_runs_the_plan_and_finishes_rows_against_a_fake_runner():
    runner, results = FakeRunner(), []
    loop = make_loop(runner, results)
    gens = [make_gen("a" * n) for n in (3, 200, 1)]
    for g in gens:
        loop.submit(g)
    for _ in range(10):
        loop._iterate()
    # The short primes first; the long one in what is left of each budget of 64.
    assert runner.primed[:3] == [1, 3, 60] and runner.primed[3:] == [64, 64, 12]
    finals = [e for g, events in results for e in events if isinstance(e, Done)]
    assert len(finals) == 3 and all(d.generated_text == "bbbbb" for d in finals)
    assert not (loop.rows or loop.priming or loop.waiting)


class ShortRunner(FakeRunner):
    """A runner whose decode call runs at most two steps, however many were planned (as a
    masked call whose guess failed does), each taking at least ``STEP_S``."""

    STEP_S = 0.0004

    def decode(self, batch: Batch, positions: np.ndarray, steps: int) -> tuple[Sampled, Batch]:
        ran = min(steps, 2)
        time.sleep(self.STEP_S * ran)
        self.planned.append(steps)
        return super().decode(batch, positions, ran)


def test_the_per_step_cost_is_learned_from_the_steps_that_ran():
    """The policy sizes calls from the measured time per step: a call that ran fewer steps
    than planned must count the steps it ran, or a short call would look fast and the next
    ones be planned ever longer."""
    runner, results = ShortRunner(), []
    runner.planned = []
    loop = make_loop(runner, results)
    loop.submit(make_gen(max_new=10**6))
    for _ in range(30):
        loop._iterate()
    assert max(runner.planned) > 2  # calls were planned longer than they ran
    assert loop.costs.step_s[1] >= ShortRunner.STEP_S


def test_a_cancelled_generation_leaves_wherever_it_is():
    runner, results = FakeRunner(), []
    loop = make_loop(runner, results)
    queued, priming, running = (
        make_gen(max_new=10**6),
        make_gen("a" * 10_000),
        make_gen(max_new=10**6),
    )
    loop.submit(running)
    loop._iterate()
    assert list(loop.rows.values()) == [running]
    loop.submit(priming)
    loop._iterate()
    assert [p.gen for p in loop.priming.values()] == [priming]
    for g in (make_gen(max_new=10**6), make_gen(max_new=10**6), queued):
        loop.submit(g)
    loop._iterate()
    assert queued in loop.waiting  # four places: the fifth waits
    for g in (queued, priming, running):
        loop.cancel(g)
    loop._iterate()
    assert queued not in loop.waiting and running.key not in loop.rows
    assert priming.key not in loop.priming


def _runner() -> ModelRunner:
    vocab = Vocabulary.from_text(make_text())
    return ModelRunner(Checkpoint(tiny_model(vocab, seed=4), vocab), torch.device("cpu"))


def test_a_batch_without_per_row_work_takes_the_fused_call_bit_for_bit():
    """No per-row work anywhere: the fused multi-character call, with the same ids as stepping
    one character at a time."""
    runner = _runner()
    primed = runner.prime(runner.encode("the "), None)
    batch = Batch.concat(
        [runner.new_row(*primed, SamplingParams(0.9, 5, 0.95, i)) for i in range(3)]
    )
    with runner.worker():
        fused, _ = runner.decode(batch, np.zeros(3, dtype=np.uint64), 20)
        one, b = [], batch
        for pos in range(20):
            sampled = runner.sample(b, np.full(3, pos, dtype=np.uint64))
            one.append(sampled.ids[0])
            b = runner.forward(b, sampled)
    assert torch.equal(fused.ids, torch.stack(one))


def test_a_constrained_row_carries_its_matcher_through_concat_and_select():
    """Free rows around a constrained one: ``concat`` and ``select`` keep each row's matcher
    and mask with it; the constrained row gets ``generate_constrained``'s text, the free ones
    the fused call's ids; a batch whose constrained rows left pays nothing (fusable again)."""
    runner = _runner()
    grammar = compile_constraint(runner.vocab, Constraint.parse({"regex": "[a-z]+ [a-z]+"}))
    primed = runner.prime(runner.encode("the "), None)
    params = [SamplingParams(0.9, None, 1.0, i) for i in range(3)]
    matcher = grammar.matcher()
    rows = [
        runner.new_row(*primed, params[0]),
        runner.new_row(*primed, params[1], None, matcher),
    ]
    batch = Batch.concat([Batch.concat(rows), runner.new_row(*primed, params[2])])
    assert not runner.fusable(batch)
    free = Batch.concat([runner.new_row(*primed, p) for p in (params[0], params[2])])
    out: list[list[int]] = [[], [], []]
    with runner.worker():
        fused, _ = runner.decode(free, np.zeros(2, dtype=np.uint64), 40)
        live = [0, 1, 2]
        for pos in range(40):
            sampled = runner.sample(batch, np.full(len(live), pos, dtype=np.uint64))
            batch = runner.forward(batch, sampled)
            for b, i in zip(live, sampled.runs(), strict=True):
                out[b] += i
            if 1 in live and (out[1][-1] == len(runner.vocab) or matcher.done):
                batch = batch.select([0, 2])
                live = [0, 2]
                assert runner.fusable(batch)
    ref = generate_constrained(
        runner.model, runner.vocab, "the ", 40, params[1], grammar, runner.decoder
    )
    assert runner.vocab.decode([i for i in out[1] if i < len(runner.vocab)]) == ref.text
    assert ref.matched and matcher.matched
    assert out[0] == fused.ids[:, 0].tolist() and out[2] == fused.ids[:, 1].tolist()
