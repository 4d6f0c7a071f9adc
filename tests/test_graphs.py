"""The CUDA graph logic, on the CPU: the bucket plan, the capture order and lock (a stub
capture that replays eagerly), the eager fall-back above the largest bucket, and the lines
the service logs at start-up. The real capture runs in tests/test_cuda.py on a GPU."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from app.runner import Batch, ModelRunner, graphs
from app.runner.graphs import BUCKETS, MAX_BUCKET, PaddedStep, bucket_for, bucket_plan
from charrnn import Vocabulary
from charrnn.checkpoint import Checkpoint
from charrnn.decode import StepDecoder
from tests.conftest import make_text, primed_row, tiny_model


class StubGraph:
    """Stands in for a CUDA graph: a replay writes the step's outputs in place, as a graph
    replay writes the tensors it captured."""

    def __init__(self, step: PaddedStep, size: int):
        self.step, self.size = step, size

    def replay(self) -> None:
        fresh = self.step.compute(self.size)
        old = self.step.outputs[self.size]
        old[0].copy_(fresh[0])
        old[1].copy_(fresh[1])
        for dst, src in zip(old[2], fresh[2], strict=True):
            dst.copy_(src)


def stub_capture(log: list[tuple[int, int]] | None = None, active: list[int] | None = None):
    def capture(step: PaddedStep, size: int) -> StubGraph:
        assert graphs.CAPTURE_LOCK.locked()
        if active is not None:
            active.append(1)
            assert len(active) == 1, "two captures at once"
            time.sleep(0.01)
        step.outputs[size] = step.compute(size)
        if log is not None:
            log.append((id(step), size))
        if active is not None:
            active.pop()
        return StubGraph(step, size)

    return capture


def _backend(hidden: int = 32) -> ModelRunner:
    vocab = Vocabulary.from_text(make_text())
    return ModelRunner(Checkpoint(tiny_model(vocab, hidden=hidden), vocab), torch.device("cpu"))


def test_bucket_plan():
    assert bucket_for(1) == bucket_for(32) == 32
    assert bucket_for(33) == 64 and bucket_for(1000) == MAX_BUCKET
    assert bucket_for(MAX_BUCKET + 1) is None
    assert bucket_plan(1) == [32]
    assert bucket_plan(64) == [64, 32]
    assert bucket_plan(100) == [128, 96, 64, 32]
    assert bucket_plan(10_000) == sorted(BUCKETS, reverse=True)


def test_capture_is_largest_first_one_at_a_time_across_models():
    """Two models capture from two threads at once: the lock serialises the captures and
    each model captures every bucket of its plan, largest first."""
    order: list[tuple[int, int]] = []
    active: list[int] = []
    steps = []
    for _ in range(2):
        b = _backend()
        steps.append(
            PaddedStep(b.decoder, len(b.vocab), b.device, True, stub_capture(order, active))
        )
    state = steps[0].decoder.model.init_state(1)
    threads = [threading.Thread(target=s.capture_all, args=(200, state)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in steps:
        assert s.captured == [256, 192, 128, 96, 64, 32]
        assert [size for who, size in order if who == id(s)] == s.captured
    assert not graphs.CAPTURE_LOCK.locked()
    # Captured once: a second call captures nothing more.
    assert steps[0].capture_all(200, state) == steps[0].captured
    assert len(order) == 12


@pytest.mark.parametrize("rows", [1, 5, 33, 64, 70])
def test_replays_give_each_row_its_numbers_alone_or_in_a_crowd(rows):
    """Through the stub graphs (buckets up to 64) and eagerly above them: every row's ids,
    logits and state equal those of the row stepped alone, bit for bit."""
    b = _backend()
    step = PaddedStep(b.decoder, len(b.vocab), b.device, True, stub_capture())
    step.capture_all(64, b.decoder.model.init_state(1))
    assert step.captured == [64, 32]
    batch = Batch.concat([primed_row(b, "the ", 0.9, 5, 0.95, i) for i in range(rows)])
    u = torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    args = (batch.logits, batch.state, batch.sampling, u)
    for _ in range(2):  # the second call replays over the first's outputs
        ids, logits, state = step(*args)
    for i in (0, rows // 2, rows - 1):
        one = (
            batch.logits[i : i + 1],
            tuple(s[:, i : i + 1] for s in batch.state),
            batch.sampling.select([i]),
            u[i : i + 1],
        )
        a_ids, a_logits, a_state = step(*one)
        assert torch.equal(a_ids[0], ids[i]) and torch.equal(a_logits[0], logits[i])
        assert all(torch.equal(x[:, 0], y[:, i]) for x, y in zip(a_state, state, strict=True))


def test_above_the_largest_bucket_the_step_runs_eagerly(monkeypatch):
    b = _backend()
    calls: list[int] = []
    step = PaddedStep(b.decoder, len(b.vocab), b.device, True, stub_capture())
    monkeypatch.setattr(graphs, "BUCKETS", (32, 64))
    monkeypatch.setattr(graphs, "MAX_BUCKET", 64)
    monkeypatch.setattr(
        graphs, "bucket_for", lambda r, buckets=(32, 64): next((x for x in buckets if r <= x), None)
    )
    step.capture_all(10_000, b.decoder.model.init_state(1))
    real = step.compute
    monkeypatch.setattr(
        step, "compute", lambda size, buf=None: calls.append(size) or real(size, buf)
    )
    batch = Batch.concat([primed_row(b, "a", 1.0, None, 1.0, i) for i in range(70)])
    u = torch.zeros(70, dtype=torch.float64)
    ids, logits, _ = step(batch.logits, batch.state, batch.sampling, u)
    assert ids.shape == (70,) and logits.shape == (70, len(b.vocab))
    assert step.captured == [64, 32]
    # Eager, padded to whole blocks of the decoder's fp32 matmuls; no graph replayed.
    assert calls == [-(-70 // b.decoder.block) * b.decoder.block]


def test_start_up_lines(caplog):
    caplog.set_level(logging.INFO, logger="charrnn.graphs")
    b = _backend()
    b.graphed = PaddedStep(b.decoder, len(b.vocab), b.device, True, stub_capture())
    graphs.prepare("tiny", b, 2000)
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("model tiny decodes with") and "batch-invariant" in line for line in lines
    )
    assert (
        f"model tiny: CUDA graphs captured for {sorted(BUCKETS, reverse=True)} rows; "
        f"batches above {MAX_BUCKET} rows run eagerly" in lines
    )
    caplog.clear()
    plain = _backend()
    graphs.prepare("cpu", plain, 64)
    assert not any("CUDA graphs" in r.getMessage() for r in caplog.records)


def test_int8_on_cuda_is_refused_with_one_line():
    model = tiny_model(Vocabulary("abcdefgh")).to("meta")  # any device that is not the CPU
    with pytest.raises(ValueError, match="the int8 decode step is CPU-only"):
        StepDecoder(model, "int8")
    from charrnn.quantization import choose_precision

    with pytest.raises(ValueError) as err:
        choose_precision("int8", torch.device("cuda"))
    assert "\n" not in str(err.value) and "set it to auto or fp32" in str(err.value)
    # auto on CUDA is fp32, with its reason.
    assert choose_precision("auto", torch.device("cuda")) == (
        "fp32",
        "cuda decodes in fp32 (int8 is a CPU path)",
    )
