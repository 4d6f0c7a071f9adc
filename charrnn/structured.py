"""Structured generation: hold a model's text to a regex, a list of choices, a JSON schema or a
Lark grammar, with llguidance (a Rust library: a lexer of derivatives, no backtracking, and an
Earley parser, each bounded by "fuel" limits).

A character model suits this well: every token is one character, so the mask of characters
that may continue a match is exact. The pieces, in the order a request meets them:

* ``Constraint.parse`` checks the request's object (one key, its type and size limits);
* ``compile_constraint`` compiles it for a model's vocabulary on a worker thread, within a
  time bound, into a ``Grammar`` kept in a small LRU cache; each failure is a
  ``ConstraintError`` that says what to fix;
* ``Grammar.matcher`` gives each constrained row a ``Matcher``; per decode step, ``fill_masks``
  fills every constrained row's mask (a microsecond a row), the sampler draws with it
  (``charrnn.sampling.sample_next``'s ``mask``: "end", id ``V``, is one more outcome), and
  ``advance`` moves the matchers on by the characters drawn;
* ``generate_constrained`` is the single-request loop: the reference the service agrees with.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import llguidance
import numpy as np
import torch

from charrnn.decode import StepDecoder
from charrnn.generate import warm_up
from charrnn.model import CharRNN
from charrnn.sampling import SamplingParams, uniforms
from charrnn.vocab import Vocabulary

Kind = Literal["regex", "choice", "json_schema", "grammar"]
KINDS: tuple[Kind, ...] = get_args(Kind)

# The contract's limits on a constraint (the service's /info lists them).
MAX_REGEX_CHARS = 4096
MAX_CHOICES = 1000
MAX_SCHEMA_BYTES = 64 * 1024
MAX_GRAMMAR_BYTES = 16 * 1024
# JSON nesting of a schema. llguidance's JSON reader stops at 128 levels; checked here first,
# without recursion, so a schema nested 10,000 deep costs a loop, not a RecursionError.
MAX_SCHEMA_DEPTH = 64
COMPILE_S = 2.0  # the default of the service's constraint_compile_s
CACHE_SIZE = 256  # compiled grammars kept, across models

# llguidance's default limits bound the work of one compile: ``initial_lexer_fuel`` (1M) stops
# a pattern like (a{1000}){1000} after ~0.6 s on a loaded 2-core machine, whatever the
# timeout. Concise errors: the verbose ones quote the parser's state and the whole grammar.
LIMITS = llguidance.LLParserLimits(verbose_errors=False)
# Compiles run here, never on the caller's thread: llguidance drops the GIL while it builds a
# grammar, and the caller stops waiting after its timeout. A compile cannot be cancelled once
# it runs, so the fuel above is what keeps one that timed out from running long after.
COMPILE_WORKERS = 4


class ConstraintError(ValueError):
    """A constraint that cannot be used: the message says what to fix (the service: 422)."""


@dataclass(frozen=True)
class Constraint:
    """One constraint, checked: ``source`` is the pattern or grammar, or the choices or schema
    as compact JSON (so equal constraints are equal keys of the grammar cache)."""

    kind: Kind
    source: str

    @classmethod
    def parse(cls, value: object) -> Constraint:
        """From the request's object: exactly one of ``KINDS`` as the key."""
        if not isinstance(value, dict) or len(value) != 1:
            got = f"{len(value)} keys" if isinstance(value, dict) else type(value).__name__
            raise ConstraintError(
                f"constraint must be an object with exactly one of the keys "
                f"{', '.join(KINDS)}; got {got}"
            )
        ((kind, spec),) = value.items()
        if kind == "regex":
            return cls(kind, _regex(spec))
        if kind == "choice":
            return cls(kind, _choices(spec))
        if kind == "json_schema":
            return cls(kind, _schema(spec))
        if kind == "grammar":
            return cls(kind, _grammar(spec))
        raise ConstraintError(f"unknown constraint {kind!r}: use one of {', '.join(KINDS)}")

    def grammar(self) -> str:
        """llguidance's grammar text. Raises ``ConstraintError`` for a schema it cannot read."""
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            return llguidance.grammar_from("choice", self.source)
        if self.kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        # Compact JSON: no whitespace between tokens (separators "," and ":").
        compact = {"whitespace_flexible": False}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, overrides=compact)
        except ValueError as exc:
            raise ConstraintError(f"json_schema cannot be read: {exc}") from None

    def choices(self) -> list[str]:
        return json.loads(self.source) if self.kind == "choice" else []


def _regex(spec: object) -> str:
    if not isinstance(spec, str):
        raise ConstraintError(f"constraint.regex must be a string, got {type(spec).__name__}")
    if len(spec) > MAX_REGEX_CHARS:
        raise ConstraintError(
            f"constraint.regex has {len(spec)} characters; at most {MAX_REGEX_CHARS}"
        )
    return spec


def _choices(spec: object) -> str:
    if not isinstance(spec, list) or not all(isinstance(c, str) for c in spec):
        raise ConstraintError("constraint.choice must be a list of strings")
    if not 1 <= len(spec) <= MAX_CHOICES:
        raise ConstraintError(f"constraint.choice has {len(spec)} strings; give 1 to {MAX_CHOICES}")
    if "" in spec:
        raise ConstraintError("constraint.choice has an empty string; every choice needs text")
    if len(set(spec)) != len(spec):
        twice = sorted({c for c in spec if spec.count(c) > 1})[:5]
        raise ConstraintError(f"constraint.choice repeats {', '.join(map(repr, twice))}")
    return json.dumps(spec, ensure_ascii=False)


def _schema(spec: object) -> str:
    if not isinstance(spec, dict):
        raise ConstraintError(
            f"constraint.json_schema must be an object, got {type(spec).__name__}"
        )
    depth = _depth(spec, MAX_SCHEMA_DEPTH)
    if depth > MAX_SCHEMA_DEPTH:
        raise ConstraintError(
            f"constraint.json_schema nests more than {MAX_SCHEMA_DEPTH} levels deep; "
            f"at most {MAX_SCHEMA_DEPTH}"
        )
    try:
        text = json.dumps(spec, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConstraintError(f"constraint.json_schema is not JSON: {exc}") from None
    size = len(text.encode())
    if size > MAX_SCHEMA_BYTES:
        raise ConstraintError(
            f"constraint.json_schema is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES}"
        )
    return text


def _depth(value: object, limit: int) -> int:
    """How deep objects and lists nest in ``value`` (1 for a flat one), without recursion;
    stops counting once past ``limit``."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if not isinstance(item, dict | list):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        children = item.values() if isinstance(item, dict) else item
        todo.extend((child, depth + 1) for child in children)
    return deepest


def _grammar(spec: object) -> str:
    if not isinstance(spec, str):
        raise ConstraintError(f"constraint.grammar must be a string, got {type(spec).__name__}")
    size = len(spec.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise ConstraintError(f"constraint.grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES}")
    return spec


class _Characters:
    """llguidance's view of a character vocabulary (what ``TokenizerWrapper`` reads): token
    ``i < V`` is character ``i``'s UTF-8 bytes, ``V`` the end of the match, and after it one
    token for each byte that UTF-8 text may hold and no character of the vocabulary is.

    The model never draws those byte tokens (the sampler reads a mask's first V + 1 bits
    only), but llguidance needs them: it assumes any text can be tokenized, and where a
    grammar forces a character that no token spells it lets the character after it through
    instead. With them, a mask allows only characters that truly continue a match, and
    a match that needs a missing character shows as a mask with no character of the
    vocabulary, which also names it (``_walk``)."""

    def __init__(self, chars: str):
        self.ids = {ch.encode(): i for i, ch in enumerate(chars)}
        singles = (bytes([b]) for b in range(0xF5) if b not in (0xC0, 0xC1))  # UTF-8's bytes
        self.extra = [b for b in singles if b not in self.ids]
        self.ids |= {b: len(chars) + 1 + i for i, b in enumerate(self.extra)}
        # A special token's bytes start with 0xff, which UTF-8 text never holds.
        self.tokens = [ch.encode() for ch in chars] + [b"\xff<end>"] + self.extra
        self.eos_token_id = len(chars)
        self.bos_token_id = None
        self.special_token_ids = [len(chars)]

    def __call__(self, text: bytes) -> list[int]:
        """Exact: llguidance tokenizes the text a grammar forces with it."""
        out: list[int] = []
        for ch in text.decode(errors="surrogateescape"):
            spelled = ch.encode(errors="surrogateescape")
            if spelled in self.ids:
                out.append(self.ids[spelled])
            else:
                out.extend(self.ids[bytes([b])] for b in spelled if bytes([b]) in self.ids)
        return out


@functools.lru_cache(maxsize=16)
def _characters(chars: str) -> _Characters:
    return _Characters(chars)


@functools.lru_cache(maxsize=16)
def tokenizer(chars: str) -> llguidance.LLTokenizer:
    """The tokenizer of a vocabulary's characters (``Vocabulary.chars``), built once."""
    # No slices: they speed up masks over 100,000-token vocabularies, not over a few hundred.
    wrapper = llguidance.TokenizerWrapper(_characters(chars))
    return llguidance.LLTokenizer(wrapper, slices=[])


@functools.cache
def _compile_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS, "constraint-compile")


def new_masks(rows: int, vocab: Vocabulary) -> torch.Tensor:
    """int32 bitmasks [rows, W] for ``vocab``'s constrained rows, as llguidance fills them and
    the sampler reads them (bit j of row b: character j may come next; bit V: the match may
    end here; the bits past V are llguidance's own). They start allowing everything: a row
    without a constraint keeps that and samples exactly as without a mask."""
    words = (tokenizer(vocab.chars).vocab_size + 31) // 32
    return torch.full((rows, words), -1, dtype=torch.int32)


def allowed(masks: torch.Tensor, row: int, tokens: int) -> np.ndarray:
    """Bool [tokens]: which of the first ``tokens`` ids row ``row``'s mask allows."""
    bits = np.unpackbits(masks[row].numpy().view(np.uint8), bitorder="little")
    return bits[:tokens].astype(bool)


class Matcher:
    """One constrained row's place in its match."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.end = grammar.vocab_size  # the id of "end" in masks and samples
        self._matcher = grammar.template.deep_copy()

    @property
    def done(self) -> bool:
        """A complete match that cannot go on. (An incomplete one that no character of the
        vocabulary continues shows in its mask instead, which then allows neither a
        character nor "end": the sampler ends the row.)"""
        return self._matcher.is_stopped()

    @property
    def matched(self) -> bool:
        """Whether the characters consumed so far are a complete match."""
        return self._matcher.is_accepting()

    def rollback(self, chars: int) -> None:
        """Forget the last ``chars`` characters (a stop string the text will not keep)."""
        if chars and not self._matcher.rollback(chars):
            raise RuntimeError(f"cannot roll back {chars} characters: {self.error}")

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class MaskStepper:
    """A batch's constrained rows made ready for many steps: each step fills their masks
    (row ``b``'s into row ``b`` of ``masks``, an int32 CPU tensor from ``new_masks``) and moves
    their matchers on by the ids drawn, with as little as possible around llguidance's own
    calls, which run without the GIL. A row that no character of the vocabulary continues
    gets a mask without any (the sampler then ends it).

    ``walk`` checks a guess that the masks will hold for several steps (the sampler then
    draws them all in one native call): it moves the matchers along the draws for as long as
    their masks stay the ones the draws were made with."""

    def __init__(self, rows: Sequence[tuple[int, Matcher]], masks: torch.Tensor):
        # Straight to the tensor's memory, as llguidance's numpy helpers do after checks that
        # would cost more than a row's mask.
        assert masks.dtype == torch.int32 and masks.is_contiguous() and masks.device.type == "cpu"
        self.masks = masks
        self.end = rows[0][1].end if rows else -1
        self._rows = [(b, m._matcher) for b, m in rows]
        self._bytes = masks.shape[1] * 4
        # The bits the sampler reads (characters and "end"): a guess held where these agree.
        words = masks.shape[1]
        bits = np.zeros(words * 32, dtype=bool)
        bits[: self.end + 1] = True
        self._read = np.packbits(bits, bitorder="little").view(np.int32)
        # walk's masks: rows without a constraint keep their mask (every character) here.
        self._true = masks.clone()
        self._live: list[tuple[int, llguidance.LLMatcher]] = []  # where the last walk stopped

    def fill(self) -> None:
        self._fill(self._rows, self.masks)

    def _fill(self, rows: Sequence[tuple[int, llguidance.LLMatcher]], into: torch.Tensor) -> None:
        base, size = into.data_ptr(), self._bytes
        for b, matcher in rows:
            matcher.unsafe_compute_mask_ptr(base + b * size, size)

    def advance(self, ids: Sequence[int]) -> None:
        """``ids[b]``: what row ``b`` drew (its matcher stays where it is on "end")."""
        self._move(self._rows, ids)

    def _move(self, rows: Sequence[tuple[int, llguidance.LLMatcher]], ids: Sequence[int]) -> None:
        _consume([(m, ids[b]) for b, m in rows if ids[b] != self.end])

    def walk(self, drawn: Sequence[Sequence[int]]) -> tuple[int, torch.Tensor | None]:
        """``drawn[s][b]``: row b's draw at step s, every step drawn through ``masks`` (filled
        before step 0). Moves each row's matcher along its draws while its mask for the next
        step is still its row of ``masks``. Returns the number of steps whose masks were right
        and None where that is all of them (every matcher then moved on by every draw); else
        the first step s whose mask was wrong for some row, with the masks step s should have
        had (the matchers then moved on by the draws before s: ``settle`` moves them by the
        draws of step s made again with those masks). A row that drew "end" is over: its
        matcher stops there and its later draws are not its text."""
        held, true = self.masks.numpy(), self._true.numpy()
        true[:] = held  # rows that are over (or free) agree with the guess from here on
        live = self._rows
        last = len(drawn)
        for s in range(1, last + 1):
            before = drawn[s - 1]
            live = [(b, m) for b, m in live if before[b] != self.end]
            self._move(live, before)
            if s == last or not live:
                return last, None
            self._fill(live, self._true)
            # Every row compared: one that is over keeps the last mask it had, which agreed.
            if ((held ^ true) & self._read).any():
                self._live = live
                return s, self._true
        return last, None

    def settle(self, ids: Sequence[int]) -> None:
        """After a ``walk`` that stopped at step s: moves the rows still live there by
        ``ids[b]``, their draws at s made with the true masks."""
        self._move(self._live, ids)


def fill_masks(rows: Sequence[tuple[int, Matcher]], masks: torch.Tensor) -> None:
    """Write each constrained row's mask into its row of ``masks`` (``MaskStepper``)."""
    MaskStepper(rows, masks).fill()


def advance(rows: Sequence[tuple[Matcher, int]]) -> None:
    """Move each matcher on by the id its row drew: a character, or "end", which leaves the
    matcher where it is (the row is over)."""
    _consume([(matcher._matcher, i) for matcher, i in rows if i != matcher.end])


def _consume(pairs: list[tuple[llguidance.LLMatcher, int]]) -> None:
    # One call per row on this thread: a character vocabulary's mask and step cost llguidance
    # ~1.4 us a row, and its thread pool, woken again after each network step, ~7 us in the
    # decode loop (bench/README.md). A character the mask allowed is always consumed; were
    # one not, its matcher would stop in an error state, and the row end unmatched.
    for matcher, i in pairs:
        matcher.consume_token(i)


@dataclass(frozen=True)
class Grammar:
    """A constraint compiled for one vocabulary: shared by every row that uses it."""

    constraint: Constraint
    vocab_size: int
    template: llguidance.LLMatcher  # never advanced: each row advances a copy

    def matcher(self) -> Matcher:
        return Matcher(self)


class _LRU:
    """The last ``size`` compiled grammars by (vocabulary, constraint); thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[tuple[str, Constraint], Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, Constraint]) -> Grammar | None:
        with self._lock:
            grammar = self._items.get(key)
            if grammar is not None:
                self._items.move_to_end(key)
            return grammar

    def put(self, key: tuple[str, Constraint], grammar: Grammar) -> None:
        with self._lock:
            self._items[key] = grammar
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# Keyed by the vocabulary, not the model: a grammar depends only on the characters.
cache = _LRU(CACHE_SIZE)


def cached(vocab: Vocabulary, constraint: Constraint) -> Grammar | None:
    """``constraint`` for ``vocab`` if it is in the cache: no thread, no wait."""
    return cache.get((vocab.chars, constraint))


def compile_constraint(
    vocab: Vocabulary, constraint: Constraint, timeout_s: float = COMPILE_S
) -> Grammar:
    """``constraint`` compiled for ``vocab``, from the cache or within ``timeout_s`` seconds.
    Raises ``ConstraintError`` where it does not compile, takes too long, or needs characters
    the vocabulary lacks (where that shows before generating)."""
    key = (vocab.chars, constraint)
    grammar = cache.get(key)
    if grammar is not None:
        return grammar
    future = _compile_pool().submit(_compile, vocab, constraint)
    try:
        grammar = future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()  # if it has not started; a running one stops at its fuel limit
        raise ConstraintError(
            f"constraint.{constraint.kind} took longer than {timeout_s:g} s to compile; "
            "simplify it (fewer alternatives, smaller counted repetitions)"
        ) from None
    cache.put(key, grammar)
    return grammar


def _compile(vocab: Vocabulary, constraint: Constraint) -> Grammar:
    if constraint.kind == "choice":
        _check_choices(vocab, constraint.choices())
    template = llguidance.LLMatcher(
        tokenizer(vocab.chars), constraint.grammar(), log_level=0, limits=LIMITS
    )
    if template.is_error():
        reason = _reason(template.get_error())
        raise ConstraintError(f"constraint.{constraint.kind} does not compile: {reason}")
    grammar = Grammar(constraint, len(vocab), template)
    _check_start(vocab, grammar)
    return grammar


def _reason(error: str) -> str:
    """llguidance's message without the trailer of its concise errors, nor the line that
    quotes a regex inside the grammar llguidance wraps it in."""
    error = error.replace("<non-verbose/>", "").strip()
    return error.split("\n   1 | start: /")[0].strip()


def _check_choices(vocab: Vocabulary, choices: list[str]) -> None:
    """At least one choice must be writable with the vocabulary's characters."""
    if any(not vocab.unknown(c) for c in choices):
        return
    lacking = sorted({ch for c in choices for ch, _ in vocab.unknown(c)})
    raise ConstraintError(
        "constraint.choice: no choice can be written with the model's vocabulary, which "
        f"lacks {_listed(lacking)} (a model writes only characters it was trained on)"
    )


def _listed(chars: Sequence[str]) -> str:
    return ", ".join(repr(ch) for ch in chars)


def _check_start(vocab: Vocabulary, grammar: Grammar) -> None:
    """Follow the characters every match starts with, and the step after them: a constraint
    that needs a character the vocabulary lacks there fails now, naming it, rather than
    ending every request unmatched. (What lies beyond a choice of ways shows only while
    generating: the row then ends with ``matched`` false.) Also builds the lexer states the
    first steps need, which every row's copy shares."""
    matcher = grammar.matcher()
    forced, ok = _walk(matcher, vocab)
    kind = grammar.constraint.kind
    if matcher.error:
        reason = _reason(matcher.error)
        raise ConstraintError(
            f"constraint.{kind} is too complex to compile ({reason}); simplify it"
        )
    v = len(vocab)
    if not vocab.unknown(forced) and (matcher.matched or ok[:v].any()):
        return
    parts = []
    lacking = [ch for ch, _ in vocab.unknown(forced)]
    if lacking:
        parts.append(f"{_listed(lacking)} (every match starts with {forced!r})")
    if not (matcher.matched or ok[:v].any()):
        extra = _characters(vocab.chars).extra
        nexts = [extra[i].decode(errors="replace") for i in np.flatnonzero(ok[v + 1 :])]
        ascii = sorted(ch for ch in nexts if ch.isascii())
        wanted = _listed(ascii) + (" or non-ASCII characters" if len(ascii) < len(nexts) else "")
        where = f"after {forced!r}" if forced else "to start"
        parts.append(f"{'then ' if lacking else ''}one of {wanted} {where}")
    raise ConstraintError(
        f"constraint.{kind} needs characters the model's vocabulary lacks: {', '.join(parts)} "
        "(a model writes only characters it was trained on)"
    )


# How far ``_walk`` follows a match's forced start, in bytes.
FORCED_MAX = 64


def _walk(matcher: Matcher, vocab: Vocabulary) -> tuple[str, np.ndarray]:
    """Consume the text every match starts with (while a mask allows exactly one token, a
    character or a byte the vocabulary lacks, up to ``FORCED_MAX``); return it and what the
    mask after it allows (bool, one per token). Only llguidance's GIL-free calls do the work,
    which the lexer's fuel bounds."""
    masks = new_masks(1, vocab)
    tokens = _characters(vocab.chars).tokens
    forced = b""
    while True:
        fill_masks([(0, matcher)], masks)
        ok = allowed(masks, 0, len(tokens))
        ids = np.flatnonzero(ok)
        if len(ids) != 1 or ids[0] == len(vocab) or matcher.matched or len(forced) >= FORCED_MAX:
            return forced.decode(errors="ignore"), ok
        matcher._matcher.consume_token(int(ids[0]))
        forced += tokens[ids[0]]


@dataclass(frozen=True)
class ConstrainedText:
    text: str
    finish_reason: Literal["stop", "length"]
    matched: bool  # whether ``text`` is a complete match


@torch.inference_mode()
def generate_constrained(
    model: CharRNN,
    vocab: Vocabulary,
    prime: str,
    length: int,
    params: SamplingParams,
    grammar: Grammar,
    decoder: StepDecoder | None = None,
) -> ConstrainedText:
    """At most ``length`` new characters after ``prime`` that keep the text a possible start
    of a ``grammar`` match (the prime is not part of it). Each step draws one character with
    the row's mask, or "end"; the i-th draw uses the uniform of (seed, i), as
    ``charrnn.generate.generate`` does. It stops at "end", where nothing may follow, or after
    ``length`` characters."""
    decoder = decoder or StepDecoder(model)
    device = model.head.weight.device
    logits, state = warm_up(decoder, vocab.encode(prime))
    t = torch.tensor([params.temperature], device=device)
    k = torch.tensor([params.top_k or len(vocab)], device=device)
    p = torch.tensor([params.top_p], device=device)
    seed = np.array([params.seed], dtype=np.uint64)
    matcher = grammar.matcher()
    masks = new_masks(1, vocab)
    out: list[int] = []
    reason: Literal["stop", "length"] = "length"
    for pos in range(length):
        if matcher.done:
            reason = "stop"
            break
        fill_masks([(0, matcher)], masks)
        u = torch.from_numpy(uniforms(seed, np.array([pos], dtype=np.uint64))).to(device)
        nxt = decoder.sample(logits, t, k, p, u, masks.to(device))
        char = int(nxt[0])
        if char == matcher.end:
            reason = "stop"
            break
        advance([(matcher, char)])
        out.append(char)
        if pos + 1 < length:
            logits, state = decoder.step(nxt, state)
    else:
        # The last character may have completed a match that cannot go on: nothing was cut.
        if matcher.done and length > 0:
            reason = "stop"
    return ConstrainedText(vocab.decode(out), reason, matcher.matched)
