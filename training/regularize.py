"""AWD-LSTM's regularisers (Merity et al., "Regularizing and Optimizing LSTM Language Models"),
as training-time devices only: the network that is saved, served and quantized is the same
``CharRNN``, with the same parameters and state_dict keys.

- weight drop: DropConnect on the hidden-to-hidden matrices ``weight_hh_l*``. The masked
  matrices are passed to the very op ``nn.LSTM`` calls (``torch.lstm``, the fused cuDNN or
  oneDNN kernel), so there is no Python cell loop, and the mask is part of the autograd graph:
  the gradients land on the raw parameters, which is all DDP needs.
- locked (variational) dropout: one mask per sequence, shared by all its time steps, on the
  inputs (``--embed-dropout``), between the layers and before the head (``--dropout``). Between
  the layers it needs the layers run one at a time, each through the same fused op.
- character dropout (AWD's "embedding dropout"): whole rows of the embedding matrix, so a
  dropped character is dropped wherever it occurs in the batch.
- AR and TAR: the mean square of the last layer's (dropped) outputs, and of their change from
  one time step to the next, added to the loss.

With every rate at zero nothing here runs: the model's own modules do, exactly as before."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from charrnn.model import CharRNN

# cuDNN copies weights that are not one contiguous buffer at every call, and says so each time;
# DropConnected weights are new tensors every step, so that copy is the price of weight drop.
warnings.filterwarnings(
    "ignore", message="RNN module weights are not part of single contiguous", category=UserWarning
)


@dataclass(frozen=True)
class Regularizers:
    weight_drop: float = 0.0  # DropConnect rate on weight_hh_l*
    locked: bool = False  # dropout masks shared across the time steps of a sequence
    char_dropout: float = 0.0  # rate of embedding rows (characters) dropped per batch
    ar: float = 0.0  # weight of the activation penalty
    tar: float = 0.0  # weight of the temporal activation penalty

    @property
    def active(self) -> bool:
        return bool(self.weight_drop or self.locked or self.char_dropout or self.ar or self.tar)


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout on x [B, T, F] with one mask per sequence, the same at every time step."""
    if not training or p == 0:
        return x
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p).div_(1 - p)
    return x * mask


def embed(model: CharRNN, ids: torch.Tensor, regs: Regularizers) -> torch.Tensor:
    """The embedded inputs, with character dropout and the input dropout."""
    weight, p = model.embed.weight, regs.char_dropout
    if model.training and p > 0:
        keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - p).div_(1 - p)
        x = F.embedding(ids, weight * keep)
    else:
        x = model.embed(ids)
    if regs.locked:
        return locked_dropout(x, model.config.embed_dropout, model.training)
    return model.embed_drop(x)


def output_dropout(model: CharRNN, out: torch.Tensor, regs: Regularizers) -> torch.Tensor:
    """The dropout between the last layer and the head."""
    if regs.locked:
        return locked_dropout(out, model.config.dropout, model.training)
    return model.drop(out)


def rnn_weights(rnn: nn.RNNBase, p: float, training: bool) -> list[torch.Tensor]:
    """The recurrent layers' weights in the order their op takes them, ``weight_hh_l*``
    DropConnected in training (scaled by 1 / (1 - p), as dropout is)."""
    weights = []
    for name in rnn._flat_weights_names:
        w = getattr(rnn, name)
        if training and p > 0 and name.startswith("weight_hh"):
            w = F.dropout(w, p, training=True)
        weights.append(w)
    return weights


def _fused(
    rnn: nn.RNNBase,
    x: torch.Tensor,
    hx: tuple[torch.Tensor, ...],
    weights: list[torch.Tensor],
    layers: int,
    between: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``layers`` layers through the op ``rnn.forward`` calls, with these weights."""
    args = (rnn.bias, layers, between, rnn.training, False, rnn.batch_first)
    if isinstance(rnn, nn.LSTM):
        out, h, c = torch.lstm(x, hx, weights, *args)
        return out, (h, c)
    out, h = torch.gru(x, hx[0], weights, *args)
    return out, (h,)


def recur(
    model: CharRNN, x: torch.Tensor, hx: Any, regs: Regularizers
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The recurrent layers over x [B, T, E] from ``hx`` (None, (h, c) or h): the last
    layer's outputs and the new state, as ``model.rnn(x, hx)`` returns them."""
    rnn = model.rnn
    if not (regs.weight_drop or regs.locked):
        out, new = rnn(x, hx)
        return out, tuple(new) if isinstance(new, tuple) else (new,)
    layers, training = rnn.num_layers, rnn.training
    if hx is None:
        zeros = x.new_zeros(layers, x.shape[0], rnn.hidden_size)
        hx = (zeros, zeros) if isinstance(rnn, nn.LSTM) else zeros
    state = tuple(hx) if isinstance(hx, tuple) else (hx,)
    weights = rnn_weights(rnn, regs.weight_drop, training)
    if not regs.locked or layers == 1:  # nn.LSTM's own dropout between the layers
        return _fused(rnn, x, state, weights, layers, rnn.dropout)
    per = len(weights) // layers
    finals: list[tuple[torch.Tensor, ...]] = []
    for k in range(layers):
        if k:
            x = locked_dropout(x, model.config.dropout, training)
        layer_state = tuple(s[k : k + 1] for s in state)
        x, new = _fused(rnn, x, layer_state, weights[k * per : (k + 1) * per], 1, 0.0)
        finals.append(new)
    return x, tuple(torch.cat(parts) for parts in zip(*finals, strict=True))


def _mean_square(x: torch.Tensor) -> torch.Tensor:
    # A norm accumulated in fp32 reads a bf16 tensor once, with no fp32 copy of it: about
    # half the time of x.float().pow(2).mean() forward and backward.
    return torch.linalg.vector_norm(x, dtype=torch.float32).square() / x.numel()


def activation_penalty(
    dropped: torch.Tensor, raw: torch.Tensor, regs: Regularizers
) -> torch.Tensor | float:
    """AR on the last layer's dropped outputs plus TAR on its raw outputs' change per step."""
    penalty: torch.Tensor | float = 0.0
    if regs.ar:
        penalty = penalty + regs.ar * _mean_square(dropped)
    if regs.tar and raw.shape[1] > 1:
        penalty = penalty + regs.tar * _mean_square(raw[:, 1:] - raw[:, :-1])
    return penalty
