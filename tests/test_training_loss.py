"""The sliced head + cross-entropy for large vocabularies equals autograd's, values and
gradients, and the training forward pass switches to it only for large batches of logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from charrnn import Vocabulary
from tests.conftest import make_text, tiny_model
from training import loss as loss_mod
from training import precision
from training.loss import linear_cross_entropy
from training.precision import Precision, TrainForward


@pytest.mark.parametrize("slice_logits", [1 << 23, 1000])  # one slice; many, with a remainder
def test_matches_autograd(monkeypatch, slice_logits):
    monkeypatch.setattr(loss_mod, "SLICE_LOGITS", slice_logits)
    torch.manual_seed(0)
    n, h, v = 301, 16, 97
    x = torch.randn(n, h, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(v, h) * 0.3).requires_grad_()
    b = torch.randn(v).requires_grad_()
    t = torch.randint(0, v, (n,))
    want = F.cross_entropy(x @ w.t() + b, t)
    want.backward(torch.tensor(2.0))
    expected = [x.grad.clone(), w.grad.clone(), b.grad.clone()]
    for p in (x, w, b):
        p.grad = None
    got = linear_cross_entropy(x, w, b, t)
    got.backward(torch.tensor(2.0))
    torch.testing.assert_close(got, want)
    for g, e in zip((x.grad, w.grad, b.grad), expected, strict=True):
        torch.testing.assert_close(g, e)


def test_training_forward_slices_only_large_batches_of_logits(monkeypatch):
    vocab = Vocabulary.from_text(make_text(2000))
    model = tiny_model(vocab).train()
    ids = torch.randint(0, len(vocab), (4, 30))
    y = torch.randint(0, len(vocab), (4, 30))
    fwd = TrainForward(model, Precision("fp32", "cpu", None, True, False, False))
    calls = []
    real = precision.linear_cross_entropy
    monkeypatch.setattr(precision, "linear_cross_entropy", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(1)
    plain, _ = fwd(ids, None, y)
    assert not calls  # 120 x V logits: autograd's path, exactly as before
    grads = torch.autograd.grad(plain, list(model.parameters()))
    monkeypatch.setattr(precision, "FUSED_HEAD_LOGITS", 0)
    torch.manual_seed(1)  # the same dropout masks
    sliced, _ = fwd(ids, None, y)
    assert calls
    torch.testing.assert_close(sliced, plain)
    for a, b in zip(torch.autograd.grad(sliced, list(model.parameters())), grads, strict=True):
        torch.testing.assert_close(a, b)
