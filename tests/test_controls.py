"""Generation controls (charrnn/controls.py): each one against logits built by hand, their
order, the native sampler against the reference, multi-step decodes against single steps,
and banned strings in real generations."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch

from charrnn import SamplingParams, Vocabulary, native
from charrnn.controls import (
    BAN_STATE,
    FLAGS,
    Controls,
    ControlsBatch,
    _suffix_matches,
)
from charrnn.decode import StepDecoder
from charrnn.generate import generate
from charrnn.sampling import SamplingBatch, sample_next, uniforms
from tests.conftest import fit_tiny, generations, make_text, pack_mask

VOCAB = Vocabulary("\n abcde")  # ids: "\n" 0, " " 1, a 2, b 3, c 4, d 5, e 6
V = len(VOCAB)
ENCODE = VOCAB.encode

needs_native = pytest.mark.skipif(
    not native.load(), reason="the native kernels are not available here (no C++ compiler)"
)

# sample(logits, temperature, top_k, top_p, u, mask, controls) -> ids
Sample = Callable[..., torch.Tensor]


def _reference(logits, t, k, p, u, mask=None, controls=None) -> torch.Tensor:
    return sample_next(logits, t, k, p, u, mask, controls)


def _native(logits, t, k, p, u, mask=None, controls=None) -> torch.Tensor:
    tensors = None if controls is None else controls.tensors
    return torch.ops.charrnn.sample(logits, t, k, p, u, mask, tensors)


@pytest.fixture(params=["torch", "native"])
def sample(request) -> Sample:
    """The reference (reads the controls' state) and the native sampler (also advances it)."""
    if request.param == "torch":
        return _reference
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    return _native


def _row(prime: str = "", **kwargs) -> ControlsBatch:
    return ControlsBatch.of(Controls(**kwargs), V, ENCODE(prime), ENCODE)


def _frequencies(
    sample: Sample,
    logits: list[float],
    rows: ControlsBatch,
    n: int = 10000,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """How often each outcome (V + 1: "end" last) comes up in ``n`` draws from one state."""
    x = torch.tensor([logits]).expand(n, len(logits)).contiguous()
    u = torch.from_numpy(uniforms(np.full(n, 3, np.uint64), np.arange(n, dtype=np.uint64)))
    args = torch.full((n,), temperature), torch.full((n,), top_k or V), torch.full((n,), top_p)
    ids = sample(x, *args, u, None, rows.repeat(n))
    return torch.bincount(ids, minlength=V + 1).double() / n


def _softmax(logits: list[float], temperature: float = 1.0) -> torch.Tensor:
    """The expected frequencies of V + 1 outcomes ("end" never) for these logits."""
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, 0)
    return torch.cat([p, torch.zeros(1, dtype=torch.float64)])


def _close(freq: torch.Tensor, want: torch.Tensor, atol: float = 0.015) -> None:
    torch.testing.assert_close(freq, want, atol=atol, rtol=0)


LOGITS = [0.5, 0.0, 1.0, -1.0, 0.3, 2.0, -0.5]


def test_logit_bias_is_added_to_the_logits(sample):
    rows = _row(logit_bias=((2, 1.5), (5, -3.0)))
    want = list(LOGITS)
    want[2] += 1.5
    want[5] -= 3.0
    _close(_frequencies(sample, LOGITS, rows), _softmax(want))
    torch.testing.assert_close(rows.adjusted(torch.tensor([LOGITS]))[0], torch.tensor(want))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_in_the_window(
    sample,
):
    # The last 4 characters are "bbcc": "a" is outside the window.
    rows = _row("aabbbcc", repetition_penalty=2.0, penalty_last_n=4)
    logits = [0.0, 0.0, 1.0, 1.0, -1.0, 0.5, 0.0]
    want = [0.0, 0.0, 1.0, 0.5, -2.0, 0.5, 0.0]
    assert rows.adjusted(torch.tensor([logits]))[0].tolist() == want
    _close(_frequencies(sample, logits, rows), _softmax(want))


def test_presence_and_frequency_penalties_count_the_window(sample):
    rows = _row("abbccc", presence_penalty=0.25, frequency_penalty=0.5)
    want = list(LOGITS)
    for char, count in (("a", 1), ("b", 2), ("c", 3)):
        want[ENCODE(char)[0]] -= count * 0.5 + 0.25
    torch.testing.assert_close(rows.adjusted(torch.tensor([LOGITS]))[0], torch.tensor(want))
    _close(_frequencies(sample, LOGITS, rows), _softmax(want))
    # Only the last two characters count; 0 turns the penalties off.
    short = _row("cccab", presence_penalty=1.0, penalty_last_n=2)
    got = short.adjusted(torch.tensor([LOGITS]))[0].tolist()
    assert got == [v - (i in (2, 3)) for i, v in enumerate(torch.tensor(LOGITS).tolist())]
    off = _row("cccab", presence_penalty=1.0, penalty_last_n=0)
    assert off.limits[0, FLAGS] == 0


def test_the_penalty_window_moves_with_the_generated_text():
    """As characters are drawn the window slides: the oldest leaves the counts."""
    rows = _row("ab", frequency_penalty=1.0, penalty_last_n=3)
    rows.record([4])  # "abc"
    rows.record([4])  # "bcc": "a" left the window
    assert rows.counts[0].tolist() == [0, 0, 0, 1, 2, 0, 0]
    # A prime shorter than the window counts whole.
    whole = _row("aabbbcc", frequency_penalty=1.0, penalty_last_n=10)
    assert whole.counts[0].tolist() == [0, 0, 2, 3, 2, 0, 0]
    assert whole.history[0, :7].tolist() == ENCODE("aabbbcc")


def _dry(prime: str, **kwargs) -> ControlsBatch:
    return _row(prime, dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2, **kwargs)


def test_dry_penalises_the_character_that_would_extend_a_repeat(sample):
    """In "abcdeabcd" the suffix "abcd" occurred before, followed by "e": drawing "e" would
    make the repeat 5 long. It loses multiplier * base^(4 - allowed) = 2^2."""
    rows = _dry("abcdeabcd")
    assert rows.repeats(0) == {6: 4}
    want = list(LOGITS)
    want[6] -= 4.0
    assert rows.adjusted(torch.tensor([LOGITS]))[0].tolist() == pytest.approx(want)
    _close(_frequencies(sample, LOGITS, rows), _softmax(want))
    # The exponent grows with the repeat: allowed 1 gives 2^3.
    longer = _row("abcdeabcd", dry_multiplier=0.5, dry_base=2.0, dry_allowed_length=1)
    got = longer.adjusted(torch.tensor([LOGITS]))[0]
    assert got[6].item() == pytest.approx(LOGITS[6] - 0.5 * 2**3)
    # And a longer repeat costs more: "deabcd" after "deabcd" (allowed 2: 2^(6 - 2)).
    assert _dry("deabcdeabcd").repeats(0) == {6: 6}


def test_dry_repeats_stop_at_sequence_breakers():
    text = "abcdeabcd"
    assert _dry(text, dry_sequence_breakers=("\n",)).repeats(0) == {6: 4}
    # "c" ended one character ago: no repeat of 2 can avoid it.
    assert _dry(text, dry_sequence_breakers=("c",)).repeats(0) == {}
    assert _dry(text, dry_sequence_breakers=("bc",)).repeats(0) == {}
    # "ea" ended 3 characters ago: the repeat is cut to "bcd" (2^1).
    cut = _dry(text, dry_sequence_breakers=("ea",))
    assert cut.repeats(0) == {6: 3}
    assert cut.adjusted(torch.zeros(1, V))[0, 6].item() == -2.0
    # A one-character breaker is never penalised itself ("e" here).
    assert _dry(text, dry_sequence_breakers=("e",)).repeats(0) == {}
    # No breakers at all: the same as one that never occurs.
    assert _dry(text, dry_sequence_breakers=()).repeats(0) == {6: 4}


def test_dry_looks_only_at_its_window():
    assert _dry("abcdeabcd", dry_penalty_last_n=9).repeats(0) == {6: 4}
    # The last 6 are "deabcd": "d" repeats, but only 1 long.
    assert _dry("abcdeabcd", dry_penalty_last_n=6).repeats(0) == {}
    assert _dry("abcdeabcd", dry_penalty_last_n=0).limits[0, FLAGS] == 0


def test_dry_keeps_long_repeats_finite(sample):
    """A repeat hundreds long: the exponent stops at llama.cpp's bound and the penalty at
    float32's largest, so the character is out and the others still sample normally."""
    rows = _row("ab" * 150, dry_multiplier=10.0, dry_base=4.0, dry_allowed_length=1)
    assert rows.repeats(0) == {2: 298}
    x = rows.adjusted(torch.tensor([LOGITS]))[0]
    assert torch.isfinite(x).all() and x[2] < -1e38
    want = list(LOGITS)
    want[2] = -math.inf
    # (Fewer draws: the reference finds the 298-long repeat again for each.)
    _close(_frequencies(sample, LOGITS, rows, n=1500), _softmax(want), atol=0.04)


def _llama_dry(text: list[int], singles: set[int], allowed: int, last_n: int) -> dict[int, int]:
    """llama.cpp's DRY (llama_sampler_dry_apply) with one-character breakers, directly: the
    repeat limit is the distance to the nearest breaker in the window."""
    w = text[-last_n:]
    n = len(w)
    limit = next((i for i in range(n) if w[n - 1 - i] in singles), n)
    out: dict[int, int] = {}
    for end in range(n - 1):
        length = 0
        while length <= end and w[end - length] == w[n - 1 - length]:
            length += 1
        length = min(length, limit)
        if length >= allowed and w[end + 1] not in singles:
            out[w[end + 1]] = max(out.get(w[end + 1], 0), length)
    return out


def test_dry_follows_llama_cpp_as_the_text_grows():
    """The state ``record`` keeps (history, matches, the breakers' automaton) gives llama.cpp's
    repeats at every step, whatever the window and however often the history is compacted."""
    rng = random.Random(9)
    for trial in range(30):
        breakers = rng.choice([("\n",), (" ", "a"), ()])
        allowed, last_n = rng.choice([1, 2, 3]), rng.choice([4, 9, 30])
        text = [rng.choice([0, 1, 2, 2, 3, 3]) for _ in range(rng.randrange(0, 20))]
        rows = ControlsBatch.of(
            Controls(
                dry_multiplier=1.0,
                dry_allowed_length=allowed,
                dry_penalty_last_n=last_n,
                dry_sequence_breakers=breakers,
            ),
            V,
            text,
            ENCODE,
        )
        singles = {ENCODE(b)[0] for b in breakers}
        for _ in range(60):
            assert rows.repeats(0) == _llama_dry(text, singles, allowed, last_n), trial
            c = rng.choice([0, 1, 2, 2, 3, 3])
            rows.record([c])
            text.append(c)


def test_suffix_matches_are_the_longest_common_suffixes():
    rng = random.Random(0)
    for _ in range(200):
        text = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
        got = _suffix_matches(text)
        for j in range(len(text) - 1):
            n = 0
            while n <= j and text[j - n] == text[-1 - n]:
                n += 1
            assert got[j] == n
        assert got[-1] == 0


def test_min_p_keeps_characters_with_a_share_of_the_likeliest(sample):
    logits = np.log([0.4, 0.3, 0.15, 0.1, 0.05, 1e-9, 1e-9]).tolist()
    rows = _row(min_p=0.3)  # at least 0.12
    want = _softmax(logits[:3] + [-math.inf] * 4)
    _close(_frequencies(sample, logits, rows), want)
    # After temperature: at T = 0.5 the shares are squared.
    flat = _frequencies(sample, logits, _row(min_p=0.3), temperature=0.5)
    _close(flat, _softmax(logits[:2] + [-math.inf] * 5, temperature=0.5))


# probabilities 0.4, 0.2, 0.2, 0.2: entropy 1.33 nats; -log 0.2 = 1.61 is closer to it than
# -log 0.4 = 0.92, so the likeliest character is the least typical.
TYPICAL = np.log([1e-12, 0.4, 0.2, 0.2, 0.2, 1e-12, 1e-12]).tolist()


def test_typical_p_keeps_the_characters_closest_to_the_entropy(sample):
    want = _softmax([-math.inf, -math.inf, 0.0, 0.0, 0.0, -math.inf, -math.inf])
    _close(_frequencies(sample, TYPICAL, _row(typical_p=0.5)), want)
    # 0.7 takes the three (0.6) and the one that crosses it: everything of any mass.
    _close(_frequencies(sample, TYPICAL, _row(typical_p=0.7)), _softmax(TYPICAL))


def test_the_controls_apply_in_their_order(sample):
    # Bias before the repetition penalty: -1 + 2 = 1 is then positive, so divided: 0.5.
    rows = _row("a", logit_bias=((2, 2.0),), repetition_penalty=2.0)
    assert rows.adjusted(torch.tensor([[0.0, 0, -1, 0, 0, 0, 0]]))[0, 2].item() == 0.5
    # Penalties before DRY: 2 / 2 - 2^0, not (2 - 1) / 2.
    both = _dry("abcdeabcd", repetition_penalty=2.0)
    assert both.adjusted(torch.full((1, V), 2.0))[0, 6].item() == 1.0 - 4.0
    # Temperature after the controls: it divides the biased logits.
    _close(
        _frequencies(sample, LOGITS, _row(logit_bias=((0, 1.0),)), temperature=0.5),
        _softmax([LOGITS[0] + 1.0, *LOGITS[1:]], temperature=0.5),
    )
    # top-k before typical-p: of the top 2 (2/3, 1/3) the likeliest is the typical one.
    only = torch.zeros(V + 1, dtype=torch.float64)
    only[1] = 1.0
    _close(_frequencies(sample, TYPICAL, _row(typical_p=0.5), top_k=2), only)
    # typical-p before top-p: the nucleus of the three typical characters (1/3 each) for 0.5
    # is two of them, not the likeliest overall.
    two = torch.zeros(V + 1, dtype=torch.float64)
    two[[2, 3]] = 0.5
    _close(_frequencies(sample, TYPICAL, _row(typical_p=0.5), top_p=0.5), two)
    # min-p after them, relative to the likeliest kept character (not the one typical-p
    # removed): 0.6 of 0.2 keeps all three typical ones.
    three = _softmax([-math.inf, -math.inf, 0.0, 0.0, 0.0, -math.inf, -math.inf])
    _close(_frequencies(sample, TYPICAL, _row(typical_p=0.5, min_p=0.6)), three)


def test_a_banned_character_leaves_the_distribution(sample):
    """Renormalised away, unlike a mask's forbidden characters: no "end"."""
    rows = _row("ba", banned_strings=("ab", "e", "zz"))
    assert rows.forbidden()[0].tolist() == [False, False, False, True, False, False, True]
    want = list(LOGITS)
    want[3] = want[6] = -math.inf
    _close(_frequencies(sample, LOGITS, rows), _softmax(want))


def test_every_character_banned_ends_the_row(sample):
    everything = tuple(VOCAB.chars)
    u = torch.zeros(3, dtype=torch.float64)
    args = torch.ones(3), torch.full((3,), V), torch.ones(3), u
    rows = _row(banned_strings=everything).repeat(3)
    assert sample(torch.randn(3, V), *args, None, rows).tolist() == [V, V, V]
    # A ban that began in the prime: after "a", "a?" is banned for every "?".
    after = _row("ba", banned_strings=tuple("a" + c for c in VOCAB.chars)).repeat(3)
    assert sample(torch.randn(3, V), *args, None, after).tolist() == [V, V, V]
    # With a mask too: "end", as a mask that allows nothing.
    mask = pack_mask(torch.ones(3, V + 1, dtype=torch.bool))
    rows = _row(banned_strings=everything).repeat(3)
    assert sample(torch.randn(3, V), *args, mask, rows).tolist() == [V, V, V]


def test_a_ban_with_a_mask_gives_end_only_the_masks_forbidden_mass(sample):
    """The mask's forbidden characters' mass goes to "end"; banned ones leave altogether."""
    allowed = torch.tensor([True, True, True, False, False, True, True, True])  # 3, 4 -> end
    rows = _row(banned_strings=("d", "c"))  # 5 and 4 banned
    n = 10000
    x = torch.tensor([LOGITS]).expand(n, V).contiguous()
    u = torch.from_numpy(uniforms(np.zeros(n, np.uint64), np.arange(n, dtype=np.uint64)))
    args = torch.ones(n), torch.full((n,), V), torch.ones(n), u
    ids = sample(x, *args, pack_mask(allowed.expand(n, -1)), rows.repeat(n))
    freq = torch.bincount(ids, minlength=V + 1).double() / n
    outcomes = torch.tensor(LOGITS, dtype=torch.float64)
    end = outcomes[3].clone()  # the mask forbids 3 and 4; 4 is banned: only 3's mass ends
    outcomes[[3, 4, 5]] = -math.inf
    _close(freq, torch.softmax(torch.cat([outcomes, end[None]]), 0))


def test_strings_the_vocabulary_cannot_spell_are_dropped():
    rows = _row("ab", banned_strings=("xyz", "aQ"), dry_multiplier=1.0)
    assert rows.bans == [None] and rows.limits[0, FLAGS] & 8 == 0
    assert _row(banned_strings=("Z", "c")).forbidden()[0].nonzero().flatten().tolist() == [4]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _row(logit_bias=((V, 1.0),))


def test_default_controls_have_no_flags_and_take_the_plain_path():
    assert _row("abc").limits[0, FLAGS] == 0
    assert _row("abc", penalty_last_n=5, dry_base=3.0, dry_penalty_last_n=7).limits[0, 0] == 0


def _random_controls(rng: random.Random) -> Controls:
    return Controls(
        logit_bias=tuple((rng.randrange(V), rng.uniform(-5, 5)) for _ in range(rng.randrange(3))),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5, -1.0]),
        frequency_penalty=rng.choice([0.0, 0.3]),
        penalty_last_n=rng.choice([0, 5, 64]),
        dry_multiplier=rng.choice([0.0, 0.8, 2.0]),
        dry_base=rng.choice([1.75, 3.0]),
        dry_allowed_length=rng.choice([1, 2, 3]),
        dry_sequence_breakers=rng.choice([("\n",), ("ab", "c"), ()]),
        dry_penalty_last_n=rng.choice([0, 8, 1024]),
        banned_strings=rng.choice([(), ("ab",), ("a", "b", "cd"), ("abc", "cb", " ")]),
        min_p=rng.choice([0.0, 0.05, 0.3]),
        typical_p=rng.choice([1.0, 0.9, 0.5]),
    )


def _random_batch(rng: random.Random, n: int) -> ControlsBatch:
    rows = []
    for _ in range(n):
        prime = "".join(rng.choice("ab c\nd") for _ in range(rng.randrange(0, 40)))
        rows.append(ControlsBatch.of(_random_controls(rng), V, ENCODE(prime), ENCODE))
    return ControlsBatch.concat(rows)


def _same_state(a: ControlsBatch, b: ControlsBatch) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))


@needs_native
def test_native_sampler_agrees_with_the_reference_and_moves_the_state_as_record():
    """Hundreds of rows with every kind of control, step after step: the same ids (but where
    a draw lies within float rounding of an edge, as without controls) and the same state
    after the native op as after ``ControlsBatch.record``. Every other step through a mask
    that forbids characters in a third of the rows."""
    batch = _random_batch(random.Random(0), 300)
    g = torch.Generator().manual_seed(1)
    n, differ, ended = len(batch), 0, 0
    for step in range(24):
        logits = torch.randn(n, V, generator=g) * 3
        t = torch.rand(n, generator=g) + 0.3
        k = torch.randint(1, V + 2, (n,), generator=g)
        p = torch.rand(n, generator=g) * 0.9 + 0.1
        p[::3] = 1.0
        u = torch.rand(n, generator=g, dtype=torch.float64)
        mask = None
        if step % 2:
            allowed = torch.rand(n, V + 1, generator=g) < 0.7
            allowed[n // 3 :] = True
            mask = pack_mask(allowed)
        copy = batch.select(range(n))
        want = sample_next(logits, t, k, p, u, mask, batch)
        got = _native(logits, t, k, p, u, mask, copy)
        rows = (want != got).nonzero().flatten().tolist()
        for i in rows:
            # At an edge: a hair either way of the draw gives each of the two.
            row = (logits[i : i + 1], t[i : i + 1], k[i : i + 1], p[i : i + 1])
            near = {
                int(
                    sample_next(
                        *row,
                        (u[i : i + 1] + d).clamp(0, 1 - 2**-53),
                        None if mask is None else mask[i : i + 1],
                        batch.select([i]),
                    )
                )
                for d in (-1e-5, 1e-5)
            }
            assert near == {int(want[i]), int(got[i])}
        batch.record(want)
        ended += int((want == V).sum())
        same = [b for b in range(n) if b not in rows]
        assert _same_state(batch.select(same), copy.select(same))
        differ += len(rows)
    assert differ <= 2
    assert ended > 100  # "end" came up: masked rows, and rows whose bans left nothing


def test_rows_sample_alike_alone_and_in_a_mixed_batch(sample):
    """Rows without controls, with them, with a mask, with both and with default controls:
    each draws in a batch exactly what it draws alone."""
    rng = random.Random(3)
    kinds = [
        ControlsBatch.plain(1, V),
        ControlsBatch.of(_random_controls(rng), V, ENCODE("abab c"), ENCODE),
        ControlsBatch.of(Controls(banned_strings=("ab", "d"), typical_p=0.8), V, [2], ENCODE),
        ControlsBatch.of(Controls(), V, ENCODE("abc"), ENCODE),
        ControlsBatch.of(Controls(presence_penalty=1.5, min_p=0.2), V, ENCODE("ccc"), ENCODE),
    ]
    g = torch.Generator().manual_seed(2)
    for trial in range(40):
        picks = [rng.randrange(len(kinds)) for _ in range(8)]
        masked = [rng.random() < 0.4 for _ in picks]
        allowed = torch.rand(8, V + 1, generator=g) < 0.6
        allowed[[not m for m in masked]] = True
        mask = pack_mask(allowed)
        logits = torch.randn(8, V, generator=g) * 2
        t, k, p = torch.rand(8, generator=g) + 0.5, torch.randint(1, V + 1, (8,)), torch.ones(8)
        u = torch.rand(8, generator=g, dtype=torch.float64)
        rows = ControlsBatch.concat([kinds[i] for i in picks])
        together = sample(logits, t, k, p, u, mask, rows)
        for b in range(8):
            s = slice(b, b + 1)
            alone = sample(logits[s], t[s], k[s], p[s], u[s], mask[s], kinds[picks[b]].select([0]))
            assert alone.item() == together[b].item(), (trial, b)
            if not masked[b]:
                plain = sample(logits[s], t[s], k[s], p[s], u[s])
                if picks[b] in (0, 3):  # no controls, or the defaults: bit for bit
                    assert plain.item() == together[b].item()


def test_default_controls_sample_bit_for_bit_as_none(sample):
    g = torch.Generator().manual_seed(4)
    n = 3000
    logits = torch.randn(n, V, generator=g) * 4
    t, k = torch.rand(n, generator=g) * 1.5 + 0.2, torch.randint(1, V + 3, (n,), generator=g)
    p = torch.rand(n, generator=g) * 0.9 + 0.1
    p[::3] = 1.0
    u = torch.rand(n, generator=g, dtype=torch.float64)
    plain = sample(logits, t, k, p, u)
    default = _row("abcabc").repeat(n)
    assert torch.equal(sample(logits, t, k, p, u, None, default), plain)
    # Next to rows with every control (typical-p and min-p included) too.
    mixed = ControlsBatch.concat(
        [default.select(range(n - 50)), _random_batch(random.Random(5), 50)]
    )
    assert torch.equal(sample(logits, t, k, p, u, None, mixed)[: n - 50], plain[: n - 50])


def test_select_concat_and_repeat_keep_each_rows_state():
    rng = random.Random(7)
    a, b = _random_batch(rng, 5), _random_batch(rng, 4)
    ab = ControlsBatch.concat([a, b])
    ids = [rng.randrange(V) for _ in range(9)]
    ab.record(ids)
    a.record(ids[:5])
    b.record(ids[5:])
    assert _same_state(ab.select(range(5)), a)
    assert _same_state(ab.select(range(5, 9)), b)
    # The copies of one prime's row share its automaton; each has a state of its own.
    one = _row("ab", banned_strings=("abc", "ca"))
    many = one.repeat(4)
    assert len(many.nodes) == len(one.nodes) and many.bans[0] is many.bans[3]
    many.record([4, 0, 0, 0])  # "abc" for the first, "ab\n" for the others
    bans = one.bans[0]
    start = int(one.cursor[0, BAN_STATE])
    assert many.cursor[:, BAN_STATE].tolist() == [bans.next(start, 4)] + [bans.next(start, 0)] * 3
    assert int(one.cursor[0, BAN_STATE]) == start  # the original is untouched
    assert many.forbidden()[0].nonzero().flatten().tolist() == [2]  # "ca" after "c"
    assert len(ControlsBatch.plain(0, V)) == 0 and len(many.select([])) == 0


# --- Decoding: a tiny model.


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, Vocabulary]:
    """A tiny LSTM fitted for a second on the test text: it writes its frequent strings."""
    text = make_text(4000)
    vocab = Vocabulary.from_text(text)
    return fit_tiny(text, vocab, hidden=48, lr=0.02, steps=120)[0], vocab


BANNED = ("the", "e ", "at")
PRIMES = ("Alice said th", "The white rabbit and the queen at", "Cake", "She was very littl")


def _ends_inside(prime: str, text: str, banned: str) -> bool:
    """Whether ``banned`` ends somewhere in ``text`` (it may start in ``prime``)."""
    whole = prime + text
    return any(
        whole.startswith(banned, i) and i + len(banned) > len(prime)
        for i in range(len(whole) - len(banned) + 1)
    )


@pytest.mark.parametrize("native_kernels", [True, False])
def test_banned_strings_never_end_in_generated_text(trained, native_kernels):
    """320 seeded generations (80 per prime, some primes ending in a banned string's start)
    with bans on the model's most frequent strings: none ends inside the text, while without
    the bans they are everywhere."""
    model, vocab = trained
    if native_kernels and not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    decoder = StepDecoder(model, "int8", native_kernels=native_kernels)
    controls = Controls(banned_strings=BANNED)
    per_prime = 80 if native_kernels else 10
    length = 60
    with torch.inference_mode():
        banned_texts, free_texts = [], []
        for prime in PRIMES:
            seeds = range(per_prime)
            banned_texts += [
                (prime, t) for t in generations(decoder, vocab, prime, seeds, length, controls)
            ]
            free_texts += [
                (prime, t) for t in generations(decoder, vocab, prime, seeds, length, None)
            ]
    assert len(banned_texts) == per_prime * len(PRIMES)
    for prime, text in banned_texts:
        for s in BANNED:
            assert not _ends_inside(prime, text, s), (prime, text, s)
    # The bans bite: without them the model writes these strings, and would right after
    # the primes that end in their starts.
    for s in BANNED:
        assert sum(_ends_inside(p, t, s) for p, t in free_texts) > len(free_texts) // 4, s
    assert sum(t.startswith("e") for p, t in free_texts if p.endswith("th")) > 0
    # The banned texts still run their length (the model has other ways to go on).
    assert np.mean([len(t) for _, t in banned_texts]) > length * 0.9


@needs_native
def test_multi_step_decode_with_controls_equals_one_step_at_a_time(trained):
    """The same ids and the same final state from one native call of many steps, calls of a
    few, and one ``sample`` + ``step`` per character."""
    model, vocab = trained
    decoder = StepDecoder(model, "int8")
    rng = random.Random(11)
    primes = ["Alice said the queen", "the rabbit\n", "tea tea tea tea time", "a"]
    controls = [
        Controls(),
        Controls(presence_penalty=0.8, frequency_penalty=0.4, penalty_last_n=10),
        Controls(dry_multiplier=1.5, dry_allowed_length=2, dry_penalty_last_n=30),
        Controls(banned_strings=("the", "e ", " a"), min_p=0.1),
        Controls(repetition_penalty=1.5, typical_p=0.7, logit_bias=((3, 2.0),)),
        Controls(dry_multiplier=0.8, dry_sequence_breakers=(" ", "th"), typical_p=0.9),
    ]
    with torch.inference_mode():
        starts, rows, params = [], [], []
        for i in range(12):
            prime = rng.choice(primes)
            ids = vocab.encode(prime)
            starts.append(decoder.prime(torch.tensor(ids)))
            rows.append(
                ControlsBatch.of(controls[i % len(controls)], len(vocab), ids, vocab.encode)
            )
            params.append(
                SamplingParams(
                    rng.choice([0.7, 1.0, 1.3]), rng.choice([None, 5]), rng.choice([1.0, 0.9]), i
                )
            )
        logits = torch.cat([lg for lg, _ in starts])
        state = tuple(torch.cat([st[j] for _, st in starts], 1) for j in range(2))
        sampling = SamplingBatch.of(params, len(vocab), logits.device)
        n, steps = len(rows), 40
        one_call = ControlsBatch.concat(rows)
        ids_one, logits_one, _ = decoder.decode_batch(
            logits, state, sampling, np.zeros(n, np.uint64), steps, controls=one_call
        )
        in_parts = ControlsBatch.concat(rows)
        parts, lg, st, at = [], logits, state, np.zeros(n, np.uint64)
        for size in (7, 1, 20, 12):
            out, lg, st = decoder.decode_batch(lg, st, sampling, at, size, controls=in_parts)
            parts.append(out)
            at = at + size
        stepwise = ControlsBatch.concat(rows)
        singles, lg2, st2 = [], logits, state
        for pos in range(steps):
            u = sampling.uniforms(np.full(n, pos, np.uint64), logits.device)
            nxt, lg2, st2 = decoder.sample_and_step(lg2, st2, sampling, u, controls=stepwise)
            singles.append(nxt)
    assert torch.equal(ids_one, torch.cat(parts)) and torch.equal(ids_one, torch.stack(singles))
    assert torch.equal(logits_one, lg) and torch.equal(logits_one, lg2)
    assert _same_state(one_call, in_parts) and _same_state(one_call, stepwise)
    # The controls did something: the rows with them differ from a decode without them.
    plain, _, _ = decoder.decode_batch(logits, state, sampling, np.zeros(n, np.uint64), steps)
    assert torch.equal(plain[:, 0], ids_one[:, 0])  # Controls(): bit for bit
    assert sum(not torch.equal(plain[:, b], ids_one[:, b]) for b in range(n)) >= 8


@needs_native
def test_a_fully_banned_step_ends_the_row_in_a_decode(trained):
    """After "a", every character would end a banned string: the row draws "end" (V) and the
    network reads character 0; ``generate`` stops there."""
    model, vocab = trained
    decoder = StepDecoder(model, "int8")
    controls = Controls(banned_strings=tuple("a" + c for c in vocab.chars))
    prime_ids = vocab.encode("tea")
    with torch.inference_mode():
        logits, state = decoder.prime(torch.tensor(prime_ids))
        sampling = SamplingBatch.of([SamplingParams(seed=1)], len(vocab), logits.device)
        rows = ControlsBatch.of(controls, len(vocab), prime_ids, vocab.encode)
        ids, _, _ = decoder.decode_batch(
            logits, state, sampling, np.zeros(1, np.uint64), 3, controls=rows
        )
        assert ids[:, 0].tolist()[0] == len(vocab)
        assert generate(model, vocab, "tea", 50, SamplingParams(seed=1), decoder, controls) == ""
        # Banned in a text: "e" can never follow "t" once the text goes on from there.
        text = generate(
            model,
            vocab,
            "Alice",
            200,
            SamplingParams(seed=2),
            decoder,
            Controls(banned_strings=("te",)),
        )
        assert not _ends_inside("Alice", text, "te") and len(text) == 200


def test_generate_with_controls_is_the_same_on_both_decoders(trained):
    """The eager decoder honours the controls through the reference: the same texts."""
    model, vocab = trained
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    fast, slow = StepDecoder(model, "int8"), StepDecoder(model, "int8", native_kernels=False)
    controls = Controls(
        presence_penalty=0.5, dry_multiplier=1.0, banned_strings=("the", "e "), min_p=0.05
    )
    for seed in range(3):
        params = SamplingParams(0.9, None, 0.95, seed)
        a = generate(model, vocab, "The queen", 80, params, fast, controls)
        b = generate(model, vocab, "The queen", 80, params, slow, controls)
        assert a == b and len(a) == 80


@needs_native
def test_native_ops_refuse_bad_controls():
    logits, t, k, p = torch.zeros(2, V), torch.ones(2), torch.full((2,), V), torch.ones(2)
    u = torch.zeros(2, dtype=torch.float64)
    good = _row("ab", presence_penalty=1.0).repeat(2).tensors
    with pytest.raises(RuntimeError, match="a ControlsBatch's 13 tensors"):
        torch.ops.charrnn.sample(logits, t, k, p, u, None, good[:9])
    bad = list(good)
    bad[10] = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="the index text must be its suffix array's"):
        torch.ops.charrnn.sample(logits, t, k, p, u, None, bad)
    bad = list(good)
    bad[3] = bad[3].long()
    with pytest.raises(RuntimeError, match="controls: counts must be a contiguous Int"):
        torch.ops.charrnn.sample(logits, t, k, p, u, None, bad)
    bad = list(good)
    bad[0] = bad[0][:, :3]
    with pytest.raises(RuntimeError, match=r"controls: bias must be a contiguous Float CPU"):
        torch.ops.charrnn.sample(logits, t, k, p, u, None, bad)
