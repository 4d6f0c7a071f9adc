"""Any input character: ``unknown_chars`` replaces characters outside the vocabulary by
look-alikes, or drops them, and says exactly what it did; the default stays "error"."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import aconnect_sse

from charrnn import Vocabulary
from charrnn.lookalikes import fit
from tests.conftest import run

CURLY = Vocabulary.from_text("abcdefghijklmnopqrstuvwxyz .,\u2018\u2019\u201c\u201d-\n")
STRAIGHT = Vocabulary.from_text("abcdefghijklmnopqrstuvwxyz .,'\"-\n")


@pytest.mark.parametrize(
    ("vocab", "text", "want", "replaced", "dropped"),
    [
        # Straight quotes into a vocabulary of curly ones: opening or closing by context.
        (
            CURLY,
            'he said "don\'t"',
            "he said \u201cdon\u2019t\u201d",
            [('"', "\u201c", 8), ("'", "\u2019", 12), ('"', "\u201d", 14)],
            [],
        ),
        # Curly quotes into straight ones; a dash and an ellipsis.
        (
            STRAIGHT,
            "\u2018no\u2019 \u2014 ok\u2026",
            "'no' - ok...",
            [("\u2018", "'", 0), ("\u2019", "'", 3), ("\u2014", "-", 5), ("\u2026", "...", 9)],
            [],
        ),
        # Accents lose their marks; a non-breaking space is a space; emoji and control
        # characters have no look-alike.
        (
            CURLY,
            "caf\u00e9\u00a0na\u00efve\U0001f600\x07.",
            "cafe naive.",
            [("\u00e9", "e", 3), ("\u00a0", " ", 4), ("\u00ef", "i", 7)],
            [("\U0001f600", 10), ("\x07", 11)],
        ),
        # Compatibility forms: a ligature and full-width letters.
        (STRAIGHT, "\ufb01ne \uff41", "fine a", [("\ufb01", "fi", 0), ("\uff41", "a", 4)], []),
    ],
)
def test_replace_maps_look_alikes_and_reports_exactly(vocab, text, want, replaced, dropped):
    out = fit(text, vocab, "replace")
    assert (out.text, out.replaced, out.dropped) == (want, replaced, dropped)
    assert not vocab.unknown(out.text)


def test_drop_drops_and_error_changes_nothing():
    out = fit("caf\u00e9 \u201cx\u201d", STRAIGHT, "drop")
    assert out.text == "caf x" and out.replaced == []
    assert out.dropped == [("\u00e9", 3), ("\u201c", 5), ("\u201d", 7)]
    assert fit("caf\u00e9", STRAIGHT, "error").text == "caf\u00e9"
    assert fit("plain", STRAIGHT, "replace").replaced == []


PRIME = "Alice \u201csaid\u201d na\u00efve\U0001f600 "


def test_the_routes_replace_drop_and_report(tiny_checkpoint):
    async def test(c: httpx.AsyncClient) -> None:
        body = {"prime": PRIME, "max_new_chars": 30, "seed": 3}
        r = await c.post("/generate", json=body)
        assert r.status_code == 422
        assert '"unknown_chars": "replace"' in r.json()["detail"][0]["msg"]  # says how to fix
        r = await c.post("/generate", json={**body, "unknown_chars": "replace"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["prime"] == "Alice said naive "  # no look-alike for the curly quotes here
        assert out["input"] == {
            "replaced": [["\u00ef", "i", 15]],
            "dropped": [["\u201c", 6], ["\u201d", 11], ["\U0001f600", 18]],
        }
        plain = await c.post("/generate", json={**body, "prime": "Alice said naive "})
        assert plain.json()["generated_text"] == out["generated_text"]
        assert "input" not in plain.json()
        r = await c.post("/generate", json={**body, "unknown_chars": "drop"})
        assert r.json()["prime"] == "Alice said nave " and r.json()["input"]["replaced"] == []
        stream = {**body, "unknown_chars": "replace"}
        async with aconnect_sse(c, "POST", "/generate/stream", json=stream) as es:
            events = [(e.event, json.loads(e.data)) async for e in es.aiter_sse()]
        assert events[0][1]["input"] == out["input"]
        assert events[-1][1]["generated_text"] == out["generated_text"]
        r = await c.post("/generate", json={**body, "prime": "\U0001f600", "unknown_chars": "drop"})
        assert r.status_code == 422 and "prime" in r.json()["detail"][0]["loc"]
        r = await c.post("/score", json={"text": PRIME})  # a score of another text: refused
        assert r.status_code == 422
        r = await c.post(
            "/v1/completions", json={"prompt": PRIME, "max_tokens": 5, "unknown_chars": "replace"}
        )
        assert r.status_code == 200 and r.json()["input"] == [out["input"]]

    run(tiny_checkpoint, test)


def test_the_servers_default_comes_from_its_setting(tiny_checkpoint):
    async def test(c: httpx.AsyncClient) -> None:
        r = await c.post("/generate", json={"prime": PRIME, "max_new_chars": 5})
        assert r.status_code == 200 and r.json()["prime"] == "Alice said naive "
        r = await c.post("/generate", json={"prime": PRIME, "unknown_chars": "error"})
        assert r.status_code == 422

    run(tiny_checkpoint, test, unknown_chars="replace")
