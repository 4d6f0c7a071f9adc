"""A fused single-character decode step for inference.

``nn.LSTM`` called with a sequence of length 1 spends far more time in dispatch and weight
re-packing than in arithmetic. For decoding we pre-combine the weights once:

* layer 0's input projection of every character is a lookup table
  ``embed @ W_ih0^T + b_ih0 (+ b_hh0)`` of shape [V, G*H], so the embedding and the input
  matmul of the first layer cost one gather;
* every higher LSTM layer does one matmul on ``[x, h]`` against ``[W_ih | W_hh]``.

At batch 1 a step must stream every recurrent weight from memory, so bytes are time. With
``int8=True`` (CPU) the recurrent matrices are stored as int8 per output channel and multiplied
by bf16 activations (weight-only quantization): a quarter of the bytes, about half the step
time, and no change in validation NLL on the shipped model (1.3720 nats/char either way).
The result matches ``CharRNN.forward`` on one step (tests/test_model.py).
"""

from __future__ import annotations

import torch
from torch import nn

from charrnn.model import CharRNN, State


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


class Int8Linear(nn.Module):
    """``x @ W^T + b`` with W stored as int8 per output channel (symmetric scales) and x cast
    to bf16: weight-only quantization. Each row of x is computed on its own (unlike dynamic
    quantization, whose activation scale spans the batch), so a request's characters do not
    depend on the other rows in the batch."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).float()
        return y + self.bias if self.bias is not None else y


class StepDecoder:
    """Advances a batch of independent rows by one character: ids [B] -> logits [B, V]."""

    def __init__(self, model: CharRNN, int8: bool = False):
        cfg = model.config
        self.cell = cfg.cell
        self.layers = cfg.layers
        self.hidden = cfg.hidden
        self.int8 = int8
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
        if int8:
            lin = nn.ModuleDict({name: Int8Linear(layer) for name, layer in lin.items()})
        self.lin = lin.to(model.head.weight.device)
        head = _linear(model.head.weight.detach(), model.head.bias.detach())
        # With int8 every matmul of the step runs through the same row-wise kernel, so the step
        # is batch-invariant bit for bit (fp32 GEMMs pick other kernels for other batch sizes).
        self.head = (Int8Linear(head) if int8 else head).to(model.head.weight.device)

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
                gates = self.table0[ids] + self.lin["hh0"](h)
            else:
                gates = self.lin[f"cat{layer}"](torch.cat([x, h], 1))
            # One sigmoid over all four gates (the g slice is unused) costs less than three
            # small ones: at batch 1 every op is dispatch time, not arithmetic.
            i, f, _, o = torch.sigmoid(gates).chunk(4, 1)
            g = torch.tanh(gates[:, 2 * self.hidden : 3 * self.hidden])
            c = torch.addcmul(f * c, i, g)
            x = o * torch.tanh(c)
            hs.append(x)
            cs.append(c)
        logits = self.head(x)
        return logits, (torch.stack(hs), torch.stack(cs))

    def _gru_step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (h_all,) = state
        hs = []
        x = h_all.new_empty(0)
        for layer in range(self.layers):
            h = h_all[layer]
            gi = self.table0[ids] if layer == 0 else self.lin[f"ih{layer}"](x)
            gh = self.lin[f"hh{layer}"](h)
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            x = n + z * (h - n)
            hs.append(x)
        logits = self.head(x)
        return logits, (torch.stack(hs),)
