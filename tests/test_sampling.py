import numpy as np
import pytest
import torch

from charrnn import SamplingParams
from charrnn.sampling import sample_next, uniforms


def _draw(logits, n, temperature=1.0, top_k=None, top_p=1.0, seed=0):
    v = logits.shape[-1]
    rows = logits.expand(n, v)
    u = torch.from_numpy(uniforms(np.full(n, seed, np.uint64), np.arange(n, dtype=np.uint64)))
    return sample_next(
        rows,
        torch.full((n,), temperature),
        torch.full((n,), top_k or v),
        torch.full((n,), top_p),
        u,
    )


def test_uniforms_are_uniform_and_keyed_by_seed_and_position():
    u = uniforms(np.zeros(20000, np.uint64), np.arange(20000, dtype=np.uint64))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert hist.min() > 1800
    a = uniforms(np.array([1, 2], np.uint64), np.array([5, 5], np.uint64))
    b = uniforms(np.array([2, 1], np.uint64), np.array([5, 5], np.uint64))
    assert a[0] == b[1] and a[1] == b[0] and a[0] != a[1]


def test_uniforms_of_a_few_rows_equal_the_vectorised_ones():
    """Small batches take a Python-integer path; it must draw exactly the numpy path's numbers."""
    rng = np.random.default_rng(0)
    edges = np.array([0, 2**63 - 1], dtype=np.uint64)
    seeds = np.concatenate([rng.integers(0, 2**63, 200, dtype=np.uint64), edges])
    positions = np.concatenate([rng.integers(0, 2**40, 200, dtype=np.uint64), edges // 2**23])
    many = uniforms(seeds, positions)
    few = [uniforms(seeds[i : i + 1], positions[i : i + 1])[0] for i in range(len(seeds))]
    assert np.array_equal(np.array(few), many)
    pairs = uniforms(seeds[:2], positions[:2])
    assert np.array_equal(pairs, many[:2])


def test_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids = _draw(logits, 20000)
    freq = torch.bincount(ids, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.5, 0.0]])
    assert set(_draw(logits, 2000, top_k=2).tolist()) == {0, 1}
    assert set(_draw(logits, 2000, top_k=1).tolist()) == {0}
    # probs ~ [0.47, 0.43, 0.06, ...]: the nucleus for 0.5 needs the first two.
    assert set(_draw(logits, 2000, top_p=0.5).tolist()) == {0, 1}
    assert set(_draw(logits, 2000, top_p=0.3).tolist()) == {0}


def test_low_temperature_is_greedy_and_high_is_flat():
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    assert set(_draw(logits, 500, temperature=0.01).tolist()) == {0}
    freq = torch.bincount(_draw(logits, 20000, temperature=10.0), minlength=3) / 20000
    assert freq.min() > 0.28


def test_row_result_independent_of_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(8, 30)
    temps = torch.rand(8) + 0.5
    ks = torch.randint(1, 31, (8,))
    ps = torch.rand(8) * 0.9 + 0.1
    u = torch.from_numpy(uniforms(np.arange(8, dtype=np.uint64), np.full(8, 3, np.uint64)))
    together = sample_next(logits, temps, ks, ps, u)
    for i in range(8):
        s = slice(i, i + 1)
        assert sample_next(logits[s], temps[s], ks[s], ps[s], u[s]).item() == together[i].item()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": float("nan")},
        {"top_k": 0},
        {"top_p": 0},
        {"top_p": 1.5},
        {"seed": -1},
        {"seed": 2**63},
    ],
)
def test_params_validated(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
