"""CUDA-only checks (run by bench/gpu_check.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from app.runner import Batch, ModelRunner
from app.runner.graphs import BUCKETS, PaddedStep
from charrnn import SamplingParams, Vocabulary, load_checkpoint
from charrnn.checkpoint import Checkpoint
from charrnn.generate import generate
from tests.conftest import make_text, primed_row, tiny_model
from training.config import FitConfig
from training.fit import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _backend() -> ModelRunner:
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab).cuda()
    return ModelRunner(Checkpoint(model, vocab), torch.device("cuda"))


@pytest.mark.parametrize("rows", [1, 5, 64, 300, 1100])
def test_cuda_graph_replay_equals_eager_bit_for_bit(rows):
    """Replays (every bucket captured up front, one pool) give the eager padded step's
    numbers exactly; 1,100 rows run eagerly above the largest bucket."""
    b = _backend()
    graphed = PaddedStep(b.decoder, len(b.vocab), torch.device("cuda"), use_graphs=True)
    assert graphed.capture_all(1100, b.model.init_state(1)) == sorted(BUCKETS, reverse=True)
    eager = PaddedStep(b.decoder, len(b.vocab), torch.device("cuda"), use_graphs=False)
    primed = b.prime(b.encode("Alice"), None)
    batch = Batch.concat([b.new_row(*primed, SamplingParams(0.9, 5, 0.95, i)) for i in range(rows)])
    u = torch.rand(rows, dtype=torch.float64, device="cuda")
    args = (batch.logits, batch.state, batch.sampling, u)
    for _ in range(3):  # replays over earlier outputs
        g_ids, g_logits, g_state = graphed(*args)
    e_ids, e_logits, e_state = eager(*args)
    assert torch.equal(g_ids, e_ids) and torch.equal(g_logits, e_logits)
    assert all(torch.equal(x, y) for x, y in zip(g_state, e_state, strict=True))


def test_cuda_rows_do_not_depend_on_their_bucket():
    """A row's logits and state are the same bits alone (bucket 32) and among 300 others
    (bucket 384): fixed 32-row blocks for the fp32 matmuls."""
    b = _backend()
    step = PaddedStep(b.decoder, len(b.vocab), torch.device("cuda"), use_graphs=True)
    step.capture_all(512, b.model.init_state(1))
    rows = 301
    batch = Batch.concat([primed_row(b, "Alice", 0.9, 5, 0.95, i) for i in range(rows)])
    g = torch.Generator(device="cuda").manual_seed(0)
    state = tuple(torch.randn(s.shape, device="cuda", generator=g).tanh() for s in batch.state)
    u = torch.rand(rows, dtype=torch.float64, device="cuda", generator=g)
    args = (batch.logits, state, batch.sampling, u)
    ids, logits, new = step(*args)
    for i in (0, 150, 300):
        o_ids, o_logits, o_new = step(
            batch.logits[i : i + 1],
            tuple(s[:, i : i + 1] for s in state),
            batch.sampling.select([i]),
            u[i : i + 1],
        )
        assert torch.equal(o_ids[0], ids[i]) and torch.equal(o_logits[0], logits[i])
        assert all(torch.equal(x[:, 0], y[:, i]) for x, y in zip(o_new, new, strict=True))


def test_two_models_capture_together_from_two_threads():
    import threading

    backends = [_backend(), _backend()]
    steps = [PaddedStep(b.decoder, len(b.vocab), torch.device("cuda"), True) for b in backends]
    errors: list[BaseException] = []

    def capture(step: PaddedStep) -> None:
        try:
            step.capture_all(256, step.decoder.model.init_state(1))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=capture, args=(s,)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(s.captured == [256, 192, 128, 96, 64, 32] for s in steps)


def test_service_backend_matches_reference_on_cuda():
    b = _backend()
    want = generate(b.model, b.vocab, "Alice", 50, SamplingParams(0.8, 5, 0.9, 3))
    import numpy as np

    batch = b.new_row(*b.prime(b.encode("Alice"), None), SamplingParams(0.8, 5, 0.9, 3))
    out = []
    with b.worker():
        for pos in range(50):
            sampled, batch = b.decode(batch, np.array([pos], dtype=np.uint64), 1)
            out.append(sampled.runs()[0][0])
    assert b.vocab.decode(out) == want


def test_training_on_cuda(tmp_path):
    data = tmp_path / "t.txt"
    data.write_text(make_text(20000))
    cfg = FitConfig(
        data=data,
        out=tmp_path / "m.pt",
        hidden=64,
        embed=16,
        batch_size=16,
        seq_len=50,
        epochs=2,
        device="cuda",
        progress=False,
    )
    result = fit(cfg)
    assert result.best_val_nll < 3.5
    assert "cuda" not in str(load_checkpoint(tmp_path / "m.pt").model.head.weight.device)
