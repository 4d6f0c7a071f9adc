"""The decode step's arithmetic as plain functions over tensors: the reference
implementation, and what runs wherever the native kernels (``charrnn/csrc``) do not: a GRU,
a machine without a C++ compiler, and CUDA, whose graphs replay these ops (app/runner/graphs.py).

Op by op from Python a step costs some 90 dispatches holding the GIL: several times the
native step's time on the CPU (bench/decode_step.py, ``int8_eager_step_us``). TorchScript,
which once ran them as one GIL-free call, is deprecated and no longer used: the native
kernels serve the LSTM, and the rest is a fallback.

Int8 matrices are ``[N, K]`` int8 with per-row ``scales`` (the weight's scale over 127, the
activations' fixed scale); their inputs are hidden states, so they lie in [-1, 1]. fp32
matrices come with empty ``scales``. An empty ``bias`` means none.
"""

import torch
from torch import Tensor


def int_sums(x: Tensor, weight: Tensor) -> Tensor:
    """int32 ``round(127 x) @ W^T`` for x in [-1, 1] and int8 W."""
    # W.t() is a view: _int_mm's fastest CPU path reads the [N, K] matrix transposed.
    return torch._int_mm(torch.round(x * 127).to(torch.int8), weight.t())


def blocked_mm(x: Tensor, weight: Tensor, block: int) -> Tensor:
    """``x @ W^T`` in fp32, one fixed-shape ``[block, K]`` product per ``block`` rows (the
    last block padded with zeros), so that every row goes through the same GEMM kernel
    whatever the batch size: BLAS libraries pick kernels and blockings by the row count
    (MKL's GEMV for 1 row and its GEMM for 2, 3 and 4+ rows give other last bits), and a
    row's logits would then depend on how many rows share the step."""
    rows = x.shape[0]
    pad = (block - rows % block) % block
    if pad > 0:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    w_t = weight.t()
    out = torch.cat([torch.mm(part, w_t) for part in x.split(block)])
    return out[:rows] if pad > 0 else out


def matmul(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor, block: int) -> Tensor:
    """``x @ W^T + bias``: in integers for an int8 W (exact, so any row count gives the same
    bits), in fixed blocks of rows for fp32 (``blocked_mm``)."""
    y = int_sums(x, weight) * scales if weight.dtype == torch.int8 else blocked_mm(x, weight, block)
    if bias.numel() > 0:
        y = y + bias
    return y


def lstm_cell(gates: Tensor, c: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    # One sigmoid over all four gates (the g slice is unused) costs less than three small ones.
    i, f, _, o = torch.sigmoid(gates).chunk(4, 1)
    g = torch.tanh(gates[:, 2 * hidden : 3 * hidden])
    c = torch.addcmul(f * c, i, g)
    return o * torch.tanh(c), c


def gru_cell(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    hidden = h.shape[1]
    r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
    z = torch.sigmoid(gi[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
    n = torch.tanh(gi[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
    return n + z * (h - n)


def lstm_step(
    ids: Tensor,
    h_all: Tensor,
    c_all: Tensor,
    table0: Tensor,
    weights: list[Tensor],
    scales: list[Tensor],
    biases: list[Tensor],
    block: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """ids [B] -> logits [B, V], h [L, B, H], c [L, B, H]. ``table0`` [V, 4H] holds layer 0's
    input gates per character; ``weights``: layer 0's ``W_hh``, then ``[W_ih | W_hh]`` of each
    higher layer, then the head."""
    layers, hidden = h_all.shape[0], h_all.shape[2]
    hs: list[Tensor] = []
    cs: list[Tensor] = []
    x = table0.index_select(0, ids)
    for k in range(layers):
        if k == 0:
            gates = x + matmul(h_all[0], weights[0], scales[0], biases[0], block)
        else:
            gates = matmul(torch.cat([x, h_all[k]], 1), weights[k], scales[k], biases[k], block)
        x, c = lstm_cell(gates, c_all[k], hidden)
        hs.append(x)
        cs.append(c)
    logits = matmul(x, weights[layers], scales[layers], biases[layers], block)
    return logits, torch.stack(hs), torch.stack(cs)


def gru_step(
    ids: Tensor,
    h_all: Tensor,
    table0: Tensor,
    weights: list[Tensor],
    scales: list[Tensor],
    biases: list[Tensor],
    block: int,
) -> tuple[Tensor, Tensor]:
    """ids [B] -> logits [B, V], h [L, B, H]. ``weights``: layer 0's ``W_hh``, then ``W_ih``
    and ``W_hh`` of each higher layer, then the head."""
    layers = h_all.shape[0]
    hs: list[Tensor] = []
    x = table0.index_select(0, ids)
    for k in range(layers):
        j = 2 * k
        if k > 0:
            x = matmul(x, weights[j - 1], scales[j - 1], biases[j - 1], block)
        x = gru_cell(x, matmul(h_all[k], weights[j], scales[j], biases[j], block), h_all[k])
        hs.append(x)
    head = 2 * layers - 1
    return matmul(x, weights[head], scales[head], biases[head], block), torch.stack(hs)


def lstm_recurrence(
    pre: Tensor,
    weight: Tensor,
    scales: Tensor,
    bias: Tensor,
    pre_is_sums: bool,
    h: Tensor,
    c: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One int8 LSTM layer over a sequence from state (h, c) [1, H], with the numbers of
    ``lstm_step``. ``pre`` [T, 4H] is the layer's input projection: fp32 gates (layer 0) or
    the int32 sums of the input half (higher layers), which join the recurrent sums before
    scaling exactly as one matmul over ``[x, h]`` would. Returns outputs [T, H], h, c."""
    # Everything that does not change along the sequence is taken out of the loop: at ~45 µs
    # a position, each op saved per position is measurable.
    hidden = weight.shape[1]
    w_t = weight.t()
    has_bias = bias.numel() > 0
    outs: list[Tensor] = []
    for row in pre.unbind(0):
        sums = torch._int_mm(torch.round(h * 127).to(torch.int8), w_t)  # = int_sums(h, weight)
        if pre_is_sums:
            gates = (row + sums) * scales
            if has_bias:
                gates = gates + bias
        else:
            gates = row + sums * scales
        h, c = lstm_cell(gates, c, hidden)
        outs.append(h)
    return torch.cat(outs), h, c


def lstm_prime(
    ids: Tensor,
    table0: Tensor,
    inputs: list[Tensor],
    recurrent: list[Tensor],
    scales: list[Tensor],
    biases: list[Tensor],
    chunk: int,
    h0: Tensor | None = None,
    c0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """An int8 LSTM over the prime ``ids`` [T] from the state (h0, c0) [L, 1, H], or from zero:
    h and c [L, 1, H]. A prime continued from the state after its first part gives exactly the
    state of one call over the whole.

    A wavefront over chunks of ``chunk`` positions: while layer k runs chunk i, layer k + 1
    runs chunk i - 1 on another thread (``torch.jit.fork``), so a 2-layer prime takes about
    half the time of one layer after another. Every position gets the numbers of
    ``lstm_step``. ``inputs[k]``/``recurrent[k]`` are the halves of ``[W_ih | W_hh]`` of layer
    k >= 1 (``recurrent[0]`` is layer 0's ``W_hh``; its inputs come from ``table0``)."""
    layers, hidden = len(recurrent), recurrent[0].shape[1]
    n = (ids.shape[0] + chunk - 1) // chunk
    if h0 is None or c0 is None:
        hs = [torch.zeros(1, hidden, device=ids.device) for _ in range(layers)]
        cs = [torch.zeros(1, hidden, device=ids.device) for _ in range(layers)]
    else:
        hs = [h0[k] for k in range(layers)]
        cs = [c0[k] for k in range(layers)]
    outs = [torch.empty(0, device=ids.device) for _ in range(layers)]
    for diagonal in range(n + layers - 1):
        tasks: list[torch.jit.Future[tuple[Tensor, Tensor, Tensor]]] = []
        done: list[int] = []
        for k in range(layers):
            i = diagonal - k
            if i < 0 or i >= n:
                continue
            if k == 0:
                pre = table0.index_select(0, ids[i * chunk : (i + 1) * chunk])
            else:
                pre = int_sums(outs[k - 1], inputs[k])  # layer k - 1's chunk i
            tasks.append(
                torch.jit.fork(
                    lstm_recurrence, pre, recurrent[k], scales[k], biases[k], k > 0, hs[k], cs[k]
                )
            )
            done.append(k)
        for j in range(len(done)):
            outs[done[j]], hs[done[j]], cs[done[j]] = torch.jit.wait(tasks[j])
    return torch.stack(hs), torch.stack(cs)


def gru_recurrence(
    pre: Tensor, weight: Tensor, scales: Tensor, bias: Tensor, h: Tensor
) -> tuple[Tensor, Tensor]:
    """One GRU layer over a whole sequence from the state ``h`` [1, H], with the numbers of
    ``gru_step``; ``pre`` [T, 3H] is its input projection. Returns outputs [T, H] and h."""
    outs: list[Tensor] = []
    for t in range(pre.shape[0]):
        h = gru_cell(pre[t : t + 1], matmul(h, weight, scales, bias, 1), h)
        outs.append(h)
    return torch.cat(outs), h
