"""A faithful re-implementation of the seed notebook's model, training loop and sampler,
used as the baseline every benchmark compares against (same run, same machine).

Kept as in the notebook on purpose: one-hot numpy inputs, ``nn.LSTM`` fed [1, 1, V] per
character, softmax -> topk -> numpy ``random.choice`` per character."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def one_hot_encode(arr: np.ndarray, n_labels: int) -> np.ndarray:
    one_hot = np.zeros((arr.size, n_labels), dtype=np.float32)
    one_hot[np.arange(one_hot.shape[0]), arr.flatten()] = 1.0
    return one_hot.reshape((*arr.shape, n_labels))


def get_batches(arr: np.ndarray, batch_size: int, seq_length: int):
    n_batches = len(arr) // (batch_size * seq_length)
    arr = arr[: n_batches * batch_size * seq_length]
    arr = arr.reshape((batch_size, -1))
    for n in range(0, arr.shape[1], seq_length):
        x = arr[:, n : n + seq_length]
        y = np.zeros_like(x)
        try:
            y[:, :-1], y[:, -1] = x[:, 1:], arr[:, n + seq_length]
        except IndexError:
            y[:, :-1], y[:, -1] = x[:, 1:], arr[:, 0]
        yield x, y


class NotebookCharRNN(nn.Module):
    def __init__(self, tokens: str, n_hidden: int = 512, n_layers: int = 2, drop_prob: float = 0.5):
        super().__init__()
        self.n_layers, self.n_hidden = n_layers, n_hidden
        self.chars = tokens
        self.int2char = dict(enumerate(self.chars))
        self.char2int = {ch: ii for ii, ch in self.int2char.items()}
        self.lstm = nn.LSTM(
            len(self.chars), n_hidden, n_layers, dropout=drop_prob, batch_first=True
        )
        self.dropout = nn.Dropout(drop_prob)
        self.fc = nn.Linear(n_hidden, len(self.chars))

    def forward(self, x, hidden):
        lstm_out, hidden = self.lstm(x, hidden)
        out = self.dropout(lstm_out)
        out = out.contiguous().view(-1, self.n_hidden)
        return self.fc(out), hidden

    def init_hidden(self, batch_size: int):
        weight = next(self.parameters()).data
        return (
            weight.new(self.n_layers, batch_size, self.n_hidden).zero_(),
            weight.new(self.n_layers, batch_size, self.n_hidden).zero_(),
        )


def train_steps(
    net: NotebookCharRNN,
    data: np.ndarray,
    steps: int,
    batch_size: int = 128,
    seq_length: int = 100,
    lr: float = 0.001,
    clip: float = 5,
    device: str = "cpu",
) -> int:
    """The notebook's inner training loop for ``steps`` batches; returns characters seen."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    n_chars, done = len(net.chars), 0
    while done < steps:
        h = net.init_hidden(batch_size)
        for x, y in get_batches(data, batch_size, seq_length):
            x = one_hot_encode(x, n_chars)
            inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
            if device != "cpu":
                inputs, targets = inputs.to(device), targets.to(device)
            h = tuple([each.data for each in h])
            net.zero_grad()
            output, h = net(inputs, h)
            loss = criterion(output, targets.view(batch_size * seq_length).long())
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            if device != "cpu":
                loss.item()  # the notebook reads the loss every step (its accuracy print)
            done += 1
            if done == steps:
                break
    return steps * batch_size * seq_length


def predict(net: NotebookCharRNN, char: str, h, top_k: int | None = None):
    x = np.array([[net.char2int[char]]])
    x = one_hot_encode(x, len(net.chars))
    inputs = torch.from_numpy(x)
    h = tuple([each.data for each in h])
    out, h = net(inputs, h)
    p = F.softmax(out, dim=1).data
    if top_k is None:
        top_ch = np.arange(len(net.chars))
    else:
        p, top_ch = p.topk(top_k)
        top_ch = top_ch.numpy().squeeze()
    p = p.numpy().squeeze()
    char = np.random.choice(top_ch, p=p / p.sum())
    return net.int2char[char], h


def sample(net: NotebookCharRNN, size: int, prime: str = "The", top_k: int | None = None):
    net.cpu()
    net.eval()
    chars = list(prime)
    h = net.init_hidden(1)
    for ch in prime:
        char, h = predict(net, ch, h, top_k=top_k)
    chars.append(char)
    for _ in range(size):
        char, h = predict(net, chars[-1], h, top_k=top_k)
        chars.append(char)
    return "".join(chars)
