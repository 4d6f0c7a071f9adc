"""Training settings. Defaults are the notebook's recipe (2x512 LSTM, dropout 0.5, batch 128,
sequence 100, Adam 1e-3, clip 5, 70 epochs, last 10% for validation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from training.errors import TrainingError

Schedule = Literal["constant", "onecycle", "cosine"]


@dataclass
class FitConfig:
    data: Path
    out: Path
    hidden: int = 512
    layers: int = 2
    embed: int = 64
    dropout: float = 0.5
    embed_dropout: float = 0.0
    cell: Literal["lstm", "gru"] = "lstm"
    batch_size: int = 128
    seq_len: int = 100
    epochs: int = 70
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Schedule = "constant"
    clip: float = 5.0
    val_frac: float = 0.1
    patience: int | None = None
    ema: float | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 autocast for the forward pass (weights, optimizer and validation stay fp32).
    precision: Literal["fp32", "bf16"] = "fp32"
    threads: int | None = None
    resume: bool = False
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.hidden >= 1, "--hidden must be >= 1"),
            (self.layers >= 1, "--layers must be >= 1"),
            (self.embed >= 1, "--embed must be >= 1"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
            (0 <= self.embed_dropout < 1, "--embed-dropout must be in [0, 1)"),
            (self.cell in ("lstm", "gru"), "--cell must be lstm or gru"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.seq_len >= 1, "--seq-len must be >= 1"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (0 < self.lr < 10, "--lr must be in (0, 10)"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (
                self.schedule in ("constant", "onecycle", "cosine"),
                "--schedule must be constant, onecycle or cosine",
            ),
            (self.clip > 0, "--clip must be > 0"),
            (0 < self.val_frac < 1, "--val-frac must be in (0, 1)"),
            (self.patience is None or self.patience >= 1, "--patience must be >= 1"),
            (self.ema is None or 0 < self.ema < 1, "--ema must be in (0, 1)"),
            (self.seed >= 0, "--seed must be >= 0"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (self.precision in ("fp32", "bf16"), "--precision must be fp32 or bf16"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)

    def to_meta(self) -> dict[str, Any]:
        """The settings as plain values for the checkpoint (paths as strings)."""
        meta = asdict(self)
        meta["data"] = str(self.data)
        meta["out"] = str(self.out)
        for key in ("resume", "progress", "threads"):
            meta.pop(key)
        return meta
