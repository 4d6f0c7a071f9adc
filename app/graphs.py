"""CUDA graphs for the decode step: sampling + fused LSTM step captured once per batch-size
bucket, replayed with the rows copied into static buffers.

A decode step at small batch is a few dozen tiny kernels; launching them one by one from
Python costs more than running them. A captured graph launches them all at once. Rows are
padded up to the bucket size with harmless values (temperature 1, no top-k/top-p, u = 0)
and the padding is dropped afterwards. ``PaddedStep`` runs the identical padded computation
eagerly; on the CPU it is what tests check, on CUDA it is what the graphs capture."""

from __future__ import annotations

import torch

from charrnn.decode import StepDecoder
from charrnn.model import State
from charrnn.sampling import sample_next

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def bucket_for(rows: int) -> int:
    for b in BUCKETS:
        if rows <= b:
            return b
    return rows


class _Buffers:
    """Static inputs and outputs of one bucket."""

    def __init__(self, size: int, vocab: int, state: State, device: torch.device):
        f = dict(device=device)
        self.logits = torch.zeros(size, vocab, **f)
        self.state = tuple(torch.zeros(s.shape[0], size, s.shape[2], **f) for s in state)
        self.temperature = torch.ones(size, **f)
        self.top_k = torch.full((size,), vocab, dtype=torch.long, **f)
        self.top_p = torch.ones(size, **f)
        self.u = torch.zeros(size, dtype=torch.float64, **f)
        self.out: tuple[torch.Tensor, torch.Tensor, State] | None = None

    def load(
        self,
        logits: torch.Tensor,
        state: State,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        u: torch.Tensor,
    ) -> None:
        n = logits.shape[0]
        self.logits[:n].copy_(logits)
        for dst, src in zip(self.state, state, strict=True):
            dst[:, :n].copy_(src)
        self.temperature[:n].copy_(temperature)
        self.top_k[:n].copy_(top_k)
        self.top_p[:n].copy_(top_p)
        self.u[:n].copy_(u)


class PaddedStep:
    """sample -> step on rows padded to a bucket; eager, or replayed from CUDA graphs."""

    def __init__(
        self, decoder: StepDecoder, vocab: int, device: torch.device, use_graphs: bool | None = None
    ):
        self.decoder = decoder
        self.vocab = vocab
        self.device = device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _compute(self, buf: _Buffers) -> tuple[torch.Tensor, torch.Tensor, State]:
        ids = sample_next(buf.logits, buf.temperature, buf.top_k, buf.top_p, buf.u)
        logits, state = self.decoder.step(ids, buf.state)
        return ids, logits, state

    def _capture(self, size: int, buf: _Buffers) -> None:
        # Warm up on a side stream (cuBLAS workspaces, allocator), then capture.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._compute(buf)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            buf.out = self._compute(buf)
        self._graphs[size] = graph

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        state: State,
        temperature: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        u: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        rows = logits.shape[0]
        size = bucket_for(rows)
        buf = self._buffers.get(size)
        if buf is None:
            buf = self._buffers[size] = _Buffers(size, self.vocab, state, self.device)
        buf.load(logits, state, temperature, top_k, top_p, u)
        if self.use_graphs:
            if size not in self._graphs:
                self._capture(size, buf)
            self._graphs[size].replay()
            assert buf.out is not None
            ids, new_logits, new_state = buf.out
        else:
            ids, new_logits, new_state = self._compute(buf)
        # Copies, not views: the next replay overwrites the static outputs.
        return (
            ids[:rows].clone(),
            new_logits[:rows].clone(),
            tuple(s[:, :rows].clone() for s in new_state),
        )
