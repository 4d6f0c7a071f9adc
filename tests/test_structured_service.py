"""Structured generation in the service: ``constraint`` on the native routes,
``response_format`` and ``structured_outputs`` on /v1/completions, /info's limits.

In-process (the ASGI app with its lifespan, no process): bad input answers 4xx naming the
fix, how a match ends (``finish_reason``, ``constraint.matched``), the service's text equal
to ``generate_constrained``'s. With a real server and real clients (e2e): each kind matches,
a request's text alone and among 64 others, the OpenAI SDK, and bad input never stopping it.
The model is tests/conftest.py's ``train_structured``: braces, quotes and digits included."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from charrnn import SamplingParams, load_checkpoint
from charrnn.structured import Constraint, compile_constraint, generate_constrained
from tests.conftest import Client, events, generate, run
from tests.constraint_examples import LIST_GRAMMAR, NAME, PERSON

WORDS = r"[a-z]+( [a-z]+)*"
LIST_RE = r"\[[1-9][0-9]?(,[1-9][0-9]?)*\]"
JSON = {"content-type": "application/json"}
THE = {"prime": "The ", "max_new_chars": 120}  # unless a request says otherwise
# Room for the 10,000-deep schema's body and 64 others beside a request: in-process, and on
# the real server the e2e tests share (the ``server`` fixture).
SERVED = {"max_body_bytes": 1 << 20, "max_concurrent": 80}
pytestmark = pytest.mark.server(checkpoint="structured_checkpoint", name="json", **SERVED)


class Nested(dict):
    """A schema nested ``depth`` deep, written as JSON text: Python's encoder would recurse."""

    def __init__(self, depth: int):
        super().__init__(deep=depth)
        self.text = '{"type":"object","properties":{"a":' * depth + "{}" + "}}" * depth


def _body(fields: dict) -> str:
    """A request's JSON, with a ``Nested`` schema spliced in as text."""
    nested = [v for v in _walk(fields) if isinstance(v, Nested)]
    text = json.dumps(fields)
    for n in nested:
        text = text.replace(json.dumps(n), n.text)
    return text


def _walk(value: object):
    yield value
    if isinstance(value, dict) and not isinstance(value, Nested):
        for v in value.values():
            yield from _walk(v)


# Every bad constraint of the issue, with what the message must say. A catastrophic pattern
# for a backtracking engine is none for llguidance's lexer: it compiles and matches (below).
BAD = [
    ({"regex": "[a-"}, r"constraint.regex does not compile: .*unclosed character class"),
    ({"json_schema": {"type": "objekt"}}, r"json_schema does not compile: Invalid type"),
    ({"grammar": 'start: ("a"'}, r"grammar does not compile: .*Expected token"),
    ({"grammar": "start: foo"}, r"grammar does not compile: .*unknown name: \"foo\""),
    ({"regex": "a", "choice": ["a"]}, r"exactly one of the keys .*; got 2 keys"),
    ({"pattern": "a"}, r"unknown constraint 'pattern'"),
    ({"choice": []}, r"has 0 strings; give 1 to 1000"),
    ({"choice": [f"w{i}" for i in range(10_000)]}, r"has 10000 strings; give 1 to 1000"),
    ({"json_schema": Nested(10_000)}, r"nests too deep to read"),
    ({"json_schema": Nested(100)}, r"nests more than 64 levels deep"),
    ({"regex": "(a{1000}){1000}"}, r"too complex to compile|took longer than"),
    ({"regex": "ñ+"}, r"lacks: 'ñ'"),
]


def _reference(checkpoint: Path, spec: dict, seed: int, prime: str = "The ", length: int = 120):
    ckpt = load_checkpoint(checkpoint)
    grammar = compile_constraint(ckpt.vocab, Constraint.parse(spec))
    params = SamplingParams(seed=seed)
    return generate_constrained(ckpt.model, ckpt.vocab, prime, length, params, grammar)


def test_bad_constraints_answer_422_naming_the_fix(structured_checkpoint):
    async def test(c: Client) -> None:
        for spec, message in BAD:
            start = time.perf_counter()
            body = _body({"prime": "The ", "constraint": spec})
            r = await c.post("/generate", content=body, headers=JSON)
            assert r.status_code == 422, (spec, r.text)
            (error,) = r.json()["detail"]
            assert error["loc"] in (["body", "constraint"], ["body"])
            assert re.search(message, error["msg"], re.S), error["msg"]
            assert time.perf_counter() - start < 3.0  # the compile bound, and some
        r = await c.get("/generate/stream", params={"prime": "The ", "constraint": "{oops"})
        assert r.status_code == 422 and "must be a JSON object" in r.text
        assert (await generate(c, **THE, constraint={"choice": ["yes"]}))["generated_text"] == "yes"

    run(structured_checkpoint, test, **SERVED)


def test_json_for_a_prose_model_names_the_missing_characters(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post(
            "/generate", json={"prime": "the ", "constraint": {"json_schema": {"type": "object"}}}
        )
        assert r.status_code == 422
        assert "vocabulary lacks: '{'" in r.json()["detail"][0]["msg"]

    run(tiny_checkpoint, test)


@pytest.mark.parametrize("pattern", [r"(a*)*b", r"(a|a)*"])
def test_catastrophic_patterns_answer_fast(structured_checkpoint, pattern):
    async def test(c: Client) -> None:
        start = time.perf_counter()
        out = await generate(
            c, prime="The ", constraint={"regex": pattern}, max_new_chars=30, seed=1
        )
        assert time.perf_counter() - start < 2.0
        if out["constraint"]["matched"]:
            assert re.fullmatch(pattern, out["generated_text"])

    run(structured_checkpoint, test)


def test_openai_fields_answer_400_naming_them(structured_checkpoint):
    cases = [
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "not both",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format", "type must be one of"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "schema"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "one of"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "not compile"),
        ({"structured_outputs": {"json": "{x"}}, "structured_outputs.json", "is not JSON"),
    ]

    async def test(c: Client) -> None:
        for body, param, message in cases:
            r = await c.post("/v1/completions", json={"prompt": "The ", **body})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param and message in error["message"], error
        r = await c.post(
            "/v1/completions", json={"prompt": "The ", "response_format": {"type": "text"}}
        )
        assert r.status_code == 200

    run(structured_checkpoint, test)


def test_how_a_match_ends(structured_checkpoint):
    async def test(c: Client) -> None:
        # A complete match that cannot go on.
        out = await generate(c, **THE, constraint={"choice": ["yes", "no"]}, seed=3)
        assert out["generated_text"] in ("yes", "no") and out["finish_reason"] == "stop"
        assert out["constraint"] == {"matched": True}
        # One that could go on: "end" is drawn, and texts of several lengths come out.
        lengths = set()
        for seed in range(8):
            out = await generate(c, **THE, constraint={"regex": "[a-z]+"}, seed=seed)
            assert out["finish_reason"] == "stop" and out["constraint"]["matched"]
            assert re.fullmatch("[a-z]+", out["generated_text"])
            lengths.add(len(out["generated_text"]))
        assert len(lengths) > 1
        # max_new_chars too short.
        out = await generate(c, prime="The ", constraint={"regex": NAME}, max_new_chars=3, seed=1)
        assert out["finish_reason"] == "length" and out["constraint"] == {"matched": False}
        assert len(out["generated_text"]) == 3
        # A stop string inside the constraint: matched is of the text without it.
        out = await generate(c, **THE, constraint={"choice": ["yes!", "no!"]}, stop=["!"], seed=3)
        assert out["generated_text"] in ("yes", "no") and out["finish_reason"] == "stop"
        assert out["constraint"] == {"matched": False}
        out = await generate(c, **THE, constraint={"regex": WORDS}, stop=[" "], seed=2)
        assert re.fullmatch("[a-z]+", out["generated_text"]) and out["finish_reason"] == "stop"
        assert out["constraint"] == {"matched": True}
        # Unconstrained: no constraint field.
        assert "constraint" not in await generate(c, prime="The ", max_new_chars=5)

    run(structured_checkpoint, test)


def test_the_service_gives_the_reference_loops_text(structured_checkpoint):
    specs = [{"regex": "[a-z]+"}, {"regex": NAME}, {"json_schema": PERSON}]

    async def test(c: Client) -> None:
        for spec in specs:
            for seed in range(6):
                out = await generate(c, **THE, constraint=spec, seed=seed)
                ref = _reference(structured_checkpoint, spec, seed)
                assert out["generated_text"] == ref.text, (spec, seed)
                assert out["constraint"]["matched"] == ref.matched
                assert out["finish_reason"] == ref.finish_reason

    run(structured_checkpoint, test, decode_weights="fp32")  # the reference's precision


def test_the_done_event_says_whether_it_matched(structured_checkpoint):
    async def test(c: Client) -> None:
        constraint = json.dumps({"regex": NAME})
        got = await events(c, "GET", prime="The ", seed=5, constraint=constraint)
        text = "".join(d["text"] for e, d in got if e == "token")
        kind, done = got[-1]
        assert kind == "done" and done["generated_text"] == text
        assert done["constraint"] == {"matched": True} and re.fullmatch(NAME, text)

    run(structured_checkpoint, test)


# -- a real server, real clients -----------------------------------------------------------


def _check_kinds(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:

        def gen(spec: dict, seed: int, prime: str = "The ") -> dict:
            body = {"prime": prime, "max_new_chars": 200, "seed": seed, "constraint": spec}
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["constraint"]["matched"] and out["finish_reason"] == "stop", out
            return out

        for seed in range(5):
            assert re.fullmatch(NAME, gen({"regex": NAME}, seed)["generated_text"])
            choices = ["alice", "queen", "hatter"]
            assert gen({"choice": choices}, seed)["generated_text"] in choices
            text = gen({"json_schema": PERSON}, seed, "\n")["generated_text"]
            jsonschema.validate(json.loads(text), PERSON)
            assert text == json.dumps(json.loads(text), separators=(",", ":"))  # compact
            assert re.fullmatch(
                LIST_RE, gen({"grammar": LIST_GRAMMAR}, seed, "\n")["generated_text"]
            )


@pytest.mark.e2e
@pytest.mark.slow
def test_a_request_gives_its_text_alone_and_among_64_others(server):
    """Constrained and free requests together: each one's text equals its text alone."""
    specs = [{"regex": NAME}, None, {"json_schema": PERSON}, None, {"regex": "[a-z]+"}]
    bodies = [
        {
            "prime": "The " if i % 3 else "\n",
            "max_new_chars": 60,
            "seed": 100 + i,
            "temperature": 0.9,
            "top_k": 30 if i % 4 == 0 else None,
            "constraint": specs[i % len(specs)],
        }
        for i in range(65)
    ]

    async def all_at_once(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            rs = await asyncio.gather(*(c.post("/generate", json=b) for b in bodies))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        return [r.json() for r in rs]

    together = asyncio.run(all_at_once(server.url))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for body, out in zip(bodies[:12], together[:12], strict=True):
            alone = c.post("/generate", json=body).json()
            assert alone["generated_text"] == out["generated_text"], body
            assert alone.get("constraint") == out.get("constraint")
    for body, out in zip(bodies, together, strict=True):
        if body["constraint"] is None:
            assert "constraint" not in out
        else:
            assert out["constraint"]["matched"] or out["finish_reason"] == "length"


@pytest.mark.e2e
@pytest.mark.slow
def test_bad_input_never_stops_a_real_server_and_each_kind_matches(server):
    """Every bad constraint answered, on every route, and then each kind still matches."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for spec, message in BAD:
            start = time.perf_counter()
            body = _body({"prime": "The ", "constraint": spec})
            r = c.post("/generate", content=body, headers=JSON)
            assert r.status_code == 422, r.text
            assert re.search(message, r.json()["detail"][0]["msg"], re.S), r.text
            assert time.perf_counter() - start < 3.0
            params = {"prime": "The ", "constraint": _body(spec)}
            if len(params["constraint"]) < 4000:  # a URL's length
                assert c.get("/generate/stream", params=params).status_code == 422
            r = c.post(
                "/v1/completions",
                json={"prompt": "The ", "structured_outputs": {"regex": "[a-"}},
            )
            assert r.status_code == 400
        assert c.get("/ready").status_code == 200
    _check_kinds(server.url)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_openai_sdk_with_response_format_and_structured_outputs(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-")
    out = client.completions.create(
        model="json",
        prompt="\n",
        max_tokens=200,
        seed=1,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": PERSON},
            }
        },
    )
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)
    assert out.choices[0].finish_reason == "stop"
    out = client.completions.create(
        model="json",
        prompt="The ",
        max_tokens=50,
        seed=2,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert out.choices[0].text in ("yes", "no") and out.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="json",
            prompt="The ",
            max_tokens=50,
            seed=3,
            stream=True,
            extra_body={"structured_outputs": {"regex": NAME}},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert re.fullmatch(NAME, text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    stream = client.completions.create(
        model="json",
        prompt="\n",
        max_tokens=200,
        seed=4,
        stream=True,
        extra_body={"response_format": {"type": "json_object"}},
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].text for c in chunks)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # any object may run past max_tokens: still a start of one
        assert text.startswith("{") and len(text) == 200
    with pytest.raises(openai.BadRequestError, match="structured_outputs"):
        client.completions.create(
            model="json",
            prompt="The ",
            extra_body={
                "response_format": {"type": "json_object"},
                "structured_outputs": {"regex": "a"},
            },
        )
