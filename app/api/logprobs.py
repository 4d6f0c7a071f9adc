"""Log-probabilities on the wire: the native shape (``text_offset``, ``tokens``,
``token_logprobs``, ``top_logprobs`` as ``{"text", "logprob"}`` lists) and OpenAI's
(``top_logprobs`` as ``{character: logprob}`` maps), from the scheduler's ``Logprobs``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from app.engine import Done, Logprobs, Top


def native_top(top: Top | None) -> list[dict[str, Any]] | None:
    return None if top is None else [{"text": ch, "logprob": lp} for ch, lp in top]


def native(lp: Logprobs, offset: int = 0) -> dict[str, Any]:
    """``lp`` in the native shape; ``offset``: the first character's place in its text."""
    tops = lp.top if lp.top is not None else [[] for _ in lp.tokens]
    return {
        "text_offset": list(range(offset, offset + len(lp.tokens))),
        "tokens": list(lp.tokens),
        "token_logprobs": lp.token_logprobs,
        "top_logprobs": [
            None if first is None else native_top(top)
            for first, top in zip(lp.token_logprobs, tops, strict=True)
        ],
    }


def openai_top(top: Top | None) -> dict[str, float] | None:
    return None if top is None else dict(top)


def openai(parts: list[Logprobs], offset: int = 0) -> dict[str, Any]:
    """OpenAI's ``choices[i].logprobs`` over ``parts`` in order (an echoed prompt, then the
    generated characters); ``offset``: the first character's place in the choice's text."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for lp in parts:
        tops = lp.top if lp.top is not None else [{} for _ in lp.tokens]
        out["tokens"] += list(lp.tokens)
        out["token_logprobs"] += lp.token_logprobs
        out["top_logprobs"] += [
            None if first is None else (top if isinstance(top, dict) else openai_top(top))
            for first, top in zip(lp.token_logprobs, tops, strict=True)
        ]
        out["text_offset"] += list(range(offset, offset + len(lp.tokens)))
        offset += len(lp.tokens)
    return out


def summary(token_logprobs: list[float | None]) -> dict[str, Any]:
    """Mean NLL (nats), bits per character and perplexity over the scored characters."""
    scored = [lp for lp in token_logprobs if lp is not None]
    if not scored:
        return {"scored_chars": 0, "nll": None, "bpc": None, "perplexity": None}
    nll = -math.fsum(scored) / len(scored)
    return {
        "scored_chars": len(scored),
        "nll": nll,
        "bpc": nll / math.log(2),
        "perplexity": math.exp(nll),
    }


_JSON: dict[str, str] = {}


def _json_char(ch: str) -> str:
    """``json.dumps(ch)``, remembered: the vocabulary is small and this runs per character."""
    out = _JSON.get(ch)
    if out is None:
        out = _JSON[ch] = json.dumps(ch)
    return out


def token_event(
    index: int, ch: str, logprob: float | None, top: Top | None, sample: int | None = None
) -> str:
    """A native stream ``token`` event's data, written by hand: it runs once per streamed
    character, where ``json.dumps`` of the alternatives costs several times as much. The
    logprobs are float32 numbers: 9 significant digits give each back exactly. ``sample``:
    which of a request's samples (with n > 1)."""
    named = f',"sample":{sample}' if sample is not None else ""
    data = f'{{"index":{index}{named},"text":{_json_char(ch)}'
    if logprob is not None:
        data += f',"logprob":{logprob:.9g}'
    if top is not None:
        alts = ",".join(f'{{"text":{_json_char(c)},"logprob":{v:.9g}}}' for c, v in top)
        data += f',"top_logprobs":[{alts}]'
    return data + "}"


def best_first(dones: Sequence[Done]) -> list[int]:
    """The samples' indices by their score (the mean logprob per character), best first; a
    sample without one last, ties in order."""

    def key(i: int) -> tuple[bool, float, int]:
        score = dones[i].score
        return score is None, -(score or 0.0), i

    return sorted(range(len(dones)), key=key)
