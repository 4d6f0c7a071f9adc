"""The copy guard (charrnn/controls.py with charrnn/textindex.py): ``max_copy_chars`` and
``novel_lines`` against brute force on texts built here, the native sampler against the
reference, and real generations of tiny models that like to copy their training text."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from app.runner.stage import _allow_all
from charrnn import Vocabulary, native
from charrnn.controls import COPY_LEN, LINE_LEN, Controls, ControlsBatch
from charrnn.decode import StepDecoder
from charrnn.sampling import sample_next
from charrnn.textindex import TextIndex, line_key
from tests.conftest import fit_tiny, generations, make_text, pack_mask

needs_native = pytest.mark.skipif(
    not native.load(), reason="the native kernels are not available here (no C++ compiler)"
)

# A small alphabet: runs of 4 to 6 characters of a random text recur everywhere, so the
# guard bites at most steps.
SMALL = Vocabulary("\nabcd")
SMALL_TEXT = "".join(random.Random(0).choices("abcd\n", k=3000))


@pytest.fixture(scope="module")
def small_index() -> TextIndex:
    return TextIndex.build(SMALL_TEXT, SMALL)


def _row(index: TextIndex, **kwargs) -> ControlsBatch:
    vocab = index.vocab
    return ControlsBatch.of(Controls(**kwargs), len(vocab), [], vocab.encode, index)


def _copies(text: str, corpus: str, most: int) -> bool:
    """Whether a run of more than ``most`` characters of ``text`` occurs in ``corpus``."""
    return any(text[i : i + most + 1] in corpus for i in range(len(text) - most))


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def test_line_keys_are_the_keys_of_the_texts_lines(small_index):
    want = {line_key(SMALL.encode(line)) for line in _lines(SMALL_TEXT)}
    assert {int(k) for k in small_index.line_keys} == want
    assert all(small_index.is_line_key(k) for k in want)
    assert not small_index.is_line_key(line_key(SMALL.encode("abcdabcdabcdabcd")))


@pytest.mark.parametrize("most", [4, 5, 7])
def test_max_copy_chars_forbids_exactly_what_would_copy_a_longer_run(small_index, most):
    """After each character of a random text, the guard forbids exactly the characters c for
    which the last ``most`` generated characters and c occur in the training text."""
    rng = random.Random(most)
    rows = _row(small_index, max_copy_chars=most)
    text, at = "", 0
    bites = 0
    for _ in range(400):
        forbid, end = rows.guard()  # type: ignore[misc]
        want = [
            len(text) >= most and (text[len(text) - most :] + c) in SMALL_TEXT for c in SMALL.chars
        ]
        assert forbid[0].tolist() == want, text
        assert end.tolist() == [True]
        bites += any(want)
        allowed = [c for c, f in zip(SMALL.chars, want, strict=True) if not f]
        # Copy the training text from somewhere for as long as the guard lets it.
        c = SMALL_TEXT[at % len(SMALL_TEXT)]
        if c not in allowed:
            c, at = rng.choice(allowed or SMALL.chars), rng.randrange(len(SMALL_TEXT) - 1)
        at += 1
        text += c
        rows.record(SMALL.encode(c))
    assert bites > 40
    assert int(rows.cursor[0, COPY_LEN]) <= most


def test_novel_lines_forbids_closing_or_ending_on_a_training_line():
    vocab = Vocabulary("\nabn")
    index = TextIndex.build("ab\nban\nn\nbanana", vocab)
    rows = _row(index, novel_lines=True, length=6)
    newline, end_id = vocab.encode("\n")[0], len(vocab)

    def forbidden() -> tuple[set[str], bool]:
        forbid, end = rows.guard()  # type: ignore[misc]
        return {vocab.chars[j] for j in forbid[0].nonzero().flatten().tolist()}, bool(end[0])

    assert forbidden() == (set(), True)
    rows.record(vocab.encode("a"))  # "a": not a line
    assert forbidden() == (set(), True)
    rows.record(vocab.encode("b"))  # "ab" is a line: no newline, no "end" here
    assert forbidden() == ({"\n"}, False)
    rows.record(vocab.encode("a"))  # "aba" is not
    assert forbidden() == (set(), True)
    rows.record([newline])
    assert int(rows.cursor[0, LINE_LEN]) == 0
    rows.record(vocab.encode("n"))  # "n" is a line (4 characters so far: 2 left)
    assert forbidden() == ({"\n"}, False)
    rows.record(vocab.encode("b"))  # the last character must not make "nb?" a line: none is
    assert forbidden() == (set(), True)
    rows = _row(index, novel_lines=True, length=3)
    for c in vocab.encode("ba"):  # last step: "ban" is a line, so "n" is forbidden
        rows.record([c])
    assert forbidden() == ({"n"}, True)
    assert end_id == 4


def _random_guarded(rng: random.Random, index: TextIndex) -> Controls:
    return Controls(
        presence_penalty=rng.choice([0.0, 0.5]),
        banned_strings=rng.choice([(), ("ab",), ("d\n",)]),
        max_copy_chars=rng.choice([None, 4, 5, 6]),
        novel_lines=rng.random() < 0.5,
        length=rng.randrange(1, 30),
        typical_p=rng.choice([1.0, 0.9]),
    )


@needs_native
def test_the_native_guard_agrees_with_the_reference(small_index):
    """Hundreds of rows with the guard among other controls, step after step: the same ids as
    the reference sampler and the same state as ``record`` leaves. Every other step through a
    constraint's mask in a third of the rows (one that may allow "end"), and the rest with
    the mask of a row without a constraint in a masked batch (every character, not "end")."""
    rng = random.Random(1)
    vocab, n = SMALL, 200
    rows = []
    for _ in range(n):
        c = _random_guarded(rng, small_index)
        if not c.guarded:
            c = Controls(max_copy_chars=4, length=c.length)
        rows.append(ControlsBatch.of(c, len(vocab), [], vocab.encode, small_index))
    batch = ControlsBatch.concat(rows)
    g = torch.Generator().manual_seed(1)
    ones = torch.ones(n)
    ended = masked = 0
    for step in range(40):
        forbid, _end = batch.guard()  # type: ignore[misc]
        masked += int(forbid.any(-1).sum())
        logits = torch.randn(n, len(vocab), generator=g)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        k = torch.full((n,), len(vocab))
        mask = None
        if step % 2:
            allowed = torch.rand(n, len(vocab) + 1, generator=g) < 0.8
            allowed[n // 3 :] = True
            allowed[n // 3 :, len(vocab)] = False
            mask = pack_mask(allowed)
        copy = batch.select(range(n))
        want = sample_next(logits, ones, k, ones, u, mask, batch)
        got = torch.ops.charrnn.sample(logits, ones, k, ones, u, mask, copy.tensors)
        assert torch.equal(want, got)
        batch.record(want)
        assert all(torch.equal(a, b) for a, b in zip(batch.tensors, copy.tensors, strict=True))
        ended += int((want == len(vocab)).sum())
    assert masked > 500 and ended > 0


# --- Real generations of tiny models.


@pytest.fixture(scope="module")
def copier() -> tuple[torch.nn.Module, Vocabulary, str, TextIndex]:
    """A tiny LSTM fitted hard on a short text: left alone it writes runs of it."""
    text = make_text(1500, seed=3)
    vocab = Vocabulary.from_text(text)
    model = fit_tiny(text, vocab, hidden=64, lr=0.02, steps=250)[0]
    return model, vocab, text, TextIndex.build(text, vocab)


@pytest.mark.parametrize("native_kernels", [True, False])
def test_no_generated_run_longer_than_max_copy_chars_occurs_in_the_training_text(
    copier, native_kernels
):
    """300 seeded generations (100 per prime, primes taken from the training text) with
    ``max_copy_chars: 8``: none holds a run of 9 characters of the training text, while
    without the guard most do."""
    model, vocab, text, index = copier
    if native_kernels and not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    decoder = StepDecoder(model, "int8", native_kernels=native_kernels)
    primes = [text[i : i + 30] for i in (0, 500, 1000)]
    per_prime = 100 if native_kernels else 8
    guard = Controls(max_copy_chars=8)
    with torch.inference_mode():
        guarded, free = [], []
        for prime in primes:
            seeds = range(per_prime)
            guarded += generations(decoder, vocab, prime, seeds, 80, guard, index, 0.8)
            free += generations(decoder, vocab, prime, seeds, 80, None, index, 0.8)
    assert len(guarded) == per_prime * 3
    for t in guarded:
        assert not _copies(t, text, 8), t
    assert sum(_copies(t, text, 8) for t in free) > len(free) // 2
    # The forbidden characters' mass leaves the row: a text ends early only where the guard
    # left no character at all.
    assert np.mean([len(t) for t in guarded]) > 75


NAMES = [
    "Alara", "Belwin", "Cedric", "Dorna", "Elowen", "Faramir", "Gwenna", "Halden", "Isolde",
    "Jorah", "Kaelin", "Lorien", "Maren", "Nerys", "Orin", "Perrin", "Quara", "Rowan", "Selene",
    "Tamsin", "Ulric", "Varda", "Wren", "Xander", "Yara", "Zorin",
]  # fmt: skip


@pytest.fixture(scope="module")
def namer() -> tuple[torch.nn.Module, Vocabulary, str, TextIndex]:
    """A tiny LSTM fitted on a list of names, one per line: it writes them back."""
    rng = random.Random(0)
    text = "\n".join(rng.choice(NAMES) for _ in range(600)) + "\n"
    vocab = Vocabulary.from_text(text)
    model = fit_tiny(text, vocab, hidden=64, lr=0.02, steps=250)[0]
    return model, vocab, text, TextIndex.build(text, vocab)


@pytest.mark.parametrize("length", [60, 6])
def test_novel_lines_never_returns_a_listed_name(namer, length):
    """Generations after a newline: with ``novel_lines`` no line (between newlines, the first
    from the start of the text, the last to its end) is a listed name, while without it most
    lines are. ``length`` 6 ends most texts inside a name: the last step keeps it new too."""
    model, vocab, _, index = namer
    decoder = StepDecoder(model, "int8")
    names = set(NAMES)
    guard = Controls(novel_lines=True, length=length)
    with torch.inference_mode():
        guarded = generations(decoder, vocab, "\n", range(150), length, guard, index, 0.8)
        free = generations(decoder, vocab, "\n", range(150), length, None, index, 0.8)
    for t in guarded:
        assert not names & set(t.split("\n")), t
    listed = [line in names for t in free for line in t.split("\n")]
    assert sum(listed) > len(listed) // 3
    assert np.mean([len(t) for t in guarded]) > length * 0.8


@pytest.mark.parametrize("native_kernels", [False, True])
def test_a_guarded_row_without_a_constraint_samples_alike_in_a_masked_batch(
    small_index, native_kernels
):
    """Beside a constrained row, a row without a constraint gets the runner's "no
    constraint" mask (``_allow_all``): its guard must still never turn the forbidden mass
    into "end", as without a mask."""
    if native_kernels and not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    n, v = 64, len(SMALL)
    rows = ControlsBatch.concat([_row(small_index, max_copy_chars=6) for _ in range(n)])
    for c in SMALL.encode(SMALL_TEXT[:6]):  # every row at its limit: the guard bites
        rows.record([c] * n)
    assert bool(rows.guard()[0].any(-1).all())  # type: ignore[index]
    g = torch.Generator().manual_seed(0)
    logits, ones = torch.randn(n, v, generator=g) * 3, torch.ones(n)
    k, u = torch.full((n,), v), torch.rand(n, generator=g, dtype=torch.float64)
    words = (v + 32) // 32
    unconstrained = _allow_all(n, words, v)

    def draw(mask: torch.Tensor | None) -> torch.Tensor:
        if native_kernels:
            copy = rows.select(range(n))
            return torch.ops.charrnn.sample(logits, ones, k, ones, u, mask, copy.tensors)
        return sample_next(logits, ones, k, ones, u, mask, rows)

    alone = draw(None)
    assert not bool((alone == v).any())  # no "end": something is always left here
    assert torch.equal(draw(unconstrained), alone)
