"""The one call between the decode loop and the model runner, as in vLLM's V1: each iteration
the loop hands ``ModelRunner.execute`` a ``Plan`` and gets one ``Output`` back.

The loop (app/engine/loop.py) knows generations, counts and the policy; the runner knows
tensors. A plan names rows by key only: the generations admitted (their primes, how their
rows sample), those to forget, the prime work the policy chose, and how many characters the
running rows make. The output gives, per row, the characters drawn and the logprobs asked
for; per prime, how far it went and its scores; the steps the decode call ran and the time
it took. Which native path serves a plan (fused, masked, stepwise, a CUDA graph, sampling
before the network step) is the runner's own business.

A call runs, in order: forget ``drop``; the admissions' primes start (an admission whose
prime is cached is ready at once; one whose prime, unscored, is in progress follows it
instead of running it again: the samples of one request, or popular primes);
``prime_parts`` / ``side_by_side`` run; the rows that are ready (cached primes, primes that
finished) join; then the decode call over every running row, which hands the rows that
just joined their first character."""

from __future__ import annotations

from dataclasses import dataclass, field

from charrnn.controls import DEFAULT, Controls
from charrnn.sampling import SamplingParams
from charrnn.structured import Matcher

# One character's likeliest alternatives, likeliest first: (character, logprob).
Top = list[tuple[str, float]]
RowKey = int


@dataclass(frozen=True)
class NewRow:
    """A generation the runner has not seen: its prime, and how its row samples."""

    key: RowKey
    prime: str
    sampling: SamplingParams
    # Logprobs of each generated character and this many alternatives (None: none).
    logprobs: int | None = None
    # Score the prime's characters from this position on (None: not scored). A scored prime
    # runs in full, never from the prime cache.
    score_from: int | None = None
    score_top: int = 0
    # The row's constraint (None: free text): the runner steps it; the engine reads whether
    # the match is over or complete.
    constraint: Matcher | None = None
    # False: only the prime's scores are wanted (no row joins the batch).
    generates: bool = True
    # The generation controls (charrnn/controls.py): the runner's per-row stage holds their
    # state.
    controls: Controls = DEFAULT


@dataclass(frozen=True)
class Plan:
    admit: tuple[NewRow, ...] = ()
    drop: frozenset[RowKey] = frozenset()
    # Characters per running row in the decode call (0: no call). Rows that wait for their
    # first character are planned one step.
    steps: int = 0
    # Positions for every prime in progress at once (0: none), or parts run one by one.
    side_by_side: int = 0
    prime_parts: tuple[tuple[RowKey, int], ...] = ()


@dataclass
class RowRun:
    """One row's part of the decode call: the characters it drew, up to "end" (a constrained
    row's match is over: ``ended``), with their logprobs and alternatives when asked for."""

    key: RowKey
    text: str
    ended: bool = False
    logprobs: list[float] | None = None
    top: list[Top] | None = None


@dataclass
class PrimeScores:
    """The scored part of a finished prime, ``prime[score_from:]``: a logprob per character
    (None for a first character with nothing before it) and, when asked for, alternatives."""

    logprobs: list[float | None]
    top: list[Top | None] | None


@dataclass
class Primed:
    """One prime's progress in this call. ``left == 0``: it finished, and its row (if it
    generates) joined this call's decode; ``cached``: it was in the prime cache. ``error``:
    its work failed (it is forgotten)."""

    key: RowKey
    positions: int
    left: int
    seconds: float = 0.0  # the part's own time (0 in a side-by-side group)
    scores: PrimeScores | None = None
    error: Exception | None = None
    cached: bool = False
    # The key of the prime in progress with the same text that this one waits for (its
    # positions run once, for both): it finishes with it, and needs no work of its own.
    follows: RowKey | None = None


@dataclass
class Output:
    rows: list[RowRun] = field(default_factory=list)
    steps: int = 0  # characters per row the decode call ran (a masked call may run fewer)
    decode_s: float = 0.0
    # Whether ``decode_s`` is the time of ``steps`` whole steps: a call that hands out
    # characters before the network reads them runs that step at the start of the next.
    timed: bool = True
    decode_error: Exception | None = None  # the rows of the call are forgotten
    primed: list[Primed] = field(default_factory=list)
    # The side-by-side group's rows, positions and seconds (None: no group ran).
    side: tuple[int, int, float] | None = None
