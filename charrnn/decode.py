"""A fused single-character decode step for inference.

``nn.LSTM`` called with a sequence of length 1 spends far more time in dispatch and weight
re-packing than in arithmetic. For decoding we pre-combine the weights once:

* layer 0's input projection of every character is a lookup table
  ``embed @ W_ih0^T + b_ih0 (+ b_hh0)`` of shape [V, G*H], so the embedding and the input
  matmul of the first layer cost one gather;
* every higher LSTM layer does one matmul on ``[x, h]`` against ``[W_ih | W_hh]``.

With ``weights="int8"`` (CPU, x86) every matmul of the step is int8 x int8 -> int32
(``torch._int_mm``, oneDNN): the weights are quantized once per output channel to 7 bits, the
activations with the fixed scale 1/127 (``charrnn/quantization.py`` says why 7 bits: exact
sums on every x86 CPU, VNNI or not). Every matmul input of the step is a hidden state
(``o * tanh(c)`` for the LSTM, a blend of ``tanh`` outputs for the GRU), so it lies in
(-1, 1) by construction and needs no per-call range search. Against fp32 that is a quarter of
the weight bytes (what a batch-1 step is bound by) and integer throughput at large batches,
for a validation NLL within a thousandth of fp32's (models/README.md). Integer sums
are exact, so a row's logits do not depend on how many rows share the batch or how the kernel
blocks them. fp32 matmuls run in fixed blocks of rows (``kernels.blocked_mm``) for the same
reason: BLAS picks other kernels for other row counts. A seeded request gives the same text
alone or in a crowd, bit for bit (tests/test_determinism.py). The result matches
``CharRNN.forward`` on one step (tests/test_model.py).

Two implementations, one fast and one reference. An LSTM on the CPU runs the native kernels
(``charrnn/native.py``: C++ with the cell fused, one GIL-free call per step or per run of
characters, int8 or fp32) wherever they can be built or are prebuilt. Everything else runs
``charrnn/kernels.py`` op by op: a GRU, a machine without a C++ compiler (several times the
native step's time; bench/decode_step.py), and CUDA, which replays those ops from CUDA graphs
(app/runner/graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from charrnn import kernels, native
from charrnn.controls import ControlsBatch
from charrnn.model import CharRNN, State
from charrnn.quantization import Precision, quantize
from charrnn.sampling import Sampler, SamplingBatch, sample_next, sampler

# How the step runs: the C++ LSTM kernels (native), or charrnn/kernels.py op by op (eager;
# CUDA replays those from graphs).
Kernels = Literal["native", "eager"]

# Rows per fixed-shape fp32 matmul of the step (kernels.blocked_mm): every row goes through
# the same GEMM kernel at every batch size (the price: a lone row costs MKL's 8-row GEMM
# rather than its cheaper matrix-vector product; bench/README.md). On CUDA 32 rows is one
# tile.
FP32_BLOCK = {"cpu": 8, "cuda": 32}

# ATen's CPU elementwise loops run two vectors at a time (32 floats with AVX-512) and finish
# in scalar code whose sigmoid/tanh round differently: rows of a multiple of this many
# elements never reach that tail, whatever the batch size.
VECTOR_ROWS = 32

# Positions per block of an fp32 prime (``StepDecoder.prime``): long enough that the model's
# per-call cost (the model's call on the CPU, a cuDNN launch on CUDA) stays small against it.
FP32_PRIME_ALIGN = 256
# Positions per chunk of the int8 prime's wavefront (kernels.lstm_prime): small enough that
# the layers overlap for most of a 100-character prime, large enough that the hand-offs
# between threads (one per chunk and layer) stay a small part of the time.
PRIME_CHUNK = 16


def input_table(embed: torch.Tensor, weight_ih: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``embed @ W_ih^T + bias`` [V, G*H], the same bits on every machine: a BLAS matmul rounds
    differently on different CPUs (kernels, vector widths, FMA), and this table feeds every
    step. Sums in float64, one input column at a time (elementwise IEEE operations in a fixed
    order), rounded once to float32; ~1 ms for the shipped model, once at load."""
    e, w = embed.detach().double(), weight_ih.detach().double()
    acc = bias.detach().double().expand(e.shape[0], w.shape[0]).clone()
    for k in range(e.shape[1]):
        acc += e[:, k : k + 1] * w[:, k]
    return acc.float().contiguous()


@dataclass
class PackedWeights:
    """A model's weights as every decode path takes them, combined and quantized once at
    load: the reference loop (``charrnn.generate``), the service's step and the CUDA graphs
    all read this one object.

    ``mats``/``scales``/``biases``: layer 0's ``W_hh`` (its input side and biases live in
    ``table0``), ``[W_ih | W_hh]`` of each higher LSTM layer (a GRU keeps them apart), then the
    head. For the int8 LSTM prime, ``inputs``/``recurrent`` split each higher layer's matrix
    back into its halves (int8 sums over K split exactly)."""

    table0: torch.Tensor
    mats: list[torch.Tensor]
    scales: list[torch.Tensor]
    biases: list[torch.Tensor]
    inputs: list[torch.Tensor] = field(default_factory=list)
    recurrent: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, model: CharRNN, weights: Precision) -> PackedWeights:
        cfg = model.config
        p = {name: t.detach() for name, t in model.rnn.named_parameters()}
        lstm = cfg.cell == "lstm"
        none = torch.empty(0, device=model.head.weight.device)
        # (matrix, bias) in the order kernels.lstm_step / gru_step take them.
        mats: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            b_in0 = p["bias_ih_l0"] + p["bias_hh_l0"] if lstm else p["bias_ih_l0"]
            table0 = input_table(model.embed.weight, p["weight_ih_l0"], b_in0)
            for k in range(cfg.layers):
                w_ih, w_hh = p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"]
                b_ih, b_hh = p[f"bias_ih_l{k}"], p[f"bias_hh_l{k}"]
                if lstm and k == 0:
                    mats.append((w_hh, none))
                elif lstm:
                    mats.append((torch.cat([w_ih, w_hh], 1), b_ih + b_hh))
                else:
                    if k > 0:
                        mats.append((w_ih, b_ih))
                    mats.append((w_hh, b_hh))
            mats.append((model.head.weight.detach(), model.head.bias.detach()))
        out = cls(table0, [], [], [])
        for w, b in mats:
            wq, scales = quantize(w) if weights == "int8" else (w.clone(), none)
            out.mats.append(wq.contiguous())
            out.scales.append(scales)
            out.biases.append(b.clone())
        if lstm and weights == "int8":
            higher = out.mats[1:-1]
            out.inputs = [none] + [m[:, : cfg.hidden].contiguous() for m in higher]
            out.recurrent = [out.mats[0]] + [m[:, cfg.hidden :].contiguous() for m in higher]
        return out

    @property
    def step_args(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list]:
        """What every step kernel takes after the ids and the state."""
        return self.table0, self.mats, self.scales, self.biases


class StepDecoder:
    """Advances a batch of independent rows by one character: ids [B] -> logits [B, V]
    (``step``); samples the next ids from logits (``sample``); with the native kernels, does
    both for many characters in one call (``decode``)."""

    def __init__(self, model: CharRNN, weights: Precision = "fp32", *, native_kernels: bool = True):
        if weights not in ("fp32", "int8"):
            raise ValueError(f"unknown decode precision {weights!r}")
        if weights == "int8" and model.head.weight.device.type != "cpu":
            raise ValueError(
                "the int8 decode step is CPU-only (CUDA's int8 matmul needs > 16 rows)"
            )
        cfg = model.config
        self.model = model
        self.cell = cfg.cell
        self.layers = cfg.layers
        self.weights = weights
        self._fp32_align = FP32_PRIME_ALIGN
        device = model.head.weight.device
        self.block = FP32_BLOCK.get(device.type, 32)
        lstm = cfg.cell == "lstm"
        self.packed = PackedWeights.of(model, weights)
        # An LSTM on the CPU runs the native kernels, which take the eager ones' arguments;
        # CUDA replays the eager ones from CUDA graphs (app/runner/graphs.py).
        self.kernels: Kernels
        if native_kernels and lstm and device.type == "cpu" and native.load():
            # The overloads themselves: calling the packets resolves them on every call.
            self._step = torch.ops.charrnn.lstm_step.default
            self._recurrence = torch.ops.charrnn.lstm_prime.default  # int8 primes
            self._outputs = torch.ops.charrnn.lstm_prime_outputs.default
            self._decode = torch.ops.charrnn.lstm_decode.default
            self.kernels = "native"
            # int8 weights packed once for the native matmuls (still the same [N, K] matrices).
            w = self.packed
            w.mats, w.inputs, w.recurrent = (
                native.pack_int8(ws) for ws in (w.mats, w.inputs, w.recurrent)
            )
        else:
            self._step = kernels.lstm_step if lstm else kernels.gru_step
            # fp32 primes run the model itself (see ``prime``).
            self._recurrence = kernels.lstm_prime if lstm else kernels.gru_recurrence
            self.kernels = "eager"
        # Sampling from the step's logits, native under the same setting.
        self._sample = sampler(device, native_kernels)
        self.batch_invariant, self.invariance = self._invariance(cfg.hidden, device)

    def _invariance(self, hidden: int, device: torch.device) -> tuple[bool, str]:
        """Whether a row's numbers do not depend on the other rows of the step, and why."""
        sums = "exact int8 sums" if self.weights == "int8" else f"{self.block}-row fp32 blocks"
        if self.kernels == "native":
            return True, f"batch-invariant: {sums}, a cell of IEEE-exact operations per row"
        if device.type == "cuda":
            return True, (
                f"batch-invariant: fp32 matmuls in fixed {self.block}-row blocks (one cuBLAS "
                "kernel for every batch size), elementwise ops per element"
            )
        if hidden % VECTOR_ROWS == 0:
            return True, f"batch-invariant: {sums}, whole-vector elementwise ops"
        return False, (
            f"NOT batch-invariant: hidden size {hidden} is not a multiple of {VECTOR_ROWS}, so "
            "ATen's sigmoid/tanh run some of a row's elements in their scalar loop at one batch "
            "size and vectorised at another (last-bit differences); the native LSTM kernels "
            "do not have this limit"
        )

    def sample(
        self,
        logits: torch.Tensor,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        u: torch.Tensor,
        mask: torch.Tensor | None = None,
        controls: ControlsBatch | None = None,
    ) -> torch.Tensor:
        """``charrnn.sampling.sample_next``, native where this decoder's step is. With
        ``controls`` the rows draw through them and their state moves on by the ids drawn
        (natively inside the op; otherwise the reference, then ``controls.record``)."""
        if controls is None:
            return self._sample(logits, temperature, top_k, top_p, u, mask)
        if self._sample is sample_next:
            ids = sample_next(logits, temperature, top_k, top_p, u, mask, controls)
            controls.record(ids)
            return ids
        return self._sample(logits, temperature, top_k, top_p, u, mask, controls.tensors)

    @property
    def multi_step(self) -> bool:
        """Whether ``decode`` can sample and step many characters in one call."""
        return self.kernels == "native"

    def decode(
        self,
        logits: torch.Tensor,
        state: State,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        seeds: torch.Tensor,
        positions: torch.Tensor,
        steps: int,
        seen: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        controls: ControlsBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """``steps`` characters per row in one native call (``multi_step`` decoders): sample
        each from the logits as ``charrnn.sampling.sample_next`` does, with the uniform of
        (seed, position + s), and step the network on it. ``seeds`` and ``positions`` are
        int64 [B] (the bits of the uint64 values). Returns ids [steps, B] and the logits and
        state after the last step. The same ids as one ``sample``-then-``step`` per character,
        however the characters are split into calls. With ``seen`` (float32 [steps, B, V]),
        the logits each character was sampled from are written into it (for logprobs). With
        ``mask`` (``charrnn.sampling.sample_next``'s: [B, W] for every step, or [steps, B, W]),
        the rows draw through it and one that draws "end" (id V) has the network read
        character 0. With ``controls`` the rows draw through them and their state moves on
        after every draw, as one ``sample`` per step moves it; a row whose banned strings
        leave nothing draws "end" (id V) and reads character 0. In inference mode, like
        ``step``."""
        ids, logits, h, c = self._decode(
            logits,
            state[0],
            state[1],
            *self.packed.step_args,
            temperature,
            top_k,
            top_p,
            seeds,
            positions,
            steps,
            seen,
            mask,
            None if controls is None else controls.tensors,
        )
        return ids, logits, (h, c)

    def decode_batch(
        self,
        logits: torch.Tensor,
        state: State,
        sampling: SamplingBatch,
        positions: np.ndarray,
        steps: int,
        seen: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        controls: ControlsBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """``decode`` for a batch's ``SamplingBatch`` and its rows' ``positions`` [B]
        (characters generated so far)."""
        return self.decode(
            logits,
            state,
            *sampling.filters,
            torch.from_numpy(sampling.seeds.view(np.int64)),
            torch.from_numpy(positions.astype(np.uint64).view(np.int64)),
            steps,
            seen,
            mask,
            controls,
        )

    def sample_and_step(
        self,
        logits: torch.Tensor,
        state: State,
        sampling: SamplingBatch,
        u: torch.Tensor,
        sample: Sampler | None = None,
        controls: ControlsBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """One character per row, one call at a time: sample it from ``logits`` with the
        uniforms ``u`` [B] (with ``sample``, else this decoder's sampler; with ``controls``,
        this decoder's), then step the network on it ("end", id V, reads character 0).
        Returns ids [B], logits, state."""
        if controls is None:
            ids = (sample or self.sample)(logits, *sampling.filters, u)
            logits, state = self.step(ids, state)
            return ids, logits, state
        ids = self.sample(logits, *sampling.filters, u, None, controls)
        logits, state = self.step(ids.masked_fill(ids == logits.shape[-1], 0), state)
        return ids, logits, state

    def step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Call it in inference mode: it is the service's per-character hot path, so it
        does not enter the mode itself (see ``app.runner.ModelRunner.worker``)."""
        weights = self.packed.step_args
        if self.kernels == "native":
            logits, h, c = self._step(ids, state[0], state[1], *weights)
            return logits, (h, c)
        if self.cell == "lstm":
            logits, h, c = self._step(ids, state[0], state[1], *weights, self.block)
            return logits, (h, c)
        logits, h = self._step(ids, state[0], *weights, self.block)
        return logits, (h,)

    @property
    def prime_align(self) -> int:
        """Where a prime may be cut into parts without changing its numbers: at multiples of
        this many positions from its start (int8 anywhere; fp32 in fixed blocks)."""
        return 1 if self.weights == "int8" else self._fp32_align

    @property
    def exact_steps(self) -> bool:
        """Whether ``prime`` gives bit for bit the numbers of feeding its characters one at a
        time to ``step`` (int8: integer sums and the same cell): the scheduler may then run
        several primes side by side as batched steps."""
        return self.weights == "int8"

    @torch.inference_mode()
    def prime_all(
        self, ids: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """``prime`` that keeps the logits after every position: [T, V] (row t is the
        distribution of the character after ``ids[t]``), for scoring a text. The rows are the
        numbers the decode step would give after the same characters: the int8 LSTM's head
        applied to each position's round(127 h) as ``step`` applies it; other int8 decoders
        step position by position (``exact_steps``); fp32 runs the model, like ``prime``."""
        if self.weights == "fp32":
            out = []
            for start in range(0, ids.shape[0], self.prime_align):
                logits, state = self.model(ids[None, start : start + self.prime_align], state)
                out.append(logits[0])
            return torch.cat(out), state
        if self.kernels == "native":
            w = self.packed
            h, c, q = self._outputs(
                ids, *self._prime_weights(), *((None, None) if state is None else state)
            )
            # The decode step's head (lstm_int8.cpp ``head``), op for op: the same numbers.
            logits = torch._int_mm(q, w.mats[-1].t()) * w.scales[-1]
            if w.biases[-1].numel() > 0:
                logits = logits + w.biases[-1]
            return logits, (h, c)
        state = state if state is not None else self.model.init_state(1)
        rows = []
        for t in range(ids.shape[0]):
            logits, state = self.step(ids[t : t + 1], state)
            rows.append(logits)
        return torch.cat(rows), state

    @torch.inference_mode()
    def prime(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Logits [1, V] after the prime ``ids`` [T] (T >= 1) and the state, from ``state``
        (a row's [L, 1, H] tensors) or from zero. A prime cut into parts, each continued from
        the state the last one left, ends in exactly the state of one call over the whole
        (tests/test_model.py): the service primes in parts so long primes cannot stall others.

        fp32 runs the model on the whole sequence (cuDNN on CUDA). int8 gives exactly the
        numbers of feeding the ids one at a time to ``step``, but runs layer by layer over
        chunks of positions: a chunk's input projections are one matmul, only the recurrent
        half of the weights (1 MB in int8, resident in cache) is applied per position, and
        the LSTM's layers overlap on two threads (``kernels.lstm_prime``). ``nn.LSTM``, which
        re-packs its fp32 weights on every call, costs several times as much before the first
        character (bench/README.md, "prime")."""
        if self.weights == "fp32":
            # In blocks of ``prime_align`` positions: a float GEMM's rounding may depend on
            # its row count, so the blocks are the same however the prime is cut into parts.
            for start in range(0, ids.shape[0], self.prime_align):
                logits, state = self.model(ids[None, start : start + self.prime_align], state)
            # A copy: a view would keep the whole [1, T, V] alive in the prime cache.
            return logits[:, -1].clone(), state
        if self.cell == "lstm":
            return self._lstm_prime(ids, state)
        return self._gru_prime(ids, state)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        w = self.packed
        return kernels.matmul(h, w.mats[-1], w.scales[-1], w.biases[-1], self.block)

    def _prime_weights(self) -> tuple:
        """The int8 LSTM prime kernels' weight arguments, up to the chunk size."""
        w, layers = self.packed, self.layers
        return (
            w.table0,
            w.inputs,
            w.recurrent,
            w.scales[:layers],
            w.biases[:layers],
            PRIME_CHUNK,
        )

    def _lstm_prime(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        h0, c0 = (None, None) if state is None else state
        h, c = self._recurrence(ids, *self._prime_weights(), h0, c0)
        return self._head(h[-1]), (h, c)

    def _gru_prime(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        h0 = self.model.init_state(1)[0] if state is None else state[0]
        hs = []
        w = self.packed
        xs = w.table0.index_select(0, ids)
        for k in range(self.layers):
            j = 2 * k
            if k > 0:
                xs = kernels.matmul(xs, w.mats[j - 1], w.scales[j - 1], w.biases[j - 1], self.block)
            xs, h = self._recurrence(xs, w.mats[j], w.scales[j], w.biases[j], h0[k])
            hs.append(h)
        return self._head(hs[-1]), (torch.stack(hs),)
