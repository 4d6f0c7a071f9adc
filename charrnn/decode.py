"""A fused single-character decode step for inference.

``nn.LSTM`` called with a sequence of length 1 spends far more time in dispatch and weight
re-packing than in arithmetic. For decoding we pre-combine the weights once:

* layer 0's input projection of every character is a lookup table
  ``embed @ W_ih0^T + b_ih0 (+ b_hh0)`` of shape [V, G*H], so the embedding and the input
  matmul of the first layer cost one gather;
* every higher LSTM layer does one matmul on ``[x, h]`` against ``[W_ih | W_hh]``.

With ``weights="int8"`` (CPU) every matmul of the step is int8 x int8 -> int32
(``torch._int_mm``, VNNI on x86): the weights are quantized once per output channel, the
activations with the fixed scale 1/127. Every matmul input of the step is a hidden state
(``o * tanh(c)`` for the LSTM, a blend of ``tanh`` outputs for the GRU), so it lies in
(-1, 1) by construction and needs no per-call range search. Against fp32 that is a quarter of the
weight bytes (what a batch-1 step is bound by) and integer throughput at large batches:
3-5x less step time from batch 1 to 128 on the shipped model, whose validation NLL does not
move (models/README.md). Integer sums are exact, so a row's logits do not depend on how
many rows share the batch or how the kernel blocks them: a seeded request gives the same
text alone or in a crowd, bit for bit. fp32 CPU GEMMs pick other kernels for other batch
sizes and are not batch-invariant. The result matches ``CharRNN.forward`` on one step
(tests/test_model.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from charrnn.model import CharRNN, State

Precision = Literal["fp32", "int8"]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


class Int8Linear(nn.Module):
    """``x @ W^T + b`` in integers for inputs in [-1, 1]: W is int8 per output channel, x is
    quantized with the fixed scale 1/127, and the int32 sums are scaled back to fp32. Nothing
    depends on the other rows (unlike ``torch.ao`` dynamic quantization, whose activation
    scale spans the batch)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales / 127)  # the weight's and the input's scale
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(int_sums(x, self.weight))

    def finish(self, sums: torch.Tensor) -> torch.Tensor:
        """int32 sums [B, N] -> fp32 outputs."""
        y = sums * self.scales
        return y + self.bias if self.bias is not None else y


def int_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int32 ``round(127 x) @ W^T`` for x in [-1, 1] and int8 W [N, K]."""
    xq = torch.round(x * 127).to(torch.int8)
    # W.t() is a view: _int_mm's fastest CPU path reads the [N, K] matrix transposed.
    return torch._int_mm(xq, weight.t())


class StepDecoder:
    """Advances a batch of independent rows by one character: ids [B] -> logits [B, V]."""

    def __init__(self, model: CharRNN, weights: Precision = "fp32"):
        self.model = model
        cfg = model.config
        self.cell = cfg.cell
        self.layers = cfg.layers
        self.hidden = cfg.hidden
        if weights not in ("fp32", "int8"):
            raise ValueError(f"unknown decode precision {weights!r}")
        self.weights = weights
        rnn = model.rnn
        p = {name: t.detach().clone() for name, t in rnn.named_parameters()}
        lstm = cfg.cell == "lstm"
        with torch.no_grad():
            b_in0 = p["bias_ih_l0"] + p["bias_hh_l0"] if lstm else p["bias_ih_l0"]
            self.table0 = (model.embed.weight @ p["weight_ih_l0"].t() + b_in0).contiguous()
        lin = nn.ModuleDict()
        for k in range(cfg.layers):
            w_ih, w_hh = p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"]
            b_ih, b_hh = p[f"bias_ih_l{k}"], p[f"bias_hh_l{k}"]
            if lstm and k == 0:
                lin["hh0"] = _linear(w_hh, None)  # its biases live in table0
            elif lstm:
                lin[f"cat{k}"] = _linear(torch.cat([w_ih, w_hh], 1), b_ih + b_hh)
            else:
                lin[f"hh{k}"] = _linear(w_hh, b_hh)
                if k > 0:
                    lin[f"ih{k}"] = _linear(w_ih, b_ih)
        head: nn.Module = _linear(model.head.weight.detach(), model.head.bias.detach())
        if weights == "int8":
            lin = nn.ModuleDict({name: Int8Linear(layer) for name, layer in lin.items()})
            head = Int8Linear(head)
        self.lin = lin.to(model.head.weight.device)
        self.head = head.to(model.head.weight.device)
        # For the int8 prime pass: [W_ih | W_hh] of each higher LSTM layer split back into
        # its input and recurrent halves (int8 sums over K split exactly).
        self.halves = {
            name: (
                layer.weight[:, : cfg.hidden].contiguous(),
                layer.weight[:, cfg.hidden :].contiguous(),
            )
            for name, layer in self.lin.items()
            if weights == "int8" and name.startswith("cat")
        }

    @torch.inference_mode()
    def prime(self, ids: torch.Tensor) -> tuple[torch.Tensor, State]:
        """Logits [1, V] after the prime ``ids`` [T] (T >= 1) and the state, from a zero state.

        fp32 runs the model on the whole sequence (cuDNN on CUDA). int8 gives exactly the
        numbers of feeding the ids one at a time to ``step``, but runs a layer at a time: the
        layer's input projections for all T positions are one matmul, and only the
        recurrent half (a quarter of the weight bytes, resident in cache) is applied per
        position. ``nn.LSTM`` re-packs its fp32 weights on every call and costs ~6 ms before
        the first character; this is ~50 µs per character and layer."""
        if self.weights == "fp32":
            logits, state = self.model(ids[None])
            return logits[:, -1], state
        if self.cell == "lstm":
            return self._lstm_prime(ids)
        return self._gru_prime(ids)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        if self.cell == "lstm":
            return self._lstm_step(ids, state)
        return self._gru_step(ids, state)

    def _lstm_step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h_all, c_all = state
        hs, cs = [], []
        x = h_all.new_empty(0)
        for layer in range(self.layers):
            h, c = h_all[layer], c_all[layer]
            if layer == 0:
                gates = self.table0.index_select(0, ids) + self.lin["hh0"](h)
            else:
                gates = self.lin[f"cat{layer}"](torch.cat([x, h], 1))
            x, c = self._lstm_cell(gates, c)
            hs.append(x)
            cs.append(c)
        logits = self.head(x)
        return logits, (torch.stack(hs), torch.stack(cs))

    def _lstm_cell(self, gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One sigmoid over all four gates (the g slice is unused) costs less than three
        # small ones: at batch 1 every op is dispatch time, not arithmetic.
        i, f, _, o = torch.sigmoid(gates).chunk(4, 1)
        g = torch.tanh(gates[:, 2 * self.hidden : 3 * self.hidden])
        c = torch.addcmul(f * c, i, g)
        return o * torch.tanh(c), c

    def _lstm_prime(self, ids: torch.Tensor) -> tuple[torch.Tensor, State]:
        zero = self.table0.new_zeros(1, self.hidden)
        hs, cs = [], []
        xs = self.table0.new_empty(0)
        for layer in range(self.layers):
            h, c = zero, zero
            outs = []
            if layer == 0:
                pre, recurrent = self.table0.index_select(0, ids), self.lin["hh0"]
                for t in range(len(ids)):
                    h, c = self._lstm_cell(pre[t : t + 1] + recurrent(h), c)
                    outs.append(h)
            else:
                lin = self.lin[f"cat{layer}"]
                w_in, w_hh = self.halves[f"cat{layer}"]
                pre = int_sums(xs, w_in)
                for t in range(len(ids)):
                    gates = lin.finish(pre[t : t + 1] + int_sums(h, w_hh))
                    h, c = self._lstm_cell(gates, c)
                    outs.append(h)
            xs = torch.cat(outs)
            hs.append(h)
            cs.append(c)
        return self.head(hs[-1]), (torch.stack(hs), torch.stack(cs))

    def _gru_step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (h_all,) = state
        hs = []
        x = h_all.new_empty(0)
        for layer in range(self.layers):
            h = h_all[layer]
            gi = self.table0.index_select(0, ids) if layer == 0 else self.lin[f"ih{layer}"](x)
            gh = self.lin[f"hh{layer}"](h)
            x = _gru_cell(gi, gh, h)
            hs.append(x)
        logits = self.head(x)
        return logits, (torch.stack(hs),)

    def _gru_prime(self, ids: torch.Tensor) -> tuple[torch.Tensor, State]:
        hs = []
        xs = self.table0.new_empty(0)
        for layer in range(self.layers):
            h = self.table0.new_zeros(1, self.hidden)
            pre = self.table0.index_select(0, ids) if layer == 0 else self.lin[f"ih{layer}"](xs)
            recurrent = self.lin[f"hh{layer}"]
            outs = []
            for t in range(len(ids)):
                h = _gru_cell(pre[t : t + 1], recurrent(h), h)
                outs.append(h)
            xs = torch.cat(outs)
            hs.append(h)
        return self.head(hs[-1]), (torch.stack(hs),)


def _gru_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    i_r, i_z, i_n = gi.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)
