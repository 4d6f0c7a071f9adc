import numpy as np
import pytest
import torch

from charrnn import SamplingParams, native
from charrnn.sampling import Sampler, sample_next, sampler, uniforms
from tests.conftest import pack_mask, reference_interval


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


def _random_rows(g: torch.Generator, n: int, v: int) -> tuple[torch.Tensor, ...]:
    """``n`` rows of logits over ``v`` characters with every kind of sampling setting, and
    their uniforms: (logits, temperature, top_k, top_p, u)."""
    logits = torch.randn(n, v, generator=g) * 4
    temperature = torch.rand(n, generator=g) * 1.5 + 0.2
    top_k = torch.randint(1, v + 5, (n,), generator=g)
    top_p = torch.rand(n, generator=g) * 0.9 + 0.1
    top_p[::3] = 1.0
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return logits, temperature, top_k, top_p, u


def test_native_sampler_agrees_with_sample_next():
    """The same ids but where the draw lies within float32 rounding of the edge between two
    characters (the two compute the softmax with different exp and sum code); both then pick
    a character whose float64 share of the CDF the draw touches."""
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    g, n, v = torch.Generator().manual_seed(0), 20000, 65
    logits, temperature, top_k, top_p, u = _random_rows(g, n, v)
    want = sample_next(logits, temperature, top_k, top_p, u)
    got = torch.ops.charrnn.sample(logits, temperature, top_k, top_p, u)
    differ = (want != got).nonzero().flatten().tolist()
    assert len(differ) <= 2, differ
    for i in differ:
        for ids in (want, got):
            row = (logits[i], temperature[i], top_k[i], top_p[i], u[i], ids[i])
            assert reference_interval(*row) < 1e-5


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


def _masked_draw(logits, allowed, n, sample, temperature=1.0, top_k=None, top_p=1.0):
    v = logits.shape[-1]
    u = torch.from_numpy(uniforms(np.zeros(n, np.uint64), np.arange(n, dtype=np.uint64)))
    mask = pack_mask(allowed.expand(n, -1))
    args = (torch.full((n,), temperature), torch.full((n,), top_k or v), torch.full((n,), top_p))
    return sample(logits.expand(n, v).contiguous(), *args, u, mask)


def test_masked_draw_gives_the_forbidden_mass_to_end(sample):
    """The forbidden characters' mass goes to "end" (id V); temperature then treats it as one
    outcome whose logit is their logsumexp."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    allowed = torch.tensor([[True, False, True, False, False, True]])  # chars 0, 2 and end
    n = 20000
    for temperature in (1.0, 0.5):
        ids = _masked_draw(logits, allowed, n, sample, temperature)
        freq = torch.bincount(ids, minlength=6).float() / n
        forbidden = logits[0, [1, 3, 4]].logsumexp(0)
        outcomes = torch.tensor([2.0, 0.0, float(forbidden)]) / temperature
        want = torch.zeros(6)
        want[[0, 2, 5]] = torch.softmax(outcomes, 0)
        torch.testing.assert_close(freq, want, atol=0.015, rtol=0)
    # At temperature 1, "end" has exactly the model's mass on the forbidden characters.
    ids = _masked_draw(logits, allowed, n, sample)
    mass = torch.softmax(logits[0], 0)[[1, 3, 4]].sum()
    assert abs((ids == 5).float().mean() - mass) < 0.015


def test_mask_without_end_renormalises_the_allowed_characters(sample):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    allowed = torch.tensor([[False, True, True, False, False]])
    ids = _masked_draw(logits, allowed, 20000, sample)
    freq = torch.bincount(ids, minlength=5).float() / 20000
    want = torch.tensor([0.0, *torch.softmax(torch.tensor([1.0, 0.0]), 0), 0.0, 0.0])
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_top_k_counts_end_as_one_outcome(sample):
    """Greedy (top_k 1) ends where the forbidden mass beats every allowed character."""
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.5]])
    end_allowed = torch.tensor([[False, False, True, True, True]])  # 0 and 1 forbidden
    assert set(_masked_draw(logits, end_allowed, 200, sample, top_k=1).tolist()) == {4}
    no_end = torch.tensor([[False, False, True, True, False]])
    assert set(_masked_draw(logits, no_end, 200, sample, top_k=1).tolist()) == {3}
    assert set(_masked_draw(logits, end_allowed, 2000, sample, top_k=2).tolist()) == {3, 4}


def test_a_mask_that_allows_every_character_changes_nothing(sample):
    """Whatever its end bit says: no character is forbidden, so there is no mass to end on."""
    g = torch.Generator().manual_seed(1)
    n, v = 500, 70  # 71 bits: the end bit lies in a second word
    logits = torch.randn(n, v, generator=g) * 3
    t, k, p = torch.rand(n, generator=g) + 0.3, torch.randint(1, v + 1, (n,)), torch.rand(n) + 0.1
    u = torch.rand(n, generator=g, dtype=torch.float64)
    plain = sample(logits, t, k, p.clamp(max=1), u)
    for end in (True, False):
        allowed = torch.ones(n, v + 1, dtype=torch.bool)
        allowed[:, v] = end
        assert torch.equal(sample(logits, t, k, p.clamp(max=1), u, pack_mask(allowed)), plain)


def test_a_mask_that_allows_nothing_ends(sample):
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    nothing = torch.zeros(1, 4, dtype=torch.bool)
    assert set(_masked_draw(logits, nothing, 50, sample).tolist()) == {3}
    only_end = torch.tensor([[False, False, False, True]])
    assert set(_masked_draw(logits, only_end, 50, sample).tolist()) == {3}


def _masked_outcomes(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """A masked row's V + 1 outcome logits in float64: the reference of both samplers."""
    x = logits.double()
    v = x.shape[-1]
    end = x[~allowed[:v]].logsumexp(0) if allowed[v] else torch.tensor(float("-inf"))
    return torch.cat([x.masked_fill(~allowed[:v], float("-inf")), end.double()[None]])


def test_native_masked_sampler_agrees_with_sample_next():
    """As unmasked: the same ids but where the draw lies within float32 rounding of an edge."""
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    g, n, v = torch.Generator().manual_seed(0), 20000, 65
    logits, temperature, top_k, top_p, u = _random_rows(g, n, v)
    allowed = torch.rand(n, v + 1, generator=g) < torch.rand(n, 1, generator=g)
    allowed[::11] = True
    allowed[1::13, :v] = False
    mask = pack_mask(allowed)
    want = sample_next(logits, temperature, top_k, top_p, u, mask)
    got = torch.ops.charrnn.sample(logits, temperature, top_k, top_p, u, mask)
    # Every kind of row occurs: unmasked, ended, forbidden-nothing-possible, a character.
    assert (want == v).sum() > 1000 and (want < v).sum() > 10000
    possible = allowed.any(-1)
    assert allowed[possible].gather(1, want[possible][:, None]).all()
    differ = (want != got).nonzero().flatten().tolist()
    assert len(differ) <= 2, differ
    for i in differ:
        outcomes = _masked_outcomes(logits[i], allowed[i])
        for ids in (want, got):
            row = (outcomes, temperature[i], top_k[i], top_p[i], u[i], ids[i])
            assert reference_interval(*row) < 1e-5


def test_native_sampler_refuses_a_bad_mask():
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    logits, t, k, p = torch.zeros(2, 40), torch.ones(2), torch.full((2,), 40), torch.ones(2)
    u = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"mask must be an int32 CPU \[B, W\] with W >= "):
        torch.ops.charrnn.sample(logits, t, k, p, u, torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"W >= \(V \+ 32\) / 32 = 2 and B = 2"):
        torch.ops.charrnn.sample(logits, t, k, p, u, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="mask must be an int32"):
        torch.ops.charrnn.sample(logits, t, k, p, u, torch.zeros(2, 2, dtype=torch.int64))


def test_mask_bits_past_end_are_ignored(sample):
    """llguidance's masks are wider than V + 1 bits (its own tokens follow "end")."""
    g = torch.Generator().manual_seed(2)
    n, v = 300, 40
    logits = torch.randn(n, v, generator=g) * 3
    t, k, p = torch.ones(n), torch.full((n,), v), torch.ones(n)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    allowed = torch.rand(n, v + 1, generator=g) < 0.5
    wide = torch.cat([allowed, torch.rand(n, 100, generator=g) < 0.5], 1)
    narrow = sample(logits, t, k, p, u, pack_mask(allowed))
    assert pack_mask(wide).shape[1] > pack_mask(allowed).shape[1]
    assert torch.equal(sample(logits, t, k, p, u, pack_mask(wide)), narrow)
