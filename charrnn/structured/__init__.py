"""Structured generation: hold a model's text to a regex, a list of choices, a JSON schema or a
Lark grammar, with llguidance (a Rust library: a lexer of derivatives, no backtracking, and an
Earley parser, each bounded by "fuel" limits).

A character model suits this well: every token is one character, so the mask of characters
that may continue a match is exact. The pieces, in the order a request meets them:

* ``spec``: ``Constraint.parse`` checks the request's object (one key, its type and size
  limits) against the contract's limits;
* ``compile``: ``compile_constraint`` compiles it for a model's vocabulary on a worker
  thread, within a time bound, into a ``Grammar`` kept in a small LRU cache; each failure is a
  ``ConstraintError`` that says what to fix (``tokens``: llguidance's view of the vocabulary);
* ``matcher``: ``Grammar.matcher`` gives each constrained row a ``Matcher``; per decode step,
  ``MaskStepper`` fills every constrained row's mask (a microsecond a row), the sampler draws
  with it (``charrnn.sampling.sample_next``'s ``mask``: "end", id ``V``, is one more outcome),
  and the matchers move on by the characters drawn;
* ``generate``: ``generate_constrained`` is the single-request loop, the reference the
  service agrees with.
"""

from charrnn.structured.compile import (
    CACHE_SIZE,
    COMPILE_S,
    cache,
    cached,
    compile_constraint,
)
from charrnn.structured.generate import ConstrainedText, generate_constrained
from charrnn.structured.matcher import (
    Grammar,
    MaskStepper,
    Matcher,
    Walk,
    advance,
    allowed,
    fill_masks,
    new_masks,
)
from charrnn.structured.spec import (
    KINDS,
    MAX_CHOICES,
    MAX_GRAMMAR_BYTES,
    MAX_REGEX_CHARS,
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    Constraint,
    ConstraintError,
    Kind,
)
from charrnn.structured.tokens import tokenizer

__all__ = [
    "CACHE_SIZE",
    "COMPILE_S",
    "KINDS",
    "MAX_CHOICES",
    "MAX_GRAMMAR_BYTES",
    "MAX_REGEX_CHARS",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "ConstrainedText",
    "Constraint",
    "ConstraintError",
    "Grammar",
    "Kind",
    "MaskStepper",
    "Matcher",
    "Walk",
    "advance",
    "allowed",
    "cache",
    "cached",
    "compile_constraint",
    "fill_masks",
    "generate_constrained",
    "new_masks",
    "tokenizer",
]
