"""A batch of decoding rows as the runner's primitives take it, and what one call drew."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.runner.plan import Top
from app.runner.stage import BatchStage
from charrnn.model import State
from charrnn.sampling import SamplingBatch

# One row's part of a call: its characters' logprobs and their alternatives (None where the
# row asked for none); a row that asked for no logprobs has NO_LOGPROBS, so every reader
# takes every row the same way, whatever the other rows of the call asked for.
RowLogprobs = tuple[list[float] | None, list[Top] | None]
NO_LOGPROBS: RowLogprobs = (None, None)


@dataclass
class Batch:
    """The rows currently decoding: their next-character logits, recurrent state, sampling
    parameters, the logprobs each wants (-1: none) and their per-row stage (None: no row has
    per-row work)."""

    logits: torch.Tensor  # [B, V]
    state: State  # each [L, B, H]
    sampling: SamplingBatch
    logprobs: np.ndarray  # [B]
    stage: BatchStage | None = None

    def __len__(self) -> int:
        return len(self.logprobs)

    def select(self, keep: list[int]) -> Batch:
        idx = torch.tensor(keep, device=self.logits.device)
        return Batch(
            self.logits.index_select(0, idx),
            tuple(s.index_select(1, idx) for s in self.state),
            self.sampling.select(keep),
            self.logprobs[keep],
            self.stage.select(keep) if self.stage is not None else None,
        )

    def moved(self, logits: torch.Tensor, state: State) -> Batch:
        """The same rows after a step."""
        return dataclasses.replace(self, logits=logits, state=state)

    @staticmethod
    def concat(parts: Sequence[Batch]) -> Batch:
        if len(parts) == 1:
            return parts[0]
        return Batch(
            torch.cat([p.logits for p in parts]),
            tuple(torch.cat(s, dim=1) for s in zip(*(p.state for p in parts), strict=True)),
            SamplingBatch.concat([p.sampling for p in parts]),
            np.concatenate([p.logprobs for p in parts]),
            BatchStage.concat([(p.stage, len(p)) for p in parts]),
        )


@dataclass
class Sampled:
    """What one call drew: ``ids`` [S, B] (S characters for each of B rows) and each row's
    logprobs (``NO_LOGPROBS`` for a row that did not ask)."""

    ids: torch.Tensor
    logprobs: list[RowLogprobs]

    def runs(self) -> list[list[int]]:
        """Each row's characters, in order."""
        return self.ids.t().tolist()
