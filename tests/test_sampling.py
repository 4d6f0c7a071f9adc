import numpy as np
import pytest
import torch

from charrnn import SamplingParams, native
from charrnn.sampling import Sampler, sample_next, sampler, uniforms


@pytest.fixture(params=["torch", "native"])
def sample(request) -> Sampler:
    """``sample_next`` itself, and the native sampler the CPU service runs."""
    if request.param == "torch":
        return sample_next
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    return torch.ops.charrnn.sample.default


def _draw(logits, n, temperature=1.0, top_k=None, top_p=1.0, seed=0, sample=sample_next):
    v = logits.shape[-1]
    rows = logits.expand(n, v).contiguous()
    u = torch.from_numpy(uniforms(np.full(n, seed, np.uint64), np.arange(n, dtype=np.uint64)))
    return sample(
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


def test_frequencies_follow_softmax(sample):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    ids = _draw(logits, 20000, sample=sample)
    freq = torch.bincount(ids, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_top_k_and_top_p_restrict_support(sample):
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.5, 0.0]])
    assert set(_draw(logits, 2000, top_k=2, sample=sample).tolist()) == {0, 1}
    assert set(_draw(logits, 2000, top_k=1, sample=sample).tolist()) == {0}
    # probs ~ [0.47, 0.43, 0.06, ...]: the nucleus for 0.5 needs the first two.
    assert set(_draw(logits, 2000, top_p=0.5, sample=sample).tolist()) == {0, 1}
    assert set(_draw(logits, 2000, top_p=0.3, sample=sample).tolist()) == {0}


def test_low_temperature_is_greedy_and_high_is_flat(sample):
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    assert set(_draw(logits, 500, temperature=0.01, sample=sample).tolist()) == {0}
    freq = torch.bincount(_draw(logits, 20000, temperature=10.0, sample=sample), minlength=3)
    assert (freq / 20000).min() > 0.28


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-46])  # 1e-46 is 0 in float32
def test_a_vanishing_temperature_is_greedy(sample, temperature):
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(5)) * 3
    n = len(logits)
    u = torch.from_numpy(uniforms(np.arange(n, dtype=np.uint64), np.zeros(n, np.uint64)))
    ids = sample(logits, torch.full((n,), temperature), torch.full((n,), 30), torch.ones(n), u)
    assert torch.equal(ids, logits.argmax(-1))


def test_edges_of_the_draw_never_pick_a_filtered_character(sample):
    """A draw that rounds up to the whole kept mass (u within 2**-25 of 1 is 1.0 in float32),
    a top_p that is 0 in float32, and characters whose probability underflows to 0."""
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, -200.0]]).expand(4, 6).contiguous()
    temperature = torch.ones(4)
    top_k = torch.tensor([2, 6, 6, 3])
    top_p = torch.tensor([1.0, 5e-324, 1.0, 1.0])
    u = torch.full((4,), 1 - 2**-30, dtype=torch.float64)
    ids = sample(logits, temperature, top_k, top_p, u)
    # top-2 is {1, 2}; tiny top_p keeps the most likely; otherwise the least likely kept
    # character with any probability (5 underflows to 0).
    assert ids.tolist() == [2, 1, 4, 3]
    u = torch.zeros(4, dtype=torch.float64)
    assert sample(logits, temperature, top_k, top_p, u).tolist() == [1, 1, 1, 1]


def test_row_result_independent_of_batch_neighbours(sample):
    torch.manual_seed(0)
    logits = torch.randn(8, 30)
    temps = torch.rand(8) + 0.5
    ks = torch.randint(1, 31, (8,))
    ps = torch.rand(8) * 0.9 + 0.1
    u = torch.from_numpy(uniforms(np.arange(8, dtype=np.uint64), np.full(8, 3, np.uint64)))
    together = sample(logits, temps, ks, ps, u)
    for i in range(8):
        s = slice(i, i + 1)
        assert sample(logits[s], temps[s], ks[s], ps[s], u[s]).item() == together[i].item()


def _reference_interval(logits, temperature, top_k, top_p, u, pick) -> float:
    """How far (in kept mass, float64) the draw lies outside ``pick``'s share of the CDF."""
    z = logits.double() / temperature
    p = torch.softmax(z, -1)
    order = torch.sort(p, descending=True, stable=True).indices
    sorted_p = p[order][: int(top_k)]
    before = torch.cumsum(sorted_p, 0) - sorted_p
    kept = sorted_p[(before < top_p * sorted_p.sum()) | (torch.arange(len(sorted_p)) == 0)]
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(kept, 0)])
    rank = int((order[: len(kept)] == pick).nonzero()[0, 0])
    target = float(u) * float(edges[-1])
    return max(float(edges[rank]) - target, target - float(edges[rank + 1]), 0.0) / float(edges[-1])


def test_native_sampler_agrees_with_sample_next():
    """The same ids but where the draw lies within float32 rounding of the edge between two
    characters (the two compute the softmax with different exp and sum code); both then pick
    a character whose float64 share of the CDF the draw touches."""
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    g = torch.Generator().manual_seed(0)
    n, v = 20000, 65
    logits = torch.randn(n, v, generator=g) * 4
    temperature = torch.rand(n, generator=g) * 1.5 + 0.2
    top_k = torch.randint(1, v + 5, (n,), generator=g)
    top_p = torch.rand(n, generator=g) * 0.9 + 0.1
    top_p[::3] = 1.0
    u = torch.rand(n, generator=g, dtype=torch.float64)
    want = sample_next(logits, temperature, top_k, top_p, u)
    got = torch.ops.charrnn.sample(logits, temperature, top_k, top_p, u)
    differ = (want != got).nonzero().flatten().tolist()
    assert len(differ) <= 2, differ
    for i in differ:
        for ids in (want, got):
            row = (logits[i], temperature[i], top_k[i], top_p[i], u[i], ids[i])
            assert _reference_interval(*row) < 1e-5


def test_native_sampler_refuses_bad_arguments():
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    logits, t, k, p = torch.zeros(2, 5), torch.ones(2), torch.full((2,), 5), torch.ones(2)
    u = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="u must be a Double CPU vector of 2 rows"):
        torch.ops.charrnn.sample(logits, t, k, p, u.float())
    with pytest.raises(RuntimeError, match="top_k must be a Long CPU vector of 2 rows"):
        torch.ops.charrnn.sample(logits, t, k[:1], p, u)
    with pytest.raises(RuntimeError, match="logits must be a float32 CPU"):
        torch.ops.charrnn.sample(logits.double(), t, k, p, u)


def test_sampler_follows_the_device_and_the_setting():
    cpu = torch.device("cpu")
    assert sampler(torch.device("cuda")) is sample_next
    assert sampler(cpu, native_kernels=False) is sample_next
    if native.load():
        assert sampler(cpu) is torch.ops.charrnn.sample.default


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
