"""Reading the corpus and cutting it into the notebook's contiguous-stream batches."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from charrnn.vocab import Vocabulary
from training.errors import TrainingError


def read_corpus(path: str | Path) -> str:
    """The whole file as text; refuses missing, empty or non-UTF-8 files in one line."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"data file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TrainingError(f"cannot read data file {path}: {e.strerror}") from None
    if not raw.strip():
        raise TrainingError(f"data file is empty: {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingError(
            f"data file is not valid UTF-8: {path} (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split(text: str, val_frac: float) -> tuple[str, str]:
    """The last ``val_frac`` of the text is held out for validation."""
    cut = int(len(text) * (1 - val_frac))
    return text[:cut], text[cut:]


@dataclass(frozen=True)
class Batches:
    """Inputs and targets [rows, n_batches * seq_len] on the device; batch i is a column slice.

    Each row is one contiguous stream of the text, so the hidden state at the end of batch i
    is the right starting state for the same row in batch i + 1 (as in the notebook)."""

    x: torch.Tensor
    y: torch.Tensor
    seq_len: int

    @property
    def n_batches(self) -> int:
        return self.x.shape[1] // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        cols = slice(i * self.seq_len, (i + 1) * self.seq_len)
        return self.x[:, cols], self.y[:, cols]


def make_batches(
    ids: torch.Tensor, batch_size: int, seq_len: int, rank: int = 0, world: int = 1
) -> Batches:
    """Cut ``ids`` into ``batch_size`` streams; with DDP each rank takes every world-th row."""
    per_batch = batch_size * seq_len
    n = (len(ids) - 1) // per_batch
    if n < 1:
        raise TrainingError(
            f"text too short for one batch: {len(ids)} training characters, need at least "
            f"{per_batch + 1} (batch-size {batch_size} x seq-len {seq_len} + 1); "
            "lower --batch-size or --seq-len"
        )
    x = ids[: n * per_batch].view(batch_size, -1)
    y = ids[1 : n * per_batch + 1].view(batch_size, -1)
    return Batches(x[rank::world].contiguous(), y[rank::world].contiguous(), seq_len)


def encode(vocab: Vocabulary, text: str, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(vocab.encode(text), dtype=torch.long, device=device)
