"""Constraints the structured-output tests share: a name regex, a template, a JSON schema and a
grammar, each of a different kind of mask."""

from __future__ import annotations

NAME = r"[A-Z][a-z]{3,9}(ia|or|wen)"
TEMPLATE = r"Alice (said|cried|whispered) '[a-z ,]{10,60}'\."
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["alice", "queen", "hatter"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
LIST_GRAMMAR = 'start: "[" NUM ("," NUM)* "]"\nNUM: /[1-9][0-9]?/'
