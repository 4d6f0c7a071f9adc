"""A run's progress: the counters, the best score and the history that a resumable checkpoint
saves and --resume restores, and the run's length once it is planned."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """Everything needed to continue a run exactly where it stopped."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_val_nll: float = math.inf
    bad_evals: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Decided once the step time is measured (training.plan.PLAN_AT), then kept across resumes.
    total_steps: int | None = None
    eval_every: int | None = None
    planned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)
