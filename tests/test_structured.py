"""Structured generation below the service: constraints, their compile, the masks and the
reference loop, on a tiny model trained here on a text with braces, quotes and digits."""

from __future__ import annotations

import json
import re
import string
import time

import jsonschema
import numpy as np
import pytest
import torch

from charrnn import CharRNN, SamplingParams, Vocabulary
from charrnn.controls import DEFAULT, Controls
from charrnn.decode import StepDecoder
from charrnn.generate import generate, run_prime
from charrnn.sampling import uniforms
from charrnn.structured import (
    MAX_CHOICES,
    Constraint,
    ConstraintError,
    Grammar,
    advance,
    allowed,
    cache,
    compile_constraint,
    fill_masks,
    generate_constrained,
    new_masks,
)
from charrnn.structured.compile import _LRU
from tests.conftest import WORDS, make_text, train_structured
from tests.constraint_examples import LIST_GRAMMAR, NAME, PERSON, TEMPLATE


@pytest.fixture(scope="module")
def trained() -> tuple[CharRNN, Vocabulary]:
    return train_structured()


def _compile(vocab: Vocabulary, spec: dict) -> Grammar:
    return compile_constraint(vocab, Constraint.parse(spec))


def _run(trained, spec: dict, seed: int, length: int = 120, prime: str = "The "):
    model, vocab = trained
    grammar = _compile(vocab, spec)
    return generate_constrained(model, vocab, prime, length, SamplingParams(seed=seed), grammar)


# Each kind really matches.


@pytest.mark.parametrize("pattern", [NAME, TEMPLATE, r"[a-z]+"])
def test_regex_output_is_a_full_match(trained, pattern):
    for seed in range(12):
        out = _run(trained, {"regex": pattern}, seed)
        assert out.matched and out.finish_reason == "stop", out
        assert re.fullmatch(pattern, out.text), out


@pytest.mark.parametrize(("pattern", "completion"), [(r"(a*)*b", "b"), (r"(a|a)*", "")])
def test_catastrophic_patterns_compile_fast_and_match(trained, pattern, completion):
    """Patterns that make a backtracking engine take exponential time: llguidance's lexer
    (derivatives of the regex, no backtracking) compiles them in a millisecond or two."""
    _, vocab = trained
    start = time.perf_counter()
    _compile(vocab, {"regex": pattern})
    assert time.perf_counter() - start < 0.25
    for seed in range(8):
        out = _run(trained, {"regex": pattern}, seed, length=30)
        if out.finish_reason == "stop":
            assert out.matched and re.fullmatch(pattern, out.text), out
        else:  # 30 a's: still the start of a match
            assert re.fullmatch(pattern, out.text + completion), out


def test_choice_output_is_one_of_them(trained):
    choices = ["yes", "no", "the queen", "alice"]
    texts = set()
    for seed in range(20):
        out = _run(trained, {"choice": choices}, seed)
        assert out.text in choices and out.matched and out.finish_reason == "stop"
        texts.add(out.text)
    assert len(texts) > 1  # a draw, not a constant


def test_json_schema_output_is_compact_valid_json(trained):
    for seed in range(12):
        out = _run(trained, {"json_schema": PERSON}, seed, length=200, prime="\n")
        assert out.matched and out.finish_reason == "stop", out
        value = json.loads(out.text)
        jsonschema.validate(value, PERSON)
        assert out.text == json.dumps(value, separators=(",", ":"))  # no whitespace


def test_any_object_schema_gives_an_object(trained):
    out = _run(trained, {"json_schema": {"type": "object"}}, 3, length=400, prime="\n")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    assert out.text.startswith("{")


def test_lark_grammar_output_is_a_sentence(trained):
    for seed in range(12):
        out = _run(trained, {"grammar": LIST_GRAMMAR}, seed, prime="\n")
        assert out.matched and out.finish_reason == "stop", out
        assert re.fullmatch(r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]", out.text), out


# How a constrained generation ends.


def test_a_complete_match_that_cannot_go_on_stops(trained):
    out = _run(trained, {"regex": "[a-z]{5}"}, 0, length=5)
    assert (out.finish_reason, out.matched, len(out.text)) == ("stop", True, 5)
    out = _run(trained, {"regex": "[a-z]{5}"}, 0, length=50)
    assert (out.finish_reason, out.matched, len(out.text)) == ("stop", True, 5)


def test_a_match_that_could_go_on_ends_by_a_draw(trained):
    lengths = set()
    for seed in range(30):
        out = _run(trained, {"regex": "[a-z]+"}, seed, length=40)
        if out.finish_reason == "stop":
            assert out.matched and 1 <= len(out.text) < 40
        lengths.add(len(out.text))
    assert len(lengths) >= 4


def test_max_length_too_short_is_length_and_unmatched(trained):
    out = _run(trained, {"regex": "[a-z]{10}"}, 0, length=4)
    assert (out.finish_reason, out.matched, len(out.text)) == ("length", False, 4)
    out = _run(trained, {"regex": "[a-z]{10}"}, 0, length=0)
    assert (out.finish_reason, out.matched, out.text) == ("length", False, "")


def test_nothing_in_the_vocabulary_to_continue_stops_unmatched(trained):
    """After "b" or "c" the match needs a "~" the model never saw: the row stops there, and
    the text is still the start of a match (llguidance sees every missing byte as a token)."""
    _, vocab = trained
    assert "~" not in vocab
    for seed in range(6):
        out = _run(trained, {"regex": "(b|c)~[a-z]*"}, seed)
        assert (out.finish_reason, out.matched) == ("stop", False)
        assert out.text in ("b", "c")


def test_the_same_request_gives_the_same_text(trained):
    first = _run(trained, {"regex": TEMPLATE}, 11)
    cache.clear()  # compiled again: the same grammar
    assert _run(trained, {"regex": TEMPLATE}, 11) == first
    assert _run(trained, {"regex": TEMPLATE}, 12) != first


# "End" is a real draw, with the model's mass on the characters that cannot continue.


def test_end_is_drawn_with_the_mass_of_the_forbidden_characters(trained):
    """Over a seed sweep of [a-z]+, the number of runs that ended by a draw matches the sum,
    over every draw where "end" was possible, of the model's mass on the characters outside
    a-z, computed here by the model's own forward pass (a martingale: the expected number of
    ends is that sum, whatever the runs' lengths)."""
    model, vocab = trained
    prime, length, runs = "She said ", 25, 300
    letters = torch.tensor(vocab.encode("abcdefghijklmnopqrstuvwxyz"))
    grammar = _compile(vocab, {"regex": "[a-z]+"})
    decoder = StepDecoder(model)
    ends, expected, variance, lengths = 0, 0.0, 0.0, []
    for seed in range(runs):
        params = SamplingParams(seed=seed)
        out = generate_constrained(model, vocab, prime, length, params, grammar, decoder)
        ends += out.finish_reason == "stop"
        lengths.append(len(out.text))
        with torch.no_grad():
            logits, _ = model(torch.tensor([vocab.encode(prime + out.text)]))
        probs = torch.softmax(logits[0].double(), -1)
        # The draw at position pos (pos characters generated) follows prime + text[:pos];
        # "end" is possible from pos 1 on, and the last draw is at min(len, length - 1).
        last = min(len(out.text), length - 1)
        at = torch.arange(1, last + 1) + len(prime) - 1
        q = 1 - probs[at][:, letters].sum(-1)
        expected += float(q.sum())
        variance += float((q * (1 - q)).sum())
    assert len(set(lengths)) >= 6
    assert ends > 0.2 * runs
    assert abs(ends - expected) < 4 * variance**0.5 + 1, (ends, expected, variance**0.5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_end_after_a_word_has_the_model_probability(trained, temperature):
    """One draw, many seeds: after a forced word, "end" competes with the letters that could
    lengthen it, with the logsumexp of the other characters' logits as its own (at
    temperature 1, exactly the model's mass on them); the word is picked where that chance is
    nearest one half, so a wrong chance shows."""
    model, vocab = trained
    prime, runs = "She said ", 600
    letters = torch.tensor(vocab.encode(string.ascii_lowercase))
    others = torch.tensor([i for i in range(len(vocab)) if i not in set(letters.tolist())])

    def end_chance(word: str) -> float:
        with torch.no_grad():
            logits, _ = model(torch.tensor([vocab.encode(prime + word)]))
        x = logits[0, -1].double()
        outcomes = torch.cat([x[letters], x[others].logsumexp(0, keepdim=True)]) / temperature
        return float(torch.softmax(outcomes, 0)[-1])

    prefixes = {w[:n] for w in WORDS for n in range(1, len(w) + 1)}
    chances = {w: end_chance(w) for w in sorted(prefixes)}
    word = min(chances, key=lambda w: abs(chances[w] - 0.5))
    q = chances[word]
    grammar = _compile(vocab, {"regex": f"{word}[a-z]*"})
    decoder = StepDecoder(model)
    ended = 0
    for seed in range(runs):
        params = SamplingParams(temperature=temperature, seed=seed)
        out = generate_constrained(model, vocab, prime, 12, params, grammar, decoder)
        assert out.text.startswith(word) and out.matched
        ended += out.text == word
    assert abs(ended / runs - q) < 4 * (q * (1 - q) / runs) ** 0.5 + 0.01, (word, ended, q)


# Bad input: a ConstraintError, quickly, that says what to fix.


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"regex": "[a-"}, r"(?s)constraint.regex does not compile: .*unclosed character class"),
        ({"regex": "a" * 4097}, r"4097 characters; at most 4096"),
        ({"json_schema": {"type": "objekt"}}, r"json_schema does not compile: Invalid type"),
        ({"json_schema": []}, r"json_schema must be an object"),
        ({"json_schema": {"enum": ["x" * 70000]}}, r"bytes as JSON; at most 65536"),
        ({"json_schema": {"type": "number", "maximum": float("nan")}}, r"is not JSON"),
        ({"grammar": "start: foo"}, r"grammar does not compile: .*unknown name: \"foo\""),
        ({"grammar": 'start: ("a"'}, r"grammar does not compile: .*Expected token"),
        ({"grammar": 'rule: "a"'}, r"grammar does not compile: no start rule"),
        ({"grammar": "x" * 16385}, r"16385 bytes; at most 16384"),
        ({"choice": []}, r"has 0 strings; give 1 to 1000"),
        ({"choice": [f"w{i}" for i in range(10_000)]}, r"has 10000 strings; give 1 to 1000"),
        ({"choice": ["yes", ""]}, r"an empty string"),
        ({"choice": ["yes", "no", "yes"]}, r"repeats 'yes'"),
        ({"choice": "yes"}, r"choice must be a list of strings"),
        ({"regex": "a", "choice": ["a"]}, r"exactly one of the keys .*; got 2 keys"),
        ({}, r"exactly one of the keys"),
        ({"pattern": "a"}, r"unknown constraint 'pattern': use one of regex, choice"),
        ("a+", r"must be an object"),
    ],
)
def test_bad_constraints_say_what_to_fix(trained, spec, message):
    _, vocab = trained
    start = time.perf_counter()
    with pytest.raises(ConstraintError, match=message):
        _compile(vocab, spec) if isinstance(spec, dict) else Constraint.parse(spec)
    assert time.perf_counter() - start < 1.0


def test_a_schema_nested_ten_thousand_deep_is_refused_without_recursion(trained):
    _, vocab = trained
    schema: dict = {"type": "object"}
    for _ in range(10_000):
        schema = {"type": "object", "properties": {"a": schema}}
    start = time.perf_counter()
    with pytest.raises(ConstraintError, match="nests more than 64 levels deep"):
        _compile(vocab, {"json_schema": schema})
    assert time.perf_counter() - start < 0.5
    nested = {"type": "object"}
    for _ in range(20):
        nested = {"type": "object", "properties": {"a": nested}}
    _compile(vocab, {"json_schema": nested})  # 41 levels: fine


def test_a_compile_past_its_time_bound_is_refused(trained):
    """(a{1000}){1000} exhausts llguidance's lexer fuel (~0.6 s here), which bounds the work
    even after the caller stopped waiting; a shorter bound answers first."""
    _, vocab = trained
    slow = Constraint.parse({"regex": "(a{1000}){1000}"})
    start = time.perf_counter()
    with pytest.raises(ConstraintError, match=r"took longer than 0.05 s to compile; simplify"):
        compile_constraint(vocab, slow, timeout_s=0.05)
    assert time.perf_counter() - start < 0.5
    with pytest.raises(ConstraintError, match=r"too complex to compile \(lexer error"):
        compile_constraint(vocab, slow, timeout_s=10)


def test_characters_the_vocabulary_lacks_are_named():
    prose = Vocabulary.from_text(make_text(2000))
    with pytest.raises(ConstraintError, match=r"lacks: '\{' .*then one of '\"', '\}' after '\{'"):
        _compile(prose, {"json_schema": {"type": "object"}})
    with pytest.raises(ConstraintError, match=r"lacks: '\{', '\"', ':' \(every match starts with"):
        _compile(prose, {"json_schema": PERSON})
    with pytest.raises(ConstraintError, match=r"lacks: one of '0', '1', .* '9' to start"):
        _compile(prose, {"regex": "[0-9]+"})
    with pytest.raises(ConstraintError, match=r"no choice can be written .* lacks '1', '2'"):
        _compile(prose, {"choice": ["1", "2"]})
    with pytest.raises(ConstraintError, match=r"lacks: 'ñ' \(every match starts with 'ña'\)"):
        _compile(prose, {"regex": "ña"})
    _compile(prose, {"choice": ["1", "yes"]})  # one choice is enough


# The cache and the batch-level pieces.


def test_a_repeated_constraint_is_not_compiled_again(trained):
    _, vocab = trained
    cache.clear()
    spec = {"json_schema": PERSON}
    first = _compile(vocab, spec)
    start = time.perf_counter()
    assert _compile(vocab, json.loads(json.dumps(spec))) is first
    assert time.perf_counter() - start < 0.005
    other = Vocabulary(vocab.chars.replace("q", ""))
    assert _compile(other, spec) is not first  # another vocabulary, another grammar


def test_the_cache_keeps_the_most_recently_used():
    lru = _LRU(2)
    a, b, c = (Constraint("regex", s) for s in "abc")
    grammars = {k: object() for k in (a, b, c)}
    lru.put(("v", a), grammars[a])
    lru.put(("v", b), grammars[b])
    assert lru.get(("v", a)) is grammars[a]  # a is now the most recent
    lru.put(("v", c), grammars[c])
    assert lru.get(("v", b)) is None and lru.get(("v", a)) is grammars[a]


def test_examples_compile_within_the_bound(trained):
    """Each example and a 50-property schema: far under the contract's 2 s (the issue asks
    for 50 ms; timed loosely here, as other work shares the machine)."""
    _, vocab = trained
    props = {f"p{i}": {"type": ["string", "integer", "boolean"][i % 3]} for i in range(50)}
    fifty = {"type": "object", "properties": props, "required": list(props)}
    cache.clear()
    for spec in [
        {"regex": NAME},
        {"regex": TEMPLATE},
        {"choice": ["yes", "no"]},
        {"json_schema": fifty},
        {"json_schema": PERSON},
        {"grammar": LIST_GRAMMAR},
    ]:
        start = time.perf_counter()
        _compile(vocab, spec)
        assert time.perf_counter() - start < 0.25, spec


def test_a_mixed_batch_gives_each_row_its_text_alone(trained):
    """Two constrained rows and two free ones, stepped together through ``fill_masks``, the
    masked sampler and ``advance``: each constrained row's text is ``generate_constrained``'s
    alone, and each free row's ids are ``generate``'s alone, bit for bit."""
    model, vocab = trained
    decoder = StepDecoder(model)
    v, length = len(vocab), 80
    rows = [
        ("The ", SamplingParams(seed=1), _compile(vocab, {"regex": NAME})),
        ("Alice ", SamplingParams(temperature=0.8, top_k=20, seed=2), None),
        ("\n", SamplingParams(top_p=0.9, seed=3), _compile(vocab, {"json_schema": PERSON})),
        ("The ", SamplingParams(seed=4), None),
    ]
    primed = [run_prime(decoder, vocab.encode(prime)) for prime, _, _ in rows]
    logits = torch.cat([lg for lg, _ in primed])
    state = tuple(torch.cat(parts, 1) for parts in zip(*(s for _, s in primed), strict=True))
    t = torch.tensor([p.temperature for _, p, _ in rows])
    k = torch.tensor([p.top_k or v for _, p, _ in rows])
    p = torch.tensor([p.top_p for _, p, _ in rows])
    seeds = np.array([p.seed for _, p, _ in rows], dtype=np.uint64)
    matchers = {b: g.matcher() for b, (_, _, g) in enumerate(rows) if g is not None}
    live = dict(matchers)
    masks = new_masks(len(rows), vocab)
    out: list[list[int]] = [[] for _ in rows]
    with torch.inference_mode():
        for pos in range(length):
            fill_masks(list(live.items()), masks)
            u = torch.from_numpy(uniforms(seeds, np.full(len(rows), pos, np.uint64)))
            ids = decoder.sample(logits, t, k, p, u, masks)
            advance([(m, int(ids[b])) for b, m in live.items()])
            for b, i in enumerate(ids.tolist()):
                if b not in matchers or (b in live and i != v):
                    out[b].append(i)
            for b, m in list(live.items()):
                if int(ids[b]) == v or m.done:
                    del live[b]
                    masks[b] = -1
            # An ended row steps on any character: its text is over.
            logits, state = decoder.step(torch.where(ids == v, 0, ids), state)
    for b, (prime, params, grammar) in enumerate(rows):
        if grammar is None:
            assert vocab.decode(out[b]) == generate(model, vocab, prime, length, params, decoder)
        else:
            alone = generate_constrained(model, vocab, prime, length, params, grammar, decoder)
            assert vocab.decode(out[b]) == alone.text and alone.matched
            assert matchers[b].matched


def test_masks_allow_exactly_the_characters_that_continue(trained):
    _, vocab = trained
    grammar = _compile(vocab, {"regex": "ab|ac|b[0-9]"})
    first, second = grammar.matcher(), grammar.matcher()
    masks = new_masks(3, vocab)
    advance([(second, vocab.encode("b")[0])])
    fill_masks([(0, first), (2, second)], masks)
    v = len(vocab)

    def chars(row: int) -> str:
        return "".join(c for c, ok in zip(vocab.chars, allowed(masks, row, v), strict=False) if ok)

    assert chars(0) == "ab" and chars(2) == "0123456789"
    assert allowed(masks, 1, v + 1).all()  # a row without a constraint allows everything
    assert not allowed(masks, 0, v + 1)[v]  # "end" only where the match is complete
    advance([(first, vocab.encode("a")[0])])
    advance([(first, vocab.encode("c")[0])])
    assert first.done and first.matched
    first.rollback(1)
    assert not first.matched and not first.done


def test_choice_limit_matches_the_contract():
    assert MAX_CHOICES == 1000
    Constraint.parse({"choice": [f"w{i}" for i in range(MAX_CHOICES)]})


def _runner_rows(trained, weights: str, controls: Controls = DEFAULT):
    from app.runner import Batch, ModelRunner
    from charrnn.checkpoint import Checkpoint
    from charrnn.native import load

    model, vocab = trained
    if not load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    runner = ModelRunner(Checkpoint(model, vocab), torch.device("cpu"), weights=weights)
    specs = [
        ("The ", 1, {"regex": r"[a-z ]+"}),  # one character class: the masks hold
        ("Alice ", 2, None),
        ("\n", 3, {"json_schema": PERSON}),  # masks change at most characters
        ("The ", 4, {"regex": TEMPLATE}),
        ("The ", 5, {"choice": ["yes", "no"]}),  # over within a few characters
        ("The ", 6, None),
    ]
    with runner.worker():
        rows = []
        for prime, seed, spec in specs:
            logits, state = runner.prime(runner.encode(prime), None)
            matcher = _compile(vocab, spec).matcher() if spec else None
            row_controls = controls if seed % 2 else DEFAULT  # every other row has them
            rows.append(
                runner.new_row(
                    logits, state, SamplingParams(seed=seed), 3, matcher, row_controls, prime
                )
            )
    return runner, Batch.concat(rows), len(vocab)


def _drawn(runner, batch, steps: int, length: int) -> tuple[list[list[int]], list]:
    """Each row's ids and logprobs up to its "end", from calls of ``steps`` characters."""
    rows = len(batch)
    ids: list[list[int]] = [[] for _ in range(rows)]
    lps: list[list] = [[] for _ in range(rows)]
    with runner.worker():
        while len(ids[0]) < length:  # a call may give fewer than ``steps``
            positions = np.full(rows, len(ids[0]), dtype=np.uint64)
            sampled, batch = runner.decode(batch, positions, steps)
            for b, run in enumerate(sampled.runs()):
                ids[b] += run
                lps[b] += list(zip(*sampled.logprobs[b][:2], strict=True))
    end = len(runner.vocab)
    cut = [i.index(end) + 1 if end in i[:length] else length for i in ids]
    return [i[:n] for i, n in zip(ids, cut, strict=True)], [
        lp[:n] for lp, n in zip(lps, cut, strict=True)
    ]


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_guessed_masks_give_the_ids_of_one_step_a_call(trained, weights, monkeypatch):
    """The native runner draws a run of characters with each row's masks held and checks the
    guess along the draws, replaying from where a mask changed: calls of 32 characters give
    the ids and logprobs of calls of one, for rows whose masks hold, rows whose masks change,
    a row that ends early, and free rows. Both outcomes of the check happen."""
    from charrnn.structured import MaskStepper

    outcomes = []
    walk = MaskStepper.walk

    def spy(self, drawn):
        out = walk(self, drawn)
        outcomes.append((len(drawn), out.held, out.true is None))
        return out

    monkeypatch.setattr(MaskStepper, "walk", spy)
    runner, batch, end = _runner_rows(trained, weights)
    one = _drawn(runner, batch, 1, 96)
    runner, batch, end = _runner_rows(trained, weights)  # fresh matchers
    runs = _drawn(runner, batch, 32, 96)
    assert runs == one
    ids, _ = one
    assert end not in ids[1] and end not in ids[5] and len(ids[1]) == 96  # the free rows
    assert ids[4][-1] == end and len(ids[4]) < 8  # "yes" or "no", then "end"
    assert any(n > 1 and whole for n, _, whole in outcomes)  # a run of guesses that held
    assert any(not whole for _, _, whole in outcomes)  # and one replayed


def test_controls_in_guessed_mask_runs_replay_from_their_state(trained, monkeypatch):
    """Rows with controls (their state moves on as the native call draws) beside constrained
    ones: a replayed run starts again from the controls' state before it, so calls of 32
    characters give the ids of calls of one, and the controls do change the text."""
    controls = Controls(presence_penalty=1.0, dry_multiplier=1.0, banned_strings=("e ", "th"))
    runner, batch, _ = _runner_rows(trained, "int8", controls)
    one = _drawn(runner, batch, 1, 96)
    runner, batch, _ = _runner_rows(trained, "int8", controls)
    assert _drawn(runner, batch, 32, 96) == one
    runner, batch, _ = _runner_rows(trained, "int8")
    plain = _drawn(runner, batch, 32, 96)
    assert plain[0][1] == one[0][1]  # row 1 (seed 2) has no controls: the same
    assert plain[0][0] != one[0][0] and plain[0][2] != one[0][2]  # rows with controls differ
