"""Probabilities and scoring in-process (tests/conftest.py's ``run``): ``POST /score``,
``logprobs`` on native generation and the tokenizer routes; the pass behind them for every
kind of decoder; and (e2e, for the training CLI it runs) /score against ``python -m training
evaluate``. OpenAI's ``echo``/``logprobs`` are in tests/test_openai_routes.py; the scoring
routes over a real socket in tests/test_service.py's smoke test."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import Client, events, make_text, run, score, tiny_model
from tests.server import ROOT

PRIME = "Alice was "
# Small prime parts, so that concurrent primes overlap (test_scores_side_by_side_...).
SCORING = {"max_prime_chars": 3000, "max_score_chars": 5000, "prime_budget": 128}


# -- /score -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_score_equals_training_evaluate(tiny_checkpoint, tmp_path):
    """The acceptance check on a text the test makes: /score with no context gives the nll
    of ``python -m training evaluate`` (zero state, first character unscored) within 0.002,
    and exactly (to float rounding) that of the int8 decode step the service runs."""
    text = make_text(2500, seed=7)
    path = tmp_path / "eval.txt"
    path.write_text(text, encoding="utf-8")

    def evaluate(*more: str) -> dict:
        cmd = [sys.executable, "-m", "training", "evaluate", "--checkpoint", str(tiny_checkpoint)]
        out = subprocess.run(
            [*cmd, "--data", str(path), *more], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    fp32, int8 = evaluate()["nll"], evaluate("--decode", "int8")["nll"]

    async def test(c: Client) -> None:
        got = await score(c, text=text)
        assert got["chars"] == len(text) and got["scored_chars"] == len(text) - 1
        assert abs(got["nll"] - fp32) < 0.002
        assert abs(got["nll"] - int8) < 1e-5
        assert got["bpc"] == pytest.approx(got["nll"] / math.log(2))
        assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))

    run(tiny_checkpoint, test, **SCORING)


def test_score_shape_context_and_alternatives(tiny_checkpoint, vocab):
    async def test(c: Client) -> None:
        text = "The rabbit said."
        got = await score(c, text=text, top_logprobs=3)
        assert got["chars"] == len(text) and got["scored_chars"] == len(text) - 1
        lp = got["logprobs"]
        assert lp["tokens"] == list(text) and lp["text_offset"] == list(range(len(text)))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(x < 0 for x in lp["token_logprobs"][1:])
        for chosen, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            values = [t["logprob"] for t in top]
            assert len(top) == 3 and values == sorted(values, reverse=True)
            assert all(t["text"] in vocab for t in top)
            assert chosen <= values[0] + 1e-6
        nll = -sum(lp["token_logprobs"][1:]) / (len(text) - 1)
        assert got["nll"] == pytest.approx(nll)
        # A context conditions the first character too, and is not scored itself.
        with_context = await score(c, text=text, context="Alice said. ", top_logprobs=2)
        assert with_context["chars"] == with_context["scored_chars"] == len(text)
        assert with_context["logprobs"]["token_logprobs"][0] is not None
        assert len(with_context["logprobs"]["top_logprobs"][0]) == 2
        assert with_context["logprobs"]["tokens"] == list(text)
        # Scoring in two parts, the first as the second's context, adds up to the whole.
        whole = (await score(c, text=text, context="A"))["logprobs"]["token_logprobs"]
        second = await score(c, text=text[6:], context="A" + text[:6])
        assert second["logprobs"]["token_logprobs"] == pytest.approx(whole[6:], abs=1e-6)

    run(tiny_checkpoint, test, **SCORING)


def test_generation_logprobs_equal_score(tiny_checkpoint):
    """For a prime and seed, the logprobs a generation reports (JSON and stream) equal
    /score of the generated text with the prime as context."""

    async def test(c: Client) -> None:
        for seed, extra in ((1, {}), (2, {"temperature": 0.7, "top_k": 5}), (3, {"stop": ["e "]})):
            body = {"prime": PRIME, "max_new_chars": 150, "seed": seed, "logprobs": 2, **extra}
            r = await c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            gen = r.json()
            text = gen["generated_text"]
            lp = gen["logprobs"]
            assert lp["tokens"] == list(text) and lp["text_offset"] == list(range(len(text)))
            ref = (await score(c, text=text, context=PRIME, top_logprobs=2))["logprobs"]
            assert lp["token_logprobs"] == pytest.approx(ref["token_logprobs"], abs=1e-5)
            assert [[t["text"] for t in top] for top in lp["top_logprobs"]] == [
                [t["text"] for t in top] for top in ref["top_logprobs"]
            ]
            tokens = [d for name, d in await events(c, **body) if name == "token"]
            assert "".join(d["text"] for d in tokens) == text
            assert [d["logprob"] for d in tokens] == pytest.approx(lp["token_logprobs"], abs=1e-6)
            for d, want in zip(tokens, lp["top_logprobs"], strict=True):
                assert [t["text"] for t in d["top_logprobs"]] == [t["text"] for t in want]
                assert [t["logprob"] for t in d["top_logprobs"]] == pytest.approx(
                    [t["logprob"] for t in want], abs=1e-6
                )

    run(tiny_checkpoint, test, **SCORING)


def test_logprobs_zero_and_absent(tiny_checkpoint):
    async def test(c: Client) -> None:
        body = {"prime": PRIME, "max_new_chars": 20, "seed": 4}
        gen = (await c.post("/generate", json={**body, "logprobs": 0})).json()
        assert len(gen["logprobs"]["token_logprobs"]) == 20
        assert gen["logprobs"]["top_logprobs"] == [[]] * 20
        plain = (await c.post("/generate", json=body)).json()
        assert "logprobs" not in plain and plain["generated_text"] == gen["generated_text"]
        streamed = await events(c, "GET", prime=PRIME, logprobs=0)
        tokens = [d for name, d in streamed if name == "token"]
        assert tokens and all("logprob" in t and "top_logprobs" not in t for t in tokens)

    run(tiny_checkpoint, test, **SCORING)


BAD_SCORE = [
    ({"text": ""}, "text"),
    ({"text": "x" * 5001}, "text"),
    ({"text": "Al\u2603ce"}, "text"),
    ({"text": "Alice", "context": "\u2603"}, "context"),
    ({"text": "Alice", "context": "a" * 3001}, "context"),
    ({"text": "Alice", "top_logprobs": 21}, "top_logprobs"),
    ({"text": "Alice", "top_logprobs": -1}, "top_logprobs"),
    ({"text": "Alice", "surprise": 1}, "surprise"),
]


def test_bad_score_requests_are_422_naming_the_field(tiny_checkpoint):
    async def test(c: Client) -> None:
        for body, field in BAD_SCORE:
            r = await c.post("/score", json=body)
            assert r.status_code == 422, (body, r.text)
            locs = [str(p) for e in r.json()["detail"] for p in e["loc"]]
            assert field in locs, (body, locs)

    run(tiny_checkpoint, test, **SCORING)


def test_score_errors_say_what_to_fix(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post("/score", json={"text": "Al\u2603ce"})
        assert "'\u2603' at position 2" in r.json()["detail"][0]["msg"]
        r = await c.post("/generate", json={"prime": PRIME, "logprobs": 21})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "logprobs"
        # The body limit of /score is its own (large enough for max_score_chars characters).
        assert (await c.post("/score", json={"text": "a" * 5000})).status_code == 200
        r = await c.post("/score", content=b"{" + b" " * 200_000 + b"}")
        assert r.status_code == 413 and "CHARRNN_MAX_SCORE_CHARS" in r.json()["detail"]

    run(tiny_checkpoint, test, **SCORING)


# -- tokenizer routes -----------------------------------------------------------------------


def test_tokenizer_routes(tiny_checkpoint, vocab):
    async def test(c: Client) -> None:
        r = await c.post("/tokenize", json={"prompt": "Alice", "add_special_tokens": False})
        assert r.status_code == 200
        body = r.json()
        assert body["tokens"] == vocab.encode("Alice") and body["count"] == 5
        assert body["max_model_len"] == 3000
        r = await c.post("/detokenize", json={"tokens": body["tokens"]})
        assert r.json() == {"prompt": "Alice"}
        info = (await c.get("/tokenizer_info")).json()
        assert info["eos_token"] == "\n" and info["vocab_size"] == len(vocab)
        r = await c.post("/detokenize", json={"tokens": [0, len(vocab)]})
        assert r.status_code == 422 and "out of range" in r.text
        r = await c.post("/tokenize", json={"prompt": "\u2603"})
        assert r.status_code == 422 and "'\\u2603' at position 0" in r.text

    run(tiny_checkpoint, test, **SCORING)


# -- the pass behind /score, for every kind of decoder ----------------------------------------


@pytest.mark.parametrize(
    ("cell", "weights", "native_kernels"),
    [
        ("lstm", "int8", True),
        ("lstm", "int8", False),
        ("gru", "int8", False),
        ("lstm", "fp32", False),
    ],
)
def test_prime_all_gives_the_step_logits(cell, weights, native_kernels):
    """``StepDecoder.prime_all`` keeps the logits after every position: the last equals the
    prime's, a prime in parts equals one pass, and (int8) every row is exactly what the
    one-character step gives after the same characters."""
    import torch

    from charrnn import Vocabulary
    from charrnn.decode import StepDecoder

    text = make_text(300, seed=5)
    vocab = Vocabulary.from_text(text)
    model = tiny_model(vocab, cell=cell)
    decoder = StepDecoder(model, weights, native_kernels=native_kernels)
    ids = torch.tensor(vocab.encode(text))
    with torch.inference_mode():
        every, _ = decoder.prime_all(ids)
        last, _ = decoder.prime(ids)
        first, mid = decoder.prime_all(ids[:137])
        rest, _ = decoder.prime_all(ids[137:], mid)
        step_state = model.init_state(1)
        steps = []
        for t in range(40):
            logits, step_state = decoder.step(ids[t : t + 1], step_state)
            steps.append(logits)
    assert every.shape == (len(text), len(vocab))
    tol = 0 if weights == "int8" else 1e-5
    torch.testing.assert_close(every[-1:], last, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat([first, rest]), every, atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat(steps), every[:40], atol=tol, rtol=0)


def test_scores_side_by_side_equal_scores_alone(tiny_checkpoint):
    """Ten texts scored at once (primes side by side as batched steps, with a generation
    running) give exactly what each gives alone."""

    async def test(c: Client) -> None:
        texts = [make_text(2000, seed=20 + i) for i in range(10)]
        alone = [(await score(c, text=t, context="A"))["logprobs"] for t in texts]
        running = asyncio.ensure_future(
            c.post("/generate", json={"prime": PRIME, "max_new_chars": 3000})
        )
        together = await asyncio.gather(*(score(c, text=t, context="A") for t in texts))
        assert (await running).status_code == 200
        for got, want in zip(together, alone, strict=True):
            assert got["logprobs"]["token_logprobs"] == pytest.approx(
                want["token_logprobs"], abs=1e-6
            )

    run(tiny_checkpoint, test, **SCORING)
