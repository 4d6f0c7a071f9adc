import pytest
import torch

from charrnn import Vocabulary
from charrnn.decode import StepDecoder
from tests.conftest import tiny_model


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_shapes_and_state_carry(cell):
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, cell)
    ids = torch.randint(0, 8, (3, 11))
    logits, state = model(ids)
    assert logits.shape == (3, 11, 8)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert state[0].shape == (2, 3, 32)
    # Running in two halves with the carried state equals one pass.
    l1, s1 = model(ids[:, :5])
    l2, _ = model(ids[:, 5:], s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_step_matches_forward(cell):
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, cell, seed=3)
    decoder = StepDecoder(model)
    ids = torch.randint(0, 8, (4, 6))
    full, _ = model(ids)
    _, state = model(ids[:, :1])
    for t in range(1, 6):
        logits, state = decoder.step(ids[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=1e-5)
