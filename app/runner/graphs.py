"""CUDA graphs for the decode step, captured the way vLLM captures them, and the one place
that says at start-up which decode path a model runs and why.

A decode step at small batch is a few dozen tiny kernels; launching them one by one from
Python costs more than running them. A captured graph launches them all at once. Rows are
padded up to a bucket (temperature 1, no top-k/top-p, u = 0 in the padding) and the padding
is dropped afterwards. ``PaddedStep`` runs the identical padded computation eagerly; on the
CPU it is what the tests check, on CUDA it is what the graphs capture.

Every bucket up to ``max_concurrent``'s is captured at warm-up (``capture_all``), never
mid-serving, where a capture would synchronise the device and stall every stream:

* largest first, all into one memory pool (``torch.cuda.graph_pool_handle``): a smaller
  graph's temporaries reuse the larger one's memory. The pool is the model's own: two models'
  decode threads replay concurrently and must not share temporaries. The static inputs are
  one set of buffers of the largest bucket, outside the pool, that each graph reads a prefix of;
  every graph's outputs stay referenced, so no later capture reuses them;
* under one process-wide lock (``CAPTURE_LOCK``): PyTorch allows one capture at a time, and
  several models on one GPU warm up from several threads;
* above the largest bucket (``MAX_BUCKET`` rows) a step runs eagerly, with one start-up line.

A row's numbers do not depend on its bucket: the fp32 matmuls run in fixed 32-row blocks
(``charrnn.kernels.blocked_mm``), so every bucket runs the same cuBLAS kernel on every block,
and the rest of the step is elementwise or per row. ``bench/gpu_check.sh`` checks that on a
GPU (one seed alone and among 200 streams)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from charrnn.decode import StepDecoder
from charrnn.model import State
from charrnn.sampling import SamplingBatch, sample_next

log = logging.getLogger("charrnn.graphs")

# Rows per graph. Below 32 nothing is gained: the fp32 matmuls run in 32-row blocks anyway.
BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
MAX_BUCKET = BUCKETS[-1]
# One capture at a time in the process (see the module docstring).
CAPTURE_LOCK = threading.Lock()

Outputs = tuple[torch.Tensor, torch.Tensor, State]


def bucket_for(rows: int) -> int | None:
    """The smallest bucket that holds ``rows``, or None above the largest (eager)."""
    for b in BUCKETS:
        if rows <= b:
            return b
    return None


def bucket_plan(max_concurrent: int) -> list[int]:
    """The buckets a batch of up to ``max_concurrent`` rows can use, in capture order:
    largest first."""
    top = bucket_for(max_concurrent) or BUCKETS[-1]
    return sorted((b for b in BUCKETS if b <= top), reverse=True)


class _Buffers:
    """Static inputs for every bucket: the largest bucket's rows; a bucket reads a prefix."""

    def __init__(self, size: int, vocab: int, state: State, device: torch.device):
        f = dict(device=device)
        self.logits = torch.zeros(size, vocab, **f)
        self.state = tuple(torch.zeros(s.shape[0], size, s.shape[2], **f) for s in state)
        self.sampling = SamplingBatch(
            torch.ones(size, **f),
            torch.full((size,), vocab, dtype=torch.long, **f),
            torch.ones(size, **f),
            np.zeros(size, dtype=np.uint64),  # the draws come in ``u``
        )
        self.u = torch.zeros(size, dtype=torch.float64, **f)

    def load(self, logits: torch.Tensor, state: State, sampling: SamplingBatch, u: torch.Tensor):
        """Copy the batch into the first rows; rows past them keep harmless values from
        earlier batches (logits and state of finished rows): each row's step is its own."""
        n = logits.shape[0]
        self.logits[:n].copy_(logits)
        for dst, src in zip(self.state, state, strict=True):
            dst[:, :n].copy_(src)
        for dst, src in zip(self.sampling.filters, sampling.filters, strict=True):
            dst[:n].copy_(src)
        self.u[:n].copy_(u)

    def prefix(self, size: int) -> tuple[torch.Tensor, State, SamplingBatch, torch.Tensor]:
        """The first ``size`` rows, as views: what a bucket's graph reads."""
        t, k, p = (x[:size] for x in self.sampling.filters)
        sampling = SamplingBatch(t, k, p, self.sampling.seeds[:size])
        state = tuple(s[:, :size] for s in self.state)
        return self.logits[:size], state, sampling, self.u[:size]


class PaddedStep:
    """sample -> step on rows padded to a bucket; eager, or replayed from CUDA graphs.

    ``capture`` captures one bucket (``cuda_capture`` by default); the tests pass a stub to
    check the plan, the order and the lock without a GPU."""

    def __init__(
        self,
        decoder: StepDecoder,
        vocab: int,
        device: torch.device,
        use_graphs: bool | None = None,
        capture: Callable[[PaddedStep, int], Any] | None = None,
    ):
        self.decoder = decoder
        self.vocab = vocab
        self.device = device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.capture = capture or cuda_capture
        self.buffers: _Buffers | None = None
        self.graphs: dict[int, Any] = {}
        self.outputs: dict[int, Outputs] = {}
        self.captured: list[int] = []  # in capture order
        self.pool: Any = None
        self.stream: Any = None

    def compute(self, size: int, buf: _Buffers | None = None) -> Outputs:
        """The padded step on the first ``size`` rows of ``buf`` (the static buffers)."""
        buf = buf or self.buffers
        assert buf is not None
        # The reference sampler, op by op: what a CUDA graph captures.
        return self.decoder.sample_and_step(*buf.prefix(size), sample=sample_next)

    @torch.inference_mode()
    def capture_all(self, max_concurrent: int, state_like: State) -> list[int]:
        """Capture every bucket a batch of up to ``max_concurrent`` rows can use, largest
        first, under ``CAPTURE_LOCK``. Returns the buckets in capture order."""
        plan = bucket_plan(max_concurrent)
        if not self.use_graphs:
            return []
        if self.buffers is None:  # once: the graphs read these very tensors
            self.buffers = _Buffers(plan[0], self.vocab, state_like, self.device)
        with CAPTURE_LOCK:
            for size in plan:
                if size not in self.graphs:
                    self.graphs[size] = self.capture(self, size)
                    self.captured.append(size)
        return self.captured

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, state: State, sampling: SamplingBatch, u: torch.Tensor
    ) -> Outputs:
        rows = logits.shape[0]
        bucket = bucket_for(rows)
        if self.use_graphs and bucket in self.graphs:
            assert self.buffers is not None and bucket is not None
            self.buffers.load(logits, state, sampling, u)
            self.graphs[bucket].replay()
            ids, new_logits, new_state = self.outputs[bucket]
        else:
            # Eager above the largest bucket (or without graphs): padded to whole blocks
            # like a bucket, into buffers of its own (the graphs' are sized and fixed).
            size = bucket or -(-rows // self.decoder.block) * self.decoder.block
            buf = _Buffers(size, self.vocab, state, self.device)
            buf.load(logits, state, sampling, u)
            ids, new_logits, new_state = self.compute(size, buf)
        # Copies, not views: the next replay overwrites the static outputs.
        return (
            ids[:rows].clone(),
            new_logits[:rows].clone(),
            tuple(s[:, :rows].clone() for s in new_state),
        )


def cuda_capture(step: PaddedStep, size: int) -> torch.cuda.CUDAGraph:
    """Capture ``size`` rows of ``step`` into a CUDA graph in the step's pool, on the step's
    own side stream (the same stream for every capture into one pool, as PyTorch asks)."""
    if step.pool is None:
        step.pool = torch.cuda.graph_pool_handle()
        step.stream = torch.cuda.Stream(step.device)
    stream = step.stream
    # Warm up on the side stream first (cuBLAS handles and workspaces, allocator).
    stream.wait_stream(torch.cuda.current_stream(step.device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            step.compute(size)
    torch.cuda.current_stream(step.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another model's decode thread may run CUDA work meanwhile.
    with torch.cuda.graph(graph, pool=step.pool, stream=stream, capture_error_mode="thread_local"):
        step.outputs[size] = step.compute(size)
    torch.cuda.synchronize(step.device)
    return graph


def prepare(name: str, runner: Any, max_concurrent: int) -> None:
    """At start-up, for one loaded model: log its decode path and why (one line), and on
    CUDA capture its graphs and say which and whether big batches run eagerly (one line)."""
    decoder: StepDecoder = runner.decoder
    log.info(
        "model %s decodes with %s weights (%s), %s kernels; %s",
        name,
        decoder.weights,
        runner.decode_reason,
        decoder.kernels,
        decoder.invariance,
    )
    graphed: PaddedStep | None = getattr(runner, "graphed", None)
    if graphed is None or not graphed.use_graphs:
        return
    state = decoder.model.init_state(1)
    captured = graphed.capture_all(max_concurrent, state)
    eager = f"; batches above {MAX_BUCKET} rows run eagerly" if max_concurrent > MAX_BUCKET else ""
    log.info("model %s: CUDA graphs captured for %s rows%s", name, captured, eager)
