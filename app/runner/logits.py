"""The per-row logits stage, between the network and the sampler.

A row may carry processors: each sees the row's history (the ids it has generated) and its
next-character logits, and returns them changed, e.g. with the characters a constraint
forbids set to ``-inf``. The sampler then draws from what they return; the logprobs a
request asks for stay those of the network's own logits. A batch where no row has a
processor never enters this module: the runner keeps its fused multi-character call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


class LogitsProcessor(Protocol):
    def __call__(self, history: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """One row's logits [V] after ``history`` -> the logits to sample from [V]."""
        ...


@dataclass
class RowStage:
    """One row's processors, in order, and the ids the row has generated."""

    processors: tuple[LogitsProcessor, ...]
    history: list[int] = field(default_factory=list)


def apply(logits: torch.Tensor, stages: Sequence[RowStage | None]) -> torch.Tensor:
    """The batch's logits [B, V] with each staged row's processors applied (a new tensor;
    the network's own logits stay as they were, for logprobs)."""
    out = logits.clone()
    for b, stage in enumerate(stages):
        if stage is None:
            continue
        row = out[b]
        for processor in stage.processors:
            row = processor(stage.history, row)
        out[b] = row
    return out


def record(stages: Sequence[RowStage | None], ids: Sequence[int]) -> None:
    """Each staged row's sampled id joins its history."""
    for stage, i in zip(stages, ids, strict=True):
        if stage is not None:
            stage.history.append(i)
