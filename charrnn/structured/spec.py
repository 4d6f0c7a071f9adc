"""A constraint as a request gives it: its kind, its source, and the contract's limits on it
(the service's /info lists them). ``Constraint.parse`` checks the request's object (one key,
its type and size limits); each failure is a ``ConstraintError`` that says what to fix."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, get_args

import llguidance

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
