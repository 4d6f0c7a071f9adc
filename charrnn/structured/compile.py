"""Compiling a constraint for a model's vocabulary: on a worker thread, within a time bound,
into a ``Grammar`` kept in a small LRU cache, with the checks that can tell before
generating that a constraint needs characters the vocabulary lacks."""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import numpy as np

from charrnn.structured.matcher import Grammar, Matcher, allowed, fill_masks, new_masks
from charrnn.structured.spec import Constraint, ConstraintError
from charrnn.structured.tokens import _characters, tokenizer
from charrnn.vocab import Vocabulary

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


@functools.cache
def _compile_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(COMPILE_WORKERS, "constraint-compile")


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
