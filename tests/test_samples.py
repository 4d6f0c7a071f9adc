"""Many samples from one prime: a prime in progress is run once for every request that waits
for the same text, and a request's ``n`` samples (``best_of`` ranked) each equal the single
request with its seed."""

from __future__ import annotations

from app.engine.request import Done
from tests.fakes import FakeRunner, make_gen, make_loop


def _finals(results: list) -> dict[int, Done]:
    return {g.key: e for g, events in results for e in events if isinstance(e, Done)}


def test_requests_with_the_same_prime_run_it_once():
    runner, results = FakeRunner(), []
    loop = make_loop(runner, results)
    gens = [make_gen("a" * 200) for _ in range(3)]
    for g in gens:
        loop.submit(g)
    for _ in range(12):
        loop._iterate()
    assert sum(runner.primed) == 200  # one prime's positions, not three
    finals = _finals(results)
    assert [finals[g.key].generated_text for g in gens] == ["bbbbb"] * 3


def test_a_follower_takes_over_a_prime_whose_leader_left():
    runner, results = FakeRunner(), []
    loop = make_loop(runner, results)
    leader, follower = make_gen("a" * 300), make_gen("a" * 300)
    loop.submit(leader)
    loop.submit(follower)
    loop._iterate()
    assert loop.priming[follower.key].follows
    loop.cancel(leader)
    for _ in range(12):
        loop._iterate()
    assert sum(runner.primed) == 300  # what the leader ran was not run again
    assert _finals(results)[follower.key].generated_text == "bbbbb"
    assert leader.key not in _finals(results)
