"""Generation controls: what a request may ask of the sampler beyond temperature, top-k and
top-p (the contract's "Generation controls"), one set per row.

Order, per step: ``logit_bias``; ``repetition_penalty``, ``presence_penalty``,
``frequency_penalty`` over the last ``penalty_last_n`` characters (prime + generated); DRY;
``banned_strings`` (and a constraint) as masks; temperature; top-k; ``typical_p``; top-p;
``min_p``. A row with the defaults samples bit for bit as without controls."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_BIAS = 100.0
MAX_PENALTY_LAST_N = 4096
MAX_DRY_BREAKERS = 16
MAX_DRY_BREAKER_CHARS = 16
MAX_DRY_ALLOWED_LENGTH = 256
MAX_BANNED_STRINGS = 64
MAX_BANNED_CHARS = 64


@dataclass(frozen=True)
class Controls:
    """One row's controls. ``logit_bias`` maps a character's id to the value added to its
    logit; ``banned_strings`` are texts that must never end inside the generated text."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 8
    dry_sequence_breakers: tuple[str, ...] = ("\n",)
    dry_penalty_last_n: int = 1024
    banned_strings: tuple[str, ...] = ()
    min_p: float = 0.0
    typical_p: float = 1.0

    def __post_init__(self) -> None:
        for i, b in self.logit_bias:
            if not (i >= 0 and math.isfinite(b) and -MAX_BIAS <= b <= MAX_BIAS):
                raise ValueError(f"logit_bias: {b} for id {i} is outside [-100, 100]")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError("repetition_penalty must be in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]")
        for name in ("penalty_last_n", "dry_penalty_last_n"):
            if not 0 <= getattr(self, name) <= MAX_PENALTY_LAST_N:
                raise ValueError(f"{name} must be in [0, {MAX_PENALTY_LAST_N}]")
        if not 0 <= self.dry_multiplier <= 10:
            raise ValueError("dry_multiplier must be in [0, 10]")
        if not 1 < self.dry_base <= 4:
            raise ValueError("dry_base must be in (1, 4]")
        if not 1 <= self.dry_allowed_length <= MAX_DRY_ALLOWED_LENGTH:
            raise ValueError(f"dry_allowed_length must be in [1, {MAX_DRY_ALLOWED_LENGTH}]")
        if len(self.dry_sequence_breakers) > MAX_DRY_BREAKERS or not all(
            1 <= len(b) <= MAX_DRY_BREAKER_CHARS for b in self.dry_sequence_breakers
        ):
            raise ValueError("dry_sequence_breakers: at most 16 strings of 1 to 16 characters")
        if len(self.banned_strings) > MAX_BANNED_STRINGS or not all(
            1 <= len(b) <= MAX_BANNED_CHARS for b in self.banned_strings
        ):
            raise ValueError("banned_strings: at most 64 strings of 1 to 64 characters")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if not 0 < self.typical_p <= 1:
            raise ValueError("typical_p must be in (0, 1]")

    @property
    def active(self) -> bool:
        """Whether anything differs from plain sampling."""
        return self != DEFAULT


DEFAULT = Controls()
