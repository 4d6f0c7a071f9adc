"""The CharRNN network: embedding -> stacked LSTM/GRU -> dropout -> linear head.

An embedding lookup is exactly the notebook's one-hot input multiplied by the first layer's
input weights, without materialising one-hot tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

Cell = Literal["lstm", "gru"]
# A recurrent state is always a tuple of [layers, batch, hidden] tensors: (h, c) for an LSTM,
# (h,) for a GRU, so batching code can treat both alike.
State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden: int = 512
    layers: int = 2
    embed: int = 64
    dropout: float = 0.5
    cell: Cell = "lstm"
    # Dropout on the character embeddings (training only): a cheap regulariser for small texts.
    embed_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.hidden < 1 or self.layers < 1 or self.embed < 1:
            raise ValueError("vocab_size, hidden, layers and embed must be positive")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.embed_dropout < 1.0):
            raise ValueError("dropout and embed_dropout must be in [0, 1)")
        if self.cell not in ("lstm", "gru"):
            raise ValueError("cell must be 'lstm' or 'gru'")

    def to_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        rnn_cls = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.embed = nn.Embedding(config.vocab_size, config.embed)
        self.rnn = rnn_cls(
            config.embed,
            config.hidden,
            config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.drop = nn.Dropout(config.dropout)
        self.embed_drop = nn.Dropout(config.embed_dropout)
        self.head = nn.Linear(config.hidden, config.vocab_size)

    @property
    def n_state(self) -> int:
        return 2 if self.config.cell == "lstm" else 1

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        device = device if device is not None else self.head.weight.device
        dtype = self.head.weight.dtype
        shape = (self.config.layers, batch, self.config.hidden)
        return tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.n_state))

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids [B, T] -> logits [B, T, V] and the state after the last step."""
        x = self.embed_drop(self.embed(ids))
        if state is None:
            out, new = self.rnn(x)
        elif self.config.cell == "lstm":
            out, new = self.rnn(x, (state[0], state[1]))
        else:
            out, new = self.rnn(x, state[0])
        new_state: State = tuple(new) if isinstance(new, tuple) else (new,)
        return self.head(self.drop(out)), new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
