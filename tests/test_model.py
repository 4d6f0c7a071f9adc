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


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_step_matches_forward(cell, weights):
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, cell, seed=3)
    decoder = StepDecoder(model, weights)
    ids = torch.randint(0, 8, (4, 6))
    full, _ = model(ids)
    _, state = model(ids[:, :1])
    # int8 is an approximation: close, not equal.
    tol = 3e-2 if weights == "int8" else 1e-5
    for t in range(1, 6):
        logits, state = decoder.step(ids[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=tol, rtol=tol)


@pytest.mark.parametrize("hidden", [32, 40, 256])
def test_int8_step_rows_do_not_depend_on_their_neighbours(hidden):
    vocab = Vocabulary("abcdefgh")
    decoder = StepDecoder(tiny_model(vocab, seed=5, hidden=hidden), "int8")
    torch.manual_seed(0)
    n = 70
    ids = torch.randint(0, 8, (n,))
    state = (torch.randn(2, n, hidden).tanh(), torch.randn(2, n, hidden))
    alone = [decoder.step(ids[i : i + 1], tuple(s[:, i : i + 1] for s in state)) for i in range(n)]
    # Every row, in batches of every size from 1 to 70 (kernels block rows differently).
    for b in range(1, n + 1):
        logits, (h, c) = decoder.step(ids[:b], tuple(s[:, :b] for s in state))
        for i in range(b):
            assert torch.equal(logits[i], alone[i][0][0]), (b, i)
            assert torch.equal(h[:, i], alone[i][1][0][:, 0]), (b, i)
            assert torch.equal(c[:, i], alone[i][1][1][:, 0]), (b, i)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_int8_prime_pass_equals_stepping_bit_for_bit(cell):
    """The layer-at-a-time prime pass is an optimisation, not an approximation: the state it
    leaves is exactly the one of feeding the prime through the step one character at a time."""
    vocab = Vocabulary("abcdefgh")
    decoder = StepDecoder(tiny_model(vocab, cell, seed=7, hidden=40), "int8")
    ids = torch.randint(0, 8, (37,), generator=torch.Generator().manual_seed(1))  # 3 chunks
    logits, state = decoder.prime(ids)
    stepped = decoder.model.init_state(1)
    for i in ids:
        want, stepped = decoder.step(i[None], stepped)
    assert torch.equal(logits, want)
    for got, exp in zip(state, stepped, strict=True):
        assert torch.equal(got, exp)
    # And it stays close to the fp32 model on the whole sequence.
    full, _ = decoder.model(ids[None])
    torch.testing.assert_close(logits[0], full[0, -1], atol=5e-2, rtol=5e-2)


def test_fp32_prime_is_the_model_on_the_whole_sequence():
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, seed=2)
    ids = torch.randint(0, 8, (9,))
    logits, (h, c) = StepDecoder(model).prime(ids)
    with torch.inference_mode():
        full, (fh, fc) = model(ids[None])
    assert torch.equal(logits, full[:, -1]) and torch.equal(h, fh) and torch.equal(c, fc)
