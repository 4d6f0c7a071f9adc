"""CUDA-only checks (run by bench/gpu_check.sh on a GPU machine; skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch

from app.backend import Batch, ModelBackend
from app.graphs import PaddedStep
from charrnn import SamplingParams, Vocabulary, load_checkpoint
from charrnn.checkpoint import Checkpoint
from charrnn.generate import generate
from tests.conftest import make_text, tiny_model
from training.config import FitConfig
from training.fit import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _backend() -> ModelBackend:
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab).cuda()
    return ModelBackend(Checkpoint(model, vocab), torch.device("cuda"))


@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_cuda_graph_replay_equals_eager(rows):
    b = _backend()
    graphed = PaddedStep(b.decoder, len(b.vocab), torch.device("cuda"), use_graphs=True)
    eager = PaddedStep(b.decoder, len(b.vocab), torch.device("cuda"), use_graphs=False)
    primed = b.prime_part(b.encode("Alice"), None)
    batch = Batch.concat([b.new_row(*primed, SamplingParams(0.9, 5, 0.95, i)) for i in range(rows)])
    u = torch.rand(rows, dtype=torch.float64, device="cuda")
    args = (batch.logits, batch.state, batch.temperature, batch.top_k, batch.top_p, u)
    for _ in range(3):  # capture, then replays
        g_ids, g_logits, _ = graphed(*args)
    e_ids, e_logits, _ = eager(*args)
    assert torch.equal(g_ids, e_ids)
    torch.testing.assert_close(g_logits, e_logits)


def test_service_backend_matches_reference_on_cuda():
    b = _backend()
    want = generate(b.model, b.vocab, "Alice", 50, SamplingParams(0.8, 5, 0.9, 3))
    import numpy as np

    batch = b.new_row(*b.prime_part(b.encode("Alice"), None), SamplingParams(0.8, 5, 0.9, 3))
    out = []
    with b.worker():
        for pos in range(50):
            batch = b.advance(
                batch, np.array([pos], dtype=np.uint64), lambda i: out.append(i[0][0])
            )
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
