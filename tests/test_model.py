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


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_step_matches_forward(cell, int8):
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, cell, seed=3)
    decoder = StepDecoder(model, int8=int8)
    ids = torch.randint(0, 8, (4, 6))
    full, _ = model(ids)
    _, state = model(ids[:, :1])
    # int8 weights are an approximation: close, not equal.
    tol = 3e-2 if int8 else 1e-5
    for t in range(1, 6):
        logits, state = decoder.step(ids[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=tol, rtol=tol)


def test_int8_step_rows_do_not_depend_on_their_neighbours():
    vocab = Vocabulary("abcdefgh")
    decoder = StepDecoder(tiny_model(vocab, seed=5), int8=True)
    torch.manual_seed(0)
    ids = torch.randint(0, 8, (16,))
    state = tuple(torch.randn(2, 16, 32) for _ in range(2))
    together, _ = decoder.step(ids, state)
    for i in (0, 7, 15):
        alone, _ = decoder.step(ids[i : i + 1], tuple(s[:, i : i + 1] for s in state))
        assert torch.equal(alone[0], together[i])
