"""What ``--precision`` runs, per device, and the training forward pass that runs it.

PyTorch's CUDA autocast casts cuDNN's RNNs to fp16 whatever dtype was asked
(``aten/src/ATen/cudnn/AutocastRNN.cpp``), so a plain ``autocast(bfloat16)`` around the whole
model runs the LSTM in fp16, where its small gradients can underflow without a GradScaler.
Each precision therefore says exactly what runs:

- fp32: everything in fp32 (on CUDA with TF32 off).
- tf32 (CUDA only): fp32 weights; matmuls and cuDNN's LSTM in TF32.
- bf16: on a CPU, autocast bf16 over the whole forward (oneDNN runs the LSTM in bf16, which
  has fp32's exponent range); on CUDA, embedding and head under bf16 autocast and the LSTM
  outside autocast, in fp32 with TF32.
- fp16 (CUDA only): autocast fp16 (the LSTM in fp16 too) with a GradScaler.

Weights, optimizer state and validation stay fp32 in every case.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from charrnn.model import CharRNN, State
from training import regularize
from training.errors import TrainingError
from training.loss import linear_cross_entropy
from training.regularize import Regularizers

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
# Above this many logits in a batch (128 MiB of fp32) the head and the loss run in slices.
FUSED_HEAD_LOGITS = 1 << 25


@dataclass(frozen=True)
class Precision:
    name: str
    device_type: str
    autocast: torch.dtype | None  # autocast dtype around the forward pass; None: off
    rnn_autocast: bool  # False: the LSTM runs outside autocast, in fp32
    tf32: bool  # TF32 for CUDA matmuls and cuDNN
    grad_scaler: bool  # scale the loss (fp16's narrow exponent range)

    def rnn_dtype(self, cell: str = "lstm") -> torch.dtype:
        """The dtype the recurrent layers compute in (CPU autocast has a bf16 LSTM, no GRU)."""
        if not (self.autocast and self.rnn_autocast):
            return torch.float32
        if cell == "gru" and self.device_type == "cpu":
            return torch.float32
        return self.autocast

    def describe(self, cell: str = "lstm") -> str:
        def name(dtype: torch.dtype | None) -> str:
            if dtype in (None, torch.float32):
                return "tf32" if self.tf32 else "fp32"
            return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

        scaler = ", GradScaler" if self.grad_scaler else ""
        return (
            f"{self.name} on {self.device_type}: embedding/head {name(self.autocast)}, "
            f"{cell.upper()} {name(self.rnn_dtype(cell))}{scaler}; weights fp32"
        )

    def apply_tf32(self) -> None:
        """Make TF32 the explicit choice it is (PyTorch's defaults differ for matmul/cuDNN)."""
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    def autocast_context(self) -> Any:
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast)


def resolve(name: str, device: torch.device) -> Precision:
    """The policy for ``--precision NAME`` on ``device``; one line when it cannot run there."""
    cuda = device.type == "cuda"
    if name not in PRECISIONS:
        raise TrainingError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if name in ("tf32", "fp16") and not cuda:
        raise TrainingError(f"--precision {name} needs CUDA; on a CPU use fp32 or bf16")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainingError("--precision bf16: this GPU has no bf16; use fp16 or tf32")
    if name == "fp32":
        return Precision(name, device.type, None, True, False, False)
    if name == "tf32":
        return Precision(name, device.type, None, True, True, False)
    if name == "fp16":
        return Precision(name, device.type, torch.float16, True, False, True)
    # bf16: on CUDA, keep cuDNN's LSTM out of autocast (it would run in fp16, not bf16).
    return Precision(name, device.type, torch.bfloat16, not cuda, cuda, False)


class TrainForward(nn.Module):
    """The model's forward pass under a precision policy, with the training-time regularisers
    (training/regularize.py); what DDP wraps."""

    def __init__(self, model: CharRNN, precision: Precision, regs: Regularizers | None = None):
        super().__init__()
        self.model = model
        self.precision = precision
        self.regs = regs or Regularizers()
        # The AR/TAR part of the last loss, so the logged train loss can stay cross-entropy.
        self.penalty: torch.Tensor | float = 0.0

    def forward(
        self, ids: torch.Tensor, state: State | None, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State]:
        """(logits, state); given targets, (mean cross-entropy loss plus AR/TAR, state)."""
        vocab = self.model.config.vocab_size
        small = targets is None or targets.numel() * vocab <= FUSED_HEAD_LOGITS
        if small and not self.regs.active:
            logits, new = self._logits(ids, state)
            if targets is None:
                return logits, new
            return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1)), new
        out, raw, new = self._features(ids, state)
        head = self.model.head
        if targets is None or small:
            with self.precision.autocast_context():
                logits = head(out)
            if targets is None:
                return logits, new
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
        else:  # a large vocabulary: the head and the loss in slices (training/loss.py)
            dtype = self.precision.autocast or torch.float32
            flat = out.reshape(-1, out.shape[-1])
            loss = linear_cross_entropy(flat, head.weight, head.bias, targets.reshape(-1), dtype)
        penalty = regularize.activation_penalty(out, raw, self.regs)
        self.penalty = penalty.detach() if isinstance(penalty, torch.Tensor) else penalty
        return loss + penalty, new

    def _logits(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        p, m = self.precision, self.model
        if p.rnn_autocast:
            with p.autocast_context():
                return m(ids, state)
        out, _, new = self._features(ids, state)
        with p.autocast_context():
            return m.head(out), new

    def _features(
        self, ids: torch.Tensor, state: State | None
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """The model's forward pass up to the head: the last layer's outputs with the dropout
        before the head and without it, and the new state."""
        p, m = self.precision, self.model
        hx: Any = None
        if state is not None:
            hx = (state[0], state[1]) if m.n_state == 2 else state[0]
        x = regularize.embed(m, ids, self.regs)
        if p.rnn_autocast:
            with p.autocast_context():
                out, new = regularize.recur(m, x, hx, self.regs)
        else:
            with torch.autocast(p.device_type, enabled=False):
                out, new = regularize.recur(m, x.float(), hx, self.regs)
        return regularize.output_dropout(m, out, self.regs), out, new
