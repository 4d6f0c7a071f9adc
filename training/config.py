"""Training settings. Defaults are the notebook's recipe (2x512 LSTM, dropout 0.5, batch 128,
sequence 100, Adam 1e-3, clip 5, 70 epochs, last 10% for validation); a run with a time
budget (``--max-minutes``) takes BUDGET_RECIPE for every setting not given."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from training.errors import TrainingError
from training.regularize import Regularizers

Schedule = Literal["constant", "onecycle", "cosine"]

# The settings a budgeted run (--max-minutes) takes unless given: picked by measurement on a
# 738 KB English text and on Alice on a 2-core CPU (see the README's Training section). The
# budget ends the run, or 30 epochs if it buys more: on Alice, 79 epochs of one cycle reached
# their best validation NLL at epoch 27 and overfitted from there, annealing or not.
BUDGET_RECIPE: dict[str, Any] = {
    "batch_size": 64,
    "dropout": 0.2,
    "schedule": "onecycle",
    "lr": 4e-3,
    "precision": "bf16",
    "epochs": 30,
}
# What a budgeted run takes instead where its budget buys AWD_FROM_EPOCHS epochs or more (a
# small text, a long budget), with none of these settings given: the shipped Alice model's
# recipe (models/README.md). AWD-LSTM's regularisers keep it improving to epoch 40, where
# dropout alone overfits from about 27. Where a budget buys a few epochs (the larger texts)
# they cost more than they save, so they stay off there (README, "Budgeted training").
AWD_FROM_EPOCHS = 30
AWD_RECIPE: dict[str, Any] = {
    "epochs": 40,
    "dropout": 0.45,
    "embed_dropout": 0.2,
    "weight_decay": 0.3,
    "weight_drop": 0.3,
    "locked_dropout": True,
    "ar": 2.0,
    "tar": 1.0,
}


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
    # AWD-LSTM's regularisers (training/regularize.py), training-time only; all off by default.
    weight_drop: float = 0.0
    locked_dropout: bool = False
    char_dropout: float = 0.0
    ar: float = 0.0
    tar: float = 0.0
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
    # What runs in reduced precision: see training/precision.py.
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = "fp32"
    # Validate every N optimizer steps; None: at each epoch's end, or every AUTO_EVAL_S of
    # training when an epoch is longer than that.
    eval_every: int | None = None
    # Validate on a fixed sample of this many held-out characters; None: the whole tail as one
    # stream when it is at most AUTO_EVAL_CHARS, else a sample of that many.
    eval_chars: int | None = None
    max_steps: int | None = None
    # A time budget: the LR schedule is sized from the measured step time to end with it.
    max_minutes: float | None = None
    # With max_minutes: pick dropout, embedding dropout and weight decay from the number of
    # epochs the budget buys (measured), instead of the values above.
    auto_regularization: bool = False
    # With auto_regularization, and --epochs and the AWD flags not given either: take
    # AWD_RECIPE where the budget buys AWD_FROM_EPOCHS epochs or more.
    auto_awd: bool = False
    # Continued training: start from this checkpoint's weights and architecture (hidden,
    # layers, embed and cell must be its own), its vocabulary grown by the text's new
    # characters (training/finetune.py).
    init_from: Path | None = None
    # Write the training text's index (charrnn/textindex.py) beside the checkpoint.
    keep_index: bool = False
    cache_dir: Path | None = None  # the id cache; None: training.data.default_cache_dir()
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
            (0 <= self.weight_drop < 1, "--weight-drop must be in [0, 1)"),
            (0 <= self.char_dropout < 1, "--char-dropout must be in [0, 1)"),
            (0 <= self.ar < math.inf, "--ar must be a finite number >= 0"),
            (0 <= self.tar < math.inf, "--tar must be a finite number >= 0"),
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
            (
                self.precision in ("fp32", "tf32", "bf16", "fp16"),
                "--precision must be fp32, tf32, bf16 or fp16",
            ),
            (self.eval_every is None or self.eval_every >= 1, "--eval-every must be >= 1"),
            (self.eval_chars is None or self.eval_chars >= 1, "--eval-chars must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.max_minutes is None or self.max_minutes > 0, "--max-minutes must be > 0"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)

    def regularizers(self) -> Regularizers:
        return Regularizers(
            self.weight_drop, self.locked_dropout, self.char_dropout, self.ar, self.tar
        )

    def to_meta(self) -> dict[str, Any]:
        """The settings as plain values for the checkpoint (paths as strings)."""
        meta = asdict(self)
        meta["data"] = str(self.data)
        meta["out"] = str(self.out)
        meta["init_from"] = str(self.init_from) if self.init_from is not None else None
        for key in ("resume", "progress", "threads", "cache_dir"):
            meta.pop(key)
        return meta
