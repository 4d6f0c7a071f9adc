"""The generation controls through the service: each equals the reference generation with
the same controls, alone and among other requests; bans hold over hundreds of samples; bad
values answer 422 (native) or 400 (OpenAI) naming the field."""

from __future__ import annotations

import openai
import pytest

from charrnn import SamplingParams
from charrnn.checkpoint import load_checkpoint
from charrnn.controls import Controls
from charrnn.decode import StepDecoder
from charrnn.generate import generate as reference
from tests.conftest import Client, generate, run

PRIME = "the queen said the queen said the queen "
CONTROLS = [
    {"logit_bias": {"e": -4.0, "a": 3.0}},
    {"repetition_penalty": 1.6, "penalty_last_n": 16},
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.2, "penalty_last_n": 32},
    {"dry_multiplier": 2.0, "dry_allowed_length": 2, "dry_sequence_breakers": ["."]},
    {"banned_strings": ["the", "e "]},
    {"min_p": 0.9},
    {"typical_p": 0.6},
    {  # all of them
        "logit_bias": {"q": 2.0},
        "presence_penalty": 0.4,
        "frequency_penalty": 0.3,
        "dry_multiplier": 0.8,
        "banned_strings": ["an", "ice"],
        "min_p": 0.05,
        "typical_p": 0.95,
    },
]


def _reference(ckpt, fields: dict, seed: int, length: int = 80) -> str:  # type: ignore[no-untyped-def]
    vocab = ckpt.vocab
    bias = tuple(sorted((vocab.encode(k)[0], v) for k, v in fields.get("logit_bias", {}).items()))
    rest = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    controls = Controls(**{**rest, "logit_bias": bias})
    decoder = StepDecoder(ckpt.model, "int8")  # the service's default on the CPU
    params = SamplingParams(1.0, None, 1.0, seed)
    return reference(ckpt.model, vocab, PRIME, length, params, decoder, controls)


@pytest.mark.parametrize("fields", CONTROLS, ids=lambda f: "+".join(f))
def test_each_control_gives_the_reference_text(tiny_checkpoint, fields):
    ckpt = load_checkpoint(tiny_checkpoint)
    want = [_reference(ckpt, fields, seed) for seed in (1, 2)]
    plain = [_reference(ckpt, {}, seed) for seed in (1, 2)]
    assert want != plain  # the control changes the text

    async def test(c: Client) -> None:
        body = {"prime": PRIME, "max_new_chars": 80, **fields}
        got = [(await generate(c, **body, seed=s))["generated_text"] for s in (1, 2)]
        assert got == want
        # The same request among plain ones and others with controls: the same text.
        together = await generate(c, **body, seed=1, n=3)
        assert together["samples"][0]["generated_text"] == want[0]
        assert together["samples"][1]["generated_text"] == want[1]

    run(tiny_checkpoint, test)


def test_banned_strings_never_end_in_the_text(tiny_checkpoint):
    """Hundreds of samples with bans the model likes, from primes that end where a banned
    string begins: none ever ends inside the generated text (nor across the prime's end)."""
    bans = ["the", "e ", "an"]

    async def test(c: Client) -> None:
        found = 0
        for k, prime in enumerate(["Alice th", "the queen said th", "she was a", "Alice e"]):
            for seed in range(0, 125, 5):
                out = await generate(
                    c,
                    prime=prime,
                    max_new_chars=60,
                    seed=1000 * k + seed,
                    n=5,
                    banned_strings=bans,
                )
                for s in out["samples"]:
                    assert _ends_in_generated(prime, s["generated_text"], bans) == [], prime
                    found += 1
        assert found == 4 * 25 * 5
        free = await generate(c, prime="Alice th", max_new_chars=400, seed=3, n=5)
        assert any(
            _ends_in_generated("Alice th", s["generated_text"], bans) for s in free["samples"]
        )

    run(tiny_checkpoint, test)


def _ends_in_generated(prime: str, text: str, bans: list[str]) -> list[str]:
    """The banned strings that end inside ``text`` (one may start in ``prime``)."""
    whole = prime + text
    return [
        ban
        for ban in bans
        for i in range(len(whole) - len(ban) + 1)
        if whole.startswith(ban, i) and i + len(ban) > len(prime)
    ]


def test_a_ban_that_leaves_no_character_ends_the_sample(tiny_checkpoint):
    async def test(c: Client) -> None:
        vocab = (await c.get("/info")).json()["models"][0]["vocabulary"]
        out = await generate(c, prime="Alice", banned_strings=list(vocab), seed=1)
        assert out["generated_text"] == "" and out["finish_reason"] == "stop"
        # Banned but one: the text is that character, as long as asked.
        out = await generate(
            c, prime="Alice", banned_strings=[ch for ch in vocab if ch != "a"], max_new_chars=9
        )
        assert out["generated_text"] == "a" * 9
        # With logprobs and several samples (their scores need them) in one fused call: the
        # row that drew "end" has no logprob there, and every sample answers.
        bans = [ch for ch in vocab if ch != "a"] + ["aaa"]  # "aa", then nothing is left
        out = await generate(
            c, prime="Alice", banned_strings=bans, logprobs=2, n=2, max_new_chars=9
        )
        assert [s["generated_text"] for s in out["samples"]] == ["aa", "aa"]
        assert out["logprobs"]["tokens"] == ["a", "a"]

    run(tiny_checkpoint, test)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {"e": 101}),
        ("logit_bias", {"ee": 1}),
        ("logit_bias", {"\u2603": 1}),
        ("repetition_penalty", 0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.5),
        ("penalty_last_n", 5000),
        ("dry_multiplier", 11),
        ("dry_base", 1.0),
        ("dry_allowed_length", 0),
        ("dry_sequence_breakers", ["x" * 17]),
        ("dry_penalty_last_n", -1),
        ("banned_strings", ["x" * 65]),
        ("min_p", 1.0),
        ("typical_p", 0),
    ],
)
def test_bad_values_name_the_field(tiny_checkpoint, field, value):
    async def test(c: Client) -> None:
        r = await c.post("/generate", json={"prime": "Alice", field: value})
        assert r.status_code == 422 and field in str(r.json()["detail"][0]["loc"]), r.text
        ok = value if field != "logit_bias" else {k: v for k, v in value.items()}
        body = {"prompt": "Alice", field: ok}
        if field == "logit_bias":  # OpenAI's keys are token ids
            body[field] = {"5": 101} if 101 in value.values() else {"9999": 1}
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        assert (await c.post("/generate", json={"prime": "Alice"})).status_code == 200

    run(tiny_checkpoint, test)


async def _native_samples(c: Client, length: int, **fields: object) -> list[str]:
    """Three samples without "e" (a bias of -100) and with a presence penalty of 0.5, from
    the native route: what the OpenAI clients below must give."""
    body = {"prime": PRIME, "max_new_chars": length, "n": 3, "logit_bias": {"e": -100}}
    out = await generate(c, **body, presence_penalty=0.5, **fields)
    return [s["generated_text"] for s in out["samples"]]


def test_the_openai_sdk_with_n_logit_bias_and_penalties(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    e = ckpt.vocab.encode("e")[0]

    async def test(c: Client) -> None:
        client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="-", http_client=c)
        out = await client.completions.create(
            model="tiny",
            prompt=PRIME,
            max_tokens=80,
            n=3,
            seed=1,
            logit_bias={str(e): -100},
            presence_penalty=0.5,
            frequency_penalty=0.5,
        )
        assert len(out.choices) == 3 and all("e" not in ch.text for ch in out.choices)
        assert [ch.text for ch in out.choices] == await _native_samples(
            c, 80, seed=1, frequency_penalty=0.5
        )

    run(tiny_checkpoint, test)


def test_langchains_openai_with_n_logit_bias_and_penalties(tiny_checkpoint):
    """LangChain's ``OpenAI`` (completions) as its users call it: ``n``, ``logit_bias`` and
    the penalties are its own fields; each generation equals the native sample."""
    from langchain_openai import OpenAI

    ckpt = load_checkpoint(tiny_checkpoint)
    e = ckpt.vocab.encode("e")[0]

    async def test(c: Client) -> None:
        llm = OpenAI(
            model="tiny",
            base_url="http://app/v1",
            api_key="-",
            http_async_client=c,
            max_tokens=60,
            temperature=1.0,
            n=3,
            logit_bias={str(e): -100},
            presence_penalty=0.5,
            frequency_penalty=0.3,
            seed=4,
        )
        result = await llm.agenerate([PRIME])
        texts = [g.text for g in result.generations[0]]
        assert texts == await _native_samples(c, 60, seed=4, frequency_penalty=0.3)
        assert all("e" not in t for t in texts)

    run(tiny_checkpoint, test)
