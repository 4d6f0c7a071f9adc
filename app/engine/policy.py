"""The scheduling policy: what one iteration of the decode thread does, decided from counts
and measured costs alone. It touches no tensor and no generation, so it is tested at
microsecond speed (tests/test_policy.py); app/engine/loop.py carries its plans out.

Each iteration admits what ``max_concurrent`` allows, runs at most ``prime_budget`` positions
of prime work (and about ``prime_slice_s`` of it: chunked prefill, as TGI's
``max_batch_prefill_tokens`` and vLLM's chunked prefill), then one decode call for every
running row. bench/README.md has the measurements behind the constants."""

from __future__ import annotations

from dataclasses import dataclass, field

# From this many primes in progress, primes whose steps are exact advance side by side as
# batched steps; below it, one prime after another is as fast and its first ones finish early.
LOCKSTEP_ROWS = 16
# A prime that runs alone gets at least this many positions per iteration: shorter parts are
# mostly the call's fixed cost.
MIN_PRIME_PART = 32
# A decode call is sized to take about this long: long enough to pay a call's Python and the
# wait for the GIL once for several characters, short enough that a request arriving meanwhile
# barely waits.
CALL_S = 0.003
MAX_STEPS = 32


@dataclass
class Costs:
    """Seconds measured as the work runs: per position of a prime part, per position of a
    side-by-side group (by its size), per decode step (by batch size). A guess until then."""

    part_s: float = 40e-6
    side_s: dict[int, float] = field(default_factory=dict)
    step_s: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PrimeWork:
    """One iteration's prime work: ``side_by_side`` positions for every prime at once, or
    ``parts``, (prime index, positions) run one after another."""

    side_by_side: int = 0
    parts: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Policy:
    max_concurrent: int
    prime_budget: int
    prime_slice_s: float
    # Whether primes may advance side by side (the runner's steps give a prime's numbers).
    lockstep: bool = False
    # Where a prime may be cut into parts: at multiples of this many positions.
    prime_align: int = 1

    def admissions(self, waiting: int, active: int) -> int:
        """How many waiting generations to admit, with ``active`` primed or running."""
        return max(0, min(waiting, self.max_concurrent - active))

    def prime_work(self, left: list[int], costs: Costs) -> PrimeWork:
        """The work for primes in progress with ``left`` positions each (arrival order)."""
        if not left:
            return PrimeWork()
        if self.lockstep and len(left) >= LOCKSTEP_ROWS:
            positions = max(1, self.prime_budget // len(left))
            step_s = costs.side_s.get(len(left))
            if step_s is not None:
                positions = max(1, min(positions, int(self.prime_slice_s / step_s)))
            return PrimeWork(side_by_side=min(positions, min(left)))
        in_slice = max(MIN_PRIME_PART, int(self.prime_slice_s / costs.part_s))
        budget = min(self.prime_budget, in_slice)
        share = max(MIN_PRIME_PART, budget // len(left))
        # The primes that end within their share first (shortest first), then the others in
        # arrival order: a short prime never waits behind long ones, and long ones finish one
        # after another rather than all late.
        short = sorted((i for i, n in enumerate(left) if n <= share), key=lambda i: left[i])
        long = [i for i, n in enumerate(left) if n > share]
        parts = []
        for i in short + long:
            if budget <= 0:
                break
            n = self._part(left[i], max(share, budget))
            parts.append((i, n))
            budget -= n
        return PrimeWork(parts=tuple(parts))

    def _part(self, left: int, most: int) -> int:
        """Positions for a prime's next part: all that is left if it fits in ``most``, else
        ``most`` cut down to the alignment (fp32 parts start on fixed blocks)."""
        if left <= most:
            return left
        align = self.prime_align
        return min(left, max(align, most // align * align))

    def decode_steps(
        self, left: list[int], *, fused: bool, first_pending: bool, priming: bool, costs: Costs
    ) -> int:
        """Characters per row for the next decode call over rows that still want ``left``
        characters each. One while a row waits for its first character or primes wait for
        their turn (the call then ends soon), or where the runner cannot make several
        characters a call (``fused``: the native kernels); else as many as fit in ``CALL_S``
        at this batch size, once that size has been timed."""
        if first_pending or priming or not fused:
            return 1
        per_step = costs.step_s.get(len(left))
        if per_step is None:
            return 1
        return max(1, min(MAX_STEPS, min(left), int(CALL_S / per_step)))
