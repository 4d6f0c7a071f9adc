"""A fused single-character decode step for inference.

``nn.LSTM`` called with a sequence of length 1 spends far more time in dispatch and weight
re-packing than in arithmetic. For decoding we pre-combine the weights once:

* layer 0's input projection of every character is a lookup table
  ``embed @ W_ih0^T + b_ih0 + b_hh0`` of shape [V, G*H], so the embedding and the input
  matmul of the first layer cost one gather;
* every higher LSTM layer does one matmul on ``[x, h]`` against ``[W_ih | W_hh]``.

The result matches ``CharRNN.forward`` on one step (see tests/test_decode.py).
"""

from __future__ import annotations

import torch

from charrnn.model import CharRNN, State


class StepDecoder:
    """Advances a batch of independent rows by one character: ids [B] -> logits [B, V]."""

    def __init__(self, model: CharRNN):
        cfg = model.config
        self.cell = cfg.cell
        self.layers = cfg.layers
        rnn = model.rnn
        with torch.no_grad():
            w_ih0 = rnn.weight_ih_l0
            b_in0 = rnn.bias_ih_l0 if cfg.cell == "gru" else rnn.bias_ih_l0 + rnn.bias_hh_l0
            self.table0 = (model.embed.weight @ w_ih0.t() + b_in0).contiguous()
            self.w_hh: list[torch.Tensor] = []
            self.b_hh: list[torch.Tensor] = []
            self.w_cat: list[torch.Tensor] = []
            self.b_cat: list[torch.Tensor] = []
            self.w_ih: list[torch.Tensor] = []
            self.b_ih: list[torch.Tensor] = []
            for layer in range(cfg.layers):
                w_ih = getattr(rnn, f"weight_ih_l{layer}").detach().clone()
                w_hh = getattr(rnn, f"weight_hh_l{layer}").detach().clone()
                b_ih = getattr(rnn, f"bias_ih_l{layer}").detach().clone()
                b_hh = getattr(rnn, f"bias_hh_l{layer}").detach().clone()
                self.w_hh.append(w_hh)
                self.b_hh.append(b_hh)
                self.w_ih.append(w_ih)
                self.b_ih.append(b_ih)
                self.w_cat.append(torch.cat([w_ih, w_hh], dim=1).contiguous())
                self.b_cat.append(b_ih + b_hh)
            self.w_head = model.head.weight.detach().clone()
            self.b_head = model.head.bias.detach().clone()

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
                gates = torch.addmm(self.table0[ids], h, self.w_hh[0].t())
            else:
                gates = torch.addmm(self.b_cat[layer], torch.cat([x, h], 1), self.w_cat[layer].t())
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)
            hs.append(x)
            cs.append(c)
        logits = torch.addmm(self.b_head, x, self.w_head.t())
        return logits, (torch.stack(hs), torch.stack(cs))

    def _gru_step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (h_all,) = state
        hs = []
        x = h_all.new_empty(0)
        for layer in range(self.layers):
            h = h_all[layer]
            gi = (
                self.table0[ids]
                if layer == 0
                else torch.addmm(self.b_ih[layer], x, self.w_ih[layer].t())
            )
            gh = torch.addmm(self.b_hh[layer], h, self.w_hh[layer].t())
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            x = n + z * (h - n)
            hs.append(x)
        logits = torch.addmm(self.b_head, x, self.w_head.t())
        return logits, (torch.stack(hs),)
