"""The pre-encoded SSE pieces write exactly the bytes of the general encoders, and the outbox
joins a row's runs of one hand-over into one run (and only runs that may be joined)."""

from __future__ import annotations

import json

from app.api import logprobs
from app.api.openai import _Chunks
from app.api.sse import NATIVE_TOKENS, CharEvents, sse
from app.engine import Done, Failed, TextRun
from app.engine.outbox import Outbox
from app.schemas import CompletionRequest

# Characters that JSON escapes or that are not ASCII, beside plain ones.
AWKWARD = 'a "q" \\ \n\t\u2019\u00e9\u4e2d\U0001f600/<>&'


def test_native_tokens_match_the_general_encoder():
    for index in (0, 7, 12345):
        expected = b"".join(
            sse("token", logprobs.token_event(i, ch, None, None))
            for i, ch in enumerate(AWKWARD, index)
        )
        assert NATIVE_TOKENS.run(index, AWKWARD) == expected
    assert NATIVE_TOKENS.run(3, "") == b""


def test_each_character_is_its_own_event_with_its_index():
    wire = NATIVE_TOKENS.run(40, AWKWARD).decode()
    events = [e for e in wire.split("\n\n") if e]
    assert len(events) == len(AWKWARD)
    for k, event in enumerate(events):
        kind, data = event.split("\n", 1)
        assert kind == "event: token"
        assert json.loads(data.removeprefix("data: ")) == {"index": 40 + k, "text": AWKWARD[k]}


def test_unnumbered_events():
    events = CharEvents("data: [", "", "]\n\n", numbered=False)
    assert events.run(5, 'x"') == b'data: ["x"]\n\ndata: ["\\""]\n\n'


def test_openai_chunks_match_the_general_encoder():
    req = CompletionRequest(model="m", prompt="Alice", stream=True)
    chunks = _Chunks('a "model"', [], req, "cmpl-1", 1700000000)
    for choice in (0, 3):
        expected = b"".join(chunks._text(choice, ch) for ch in AWKWARD)
        assert chunks.encode(choice, TextRun(9, AWKWARD)) == expected


class _Gen:
    """A stand-in for a generation: the outbox keys by identity only."""


def test_outbox_joins_a_rows_runs_of_one_hand_over():
    handed: list = []
    outbox = Outbox("m", lambda results, failing: handed.append(results))
    a, b = _Gen(), _Gen()
    outbox.add(a, [TextRun(0, "ab")])
    outbox.add(b, [TextRun(5, "x")])
    outbox.add(a, [TextRun(2, "cd")])
    outbox.add(b, [TextRun(6, "y"), Done("xy", "length")])
    outbox.flush()
    ((ra, ea), (rb, eb)) = handed[0]
    assert (ra, rb) == (a, b)
    assert ea == [TextRun(0, "abcd")]
    assert eb[0] == TextRun(5, "xy") and isinstance(eb[1], Done)


def test_outbox_keeps_runs_apart_that_may_not_be_joined():
    handed: list = []
    outbox = Outbox("m", lambda results, failing: handed.append(results))
    g = _Gen()
    with_lp = TextRun(2, "c", [-0.5])
    outbox.add(g, [TextRun(0, "ab")])
    outbox.add(g, [with_lp])  # carries logprobs
    outbox.add(g, [TextRun(3, "d")])
    outbox.add(g, [TextRun(9, "z")])  # not where the previous run ends
    outbox.failed([g], RuntimeError("boom"))
    ((_, events),) = handed[0]
    assert events[:4] == [TextRun(0, "ab"), with_lp, TextRun(3, "d"), TextRun(9, "z")]
    assert isinstance(events[4], Failed)
