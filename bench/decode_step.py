"""Decode-step time against batch size: the fused step (+ sampling) the service runs, and
``nn.LSTM`` fed one step at a time, on a model of the notebook's size (2x512 LSTM). The int8
step and prime are timed with the native kernels the service runs (charrnn/native.py) and
with the eager reference kernels, the fallback where no C++ compiler is at hand.
``--kernels`` times the shipped model's int8 step on each int8 matmul path of the native
kernels (charrnn/csrc/int8_gemm.cpp), forced in turn, against oneDNN's ``torch._int_mm``.

Limits: at batch 1 a step must read every weight once, so ``weight bytes / memory bandwidth``
bounds it; at large batches the matmuls dominate, so ``FLOPs / peak FLOP/s`` bounds it.
See bench/README.md for the arithmetic."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from app.config import Settings
from app.runner import Batch, ModelRunner
from bench.common import (
    DEFAULT_MODEL,
    emit,
    machine,
    median_seconds,
    memory_bandwidth,
    peak_flops,
    peak_int8_ops,
    vocabulary,
)
from charrnn import native
from charrnn.checkpoint import Checkpoint, load_checkpoint
from charrnn.decode import StepDecoder
from charrnn.model import CharRNN, ModelConfig
from charrnn.sampling import SamplingParams

BATCHES = (1, 8, 32, 128, 512)
KERNEL_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _advance(runner: ModelRunner, batch: Batch, positions: np.ndarray, steps: int = 1) -> Batch:
    """One decode call as the engine makes it once every row has its first character."""
    if runner.fusable(batch):
        return runner.decode(batch, positions, steps)[1]
    return runner.forward(batch, runner.sample(batch, positions))


# Characters per row in one call of the multi-step native decode (the service sizes its
# calls to a few milliseconds: app/engine/policy.py).
CALL_STEPS = 16


def step_cost(cfg: ModelConfig) -> tuple[int, int]:
    """(weight bytes read, FLOPs per row) of one fused LSTM decode step."""
    h, v, g = cfg.hidden, cfg.vocab_size, 4
    weights = g * h * h  # layer 0: W_hh (the input side is a table lookup of one row)
    weights += (cfg.layers - 1) * g * h * 2 * h  # higher layers: [W_ih | W_hh]
    weights += v * h  # head
    return weights * 4, 2 * weights


@torch.inference_mode()  # as the service's decode thread runs the step
def run(batches: tuple[int, ...] = BATCHES, device: str = "cpu") -> dict[str, object]:
    dev = torch.device(device)
    vocab = vocabulary()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(vocab))
    model = CharRNN(cfg).to(dev).eval()
    backend = ModelRunner(Checkpoint(model, vocab), dev)
    cpu = dev.type == "cpu"
    int8 = ModelRunner(Checkpoint(model, vocab), dev, weights="int8") if cpu else None
    eager = (
        ModelRunner(Checkpoint(model, vocab), dev, weights="int8", native_kernels=False)
        if cpu
        else None
    )
    weight_bytes, flops_per_row = step_cost(cfg)
    int8_bytes = weight_bytes // 4  # int8 weights (plus negligible per-row scales)
    bandwidth, peak = memory_bandwidth(dev), peak_flops(dev)
    int8_peak = peak_int8_ops() if int8 is not None else 0.0
    rows = []
    for b in batches:
        primed = backend.prime(backend.encode("Alice"), None)
        batch = Batch.concat(
            [backend.new_row(*primed, SamplingParams(1.0, 5, 0.95, i)) for i in range(b)]
        )
        positions = np.zeros(b, dtype=np.uint64)
        reps = 30 if b <= 32 else 10

        def fused(batch: Batch = batch, positions: np.ndarray = positions) -> None:
            _advance(backend, batch, positions)

        ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
        state = model.init_state(b)

        @torch.inference_mode()
        def lstm(ids: torch.Tensor = ids, state: tuple = state) -> None:
            model(ids, state)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        t_fused = median_seconds(fused, reps=reps, warmup=3)
        t_lstm = median_seconds(lstm, reps=reps, warmup=3)
        row: dict[str, object] = {
            "batch": b,
            "fused_step_us": round(t_fused * 1e6, 1),
            "nn_lstm_step_us": round(t_lstm * 1e6, 1),
            "speedup_vs_nn_lstm": round(t_lstm / t_fused, 2),
            "chars_per_s": round(b / t_fused),
            # Time a step would take if it only had to stream the weights / do the FLOPs.
            "bandwidth_bound_fraction": round(weight_bytes / bandwidth / t_fused, 3),
            "flops_fraction_of_peak": round(flops_per_row * b / t_fused / peak, 3),
        }
        if int8 is not None:

            def fused_int8(batch: Batch = batch, positions: np.ndarray = positions) -> None:
                _advance(int8, batch, positions)

            def fused_eager(batch: Batch = batch, positions: np.ndarray = positions) -> None:
                _advance(eager, batch, positions)

            def fused_calls(batch: Batch = batch, positions: np.ndarray = positions) -> None:
                _advance(int8, batch, positions, CALL_STEPS)

            t_int8 = median_seconds(fused_int8, reps=reps, warmup=3)
            if int8.multi_step:
                t_call = median_seconds(fused_calls, reps=max(3, reps // 4), warmup=1)
                row["int8_multi_step_us"] = round(t_call / CALL_STEPS * 1e6, 1)
            t_eager = median_seconds(fused_eager, reps=reps, warmup=3)
            ids8 = torch.zeros(b, dtype=torch.long)
            u = torch.rand(b, dtype=torch.float64)

            def model_only(ids: torch.Tensor = ids8, batch: Batch = batch) -> None:
                int8.decoder.step(ids, batch.state)

            def sampling_only(batch: Batch = batch, u: torch.Tensor = u) -> None:
                # The service's sampler (StepDecoder.sample: native where the step is).
                int8.decoder.sample(batch.logits, *batch.sampling.filters, u)

            t_model = median_seconds(model_only, reps=reps, warmup=3)
            t_sampling = median_seconds(sampling_only, reps=reps, warmup=3)
            row |= {
                # The service step split: the network alone, sampling alone.
                "int8_model_us": round(t_model * 1e6, 1),
                "sampling_us": round(t_sampling * 1e6, 1),
                "int8_step_us": round(t_int8 * 1e6, 1),
                "int8_kernels": int8.decoder.kernels,
                "int8_eager_step_us": round(t_eager * 1e6, 1),
                "int8_chars_per_s": round(b / t_int8),
                "int8_speedup_vs_nn_lstm": round(t_lstm / t_int8, 2),
                "int8_bandwidth_bound_fraction": round(int8_bytes / bandwidth / t_int8, 3),
                "int8_ops_fraction_of_peak": round(flops_per_row * b / t_int8 / int8_peak, 3),
            }
        rows.append(row)
    primes = {}
    if int8 is not None and eager is not None:
        # With the service's intra-op threads (Settings.threads): the prime's layers run on
        # the inter-op threads, and more intra-op threads would only oversubscribe the cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(Settings().threads)
        for length in (100, 1000):
            ids = torch.arange(length) % len(vocab)
            for name, b in (("native", int8), ("eager", eager)):
                t = median_seconds(lambda b=b, ids=ids: b.decoder.prime(ids), reps=15, warmup=3)
                primes[f"int8_prime{length}_{name}_ms"] = round(t * 1e3, 2)
        torch.set_num_threads(threads)
    return {
        "benchmark": "decode_step",
        "machine": machine(),
        "model": cfg.to_dict(),
        "weight_bytes_per_step": weight_bytes,
        "int8_weight_bytes_per_step": int8_bytes,
        "flops_per_row": flops_per_row,
        "memory_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "peak_gflops": round(peak / 1e9, 1),
        "peak_int8_gops": round(int8_peak / 1e9, 1),
        "rows": rows,
        **primes,
        "large_vocab": large_vocab(dev),
        **({"int8_kernels": kernel_paths()} if int8 is not None else {}),
    }


@torch.inference_mode()
def kernel_paths(batches: tuple[int, ...] = KERNEL_BATCHES) -> dict[str, object]:
    """The int8 step (``StepDecoder.step``: the network alone, no sampling) of the shipped
    model (or the notebook-sized one) at each batch size, on every int8 matmul path this CPU
    has, forced in turn, with the service's intra-op threads; "onednn" is torch._int_mm, the
    kernels before ours, and "auto" what the service runs. Paths alternate within each batch
    size, so a busy neighbour slows them alike."""
    if not native.load():
        return {"skipped": "the native kernels are unavailable (no C++ compiler)"}
    if DEFAULT_MODEL.exists():
        model = load_checkpoint(DEFAULT_MODEL).model.eval()
    else:
        torch.manual_seed(0)
        model = CharRNN(ModelConfig(vocab_size=len(vocabulary()))).eval()
    decoder = StepDecoder(model, "int8")
    setting = native.int8_kernel_setting()
    paths = ["auto", *native.int8_kernels()]
    threads = torch.get_num_threads()
    torch.set_num_threads(Settings().threads)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    times: dict[str, dict[str, float]] = {path: {} for path in paths}
    try:
        for b in batches:
            ids = torch.randint(0, cfg.vocab_size, (b,), generator=g)
            h = torch.randn(cfg.layers, b, cfg.hidden, generator=g).tanh()
            state = (h, torch.randn(cfg.layers, b, cfg.hidden, generator=g))
            for path in paths:
                native.int8_kernel(path)
                # The portable path is slow at large batches: fewer repetitions there.
                reps = 30 if path != "portable" or b <= 8 else 5
                t = median_seconds(
                    lambda ids=ids, state=state: decoder.step(ids, state), reps=reps, warmup=3
                )
                times[path][str(b)] = round(t * 1e6, 1)
    finally:
        native.int8_kernel(setting)
        torch.set_num_threads(threads)
    return {
        "model": cfg.to_dict(),
        "threads": Settings().threads,
        "auto": native.int8_kernels()[0],
        "step_us": times,
        "batch2_over_batch1": {p: round(t["2"] / t["1"], 2) for p, t in times.items() if "2" in t},
        "batch8_over_batch1": {p: round(t["8"] / t["1"], 2) for p, t in times.items() if "8" in t},
    }


LARGE_VOCAB = 8000  # a corpus of source code has ~8,000-9,000 distinct characters


@torch.inference_mode()
def large_vocab(dev: torch.device) -> dict[str, object]:
    """One stream (batch 1) of the service's step on a 2x512 model with V = 8,000."""
    from charrnn.vocab import Vocabulary

    chars = "abcdefghijklmnopqrstuvwxyz" + "".join(chr(0x4E00 + i) for i in range(LARGE_VOCAB - 26))
    vocab = Vocabulary(chars)  # already in code-point order
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=len(vocab))).to(dev).eval()
    weights = "int8" if dev.type == "cpu" else "fp32"
    backend = ModelRunner(Checkpoint(model, vocab), dev, weights=weights)
    batch = backend.new_row(*backend.prime(backend.encode("abc"), None), SamplingParams())
    positions = np.zeros(1, dtype=np.uint64)
    t = median_seconds(lambda: _advance(backend, batch, positions), reps=30, warmup=3)
    u = torch.rand(1, dtype=torch.float64, device=dev)
    t_sampling = median_seconds(
        lambda: backend.decoder.sample(batch.logits, *batch.sampling.filters, u),
        reps=30,
        warmup=3,
    )
    return {
        "vocab_size": len(vocab),
        "weights": weights,
        "step_us": round(t * 1e6, 1),
        "sampling_us": round(t_sampling * 1e6, 1),
        "one_stream_chars_per_s": round(1 / t),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="*")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="only the int8 step on each int8 matmul path (default batches 1 2 4 8 16 32 64)",
    )
    args = p.parse_args()
    if args.kernels:
        emit(
            {
                "benchmark": "decode_step_kernels",
                **kernel_paths(tuple(args.batches or KERNEL_BATCHES)),
            }
        )
        return
    emit(run(tuple(args.batches or BATCHES), args.device))


if __name__ == "__main__":
    main()
