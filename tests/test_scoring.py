"""Probabilities and scoring end to end, against a real server: ``POST /score``, ``logprobs``
on native generation, the tokenizer routes, and OpenAI's ``echo``/``logprobs``/prompt forms
through the real ``openai`` SDK."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import pytest
from httpx_sse import connect_sse

from charrnn import load_checkpoint
from tests.conftest import make_text
from tests.server import ROOT, run_server

pytestmark = pytest.mark.timeout(180)

PRIME = "Alice was "


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with run_server(
        tmp_path_factory.mktemp("srv"),
        f"tiny={tiny_checkpoint}",
        max_prime_chars=3000,
        max_score_chars=5000,
        # Small parts, so that concurrent primes overlap (test_scores_side_by_side_...).
        prime_budget=128,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def vocab(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).vocab


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def score(server, **body) -> dict:
    r = post(server, "/score", **body)
    assert r.status_code == 200, r.text
    return r.json()


# -- /score -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_score_equals_training_evaluate(server, tiny_checkpoint, tmp_path):
    """The acceptance check on a text the test makes: /score with no context gives the nll
    of ``python -m training evaluate`` (zero state, first character unscored) within 0.002,
    and exactly (to float rounding) that of the int8 decode step the server runs."""
    text = make_text(2500, seed=7)
    path = tmp_path / "eval.txt"
    path.write_text(text, encoding="utf-8")

    def evaluate(*more: str) -> dict:
        cmd = [sys.executable, "-m", "training", "evaluate", "--checkpoint", str(tiny_checkpoint)]
        out = subprocess.run(
            [*cmd, "--data", str(path), *more], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    got = score(server, text=text)
    assert got["chars"] == len(text) and got["scored_chars"] == len(text) - 1
    assert abs(got["nll"] - evaluate()["nll"]) < 0.002
    assert abs(got["nll"] - evaluate("--decode", "int8")["nll"]) < 1e-5
    assert got["bpc"] == pytest.approx(got["nll"] / math.log(2))
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))


@pytest.mark.e2e
def test_score_shape_context_and_alternatives(server, vocab):
    text = "The rabbit said."
    got = score(server, text=text, top_logprobs=3)
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
    with_context = score(server, text=text, context="Alice said. ")
    assert with_context["scored_chars"] == len(text)
    assert with_context["logprobs"]["token_logprobs"][0] is not None
    assert with_context["logprobs"]["tokens"] == list(text)
    # Scoring in two parts, the first as the second's context, adds up to the whole.
    whole = score(server, text=text, context="A")["logprobs"]["token_logprobs"]
    second = score(server, text=text[6:], context="A" + text[:6])["logprobs"]["token_logprobs"]
    assert second == pytest.approx(whole[6:], abs=1e-6)


@pytest.mark.e2e
def test_generation_logprobs_equal_score(server):
    """For a prime and seed, the logprobs a generation reports (JSON and stream) equal
    /score of the generated text with the prime as context."""
    for seed, extra in ((1, {}), (2, {"temperature": 0.7, "top_k": 5}), (3, {"stop": ["e "]})):
        body = {"prime": PRIME, "max_new_chars": 150, "seed": seed, "logprobs": 2, **extra}
        r = post(server, "/generate", **body)
        assert r.status_code == 200, r.text
        gen = r.json()
        text = gen["generated_text"]
        lp = gen["logprobs"]
        assert lp["tokens"] == list(text) and lp["text_offset"] == list(range(len(text)))
        ref = score(server, text=text, context=PRIME, top_logprobs=2)["logprobs"]
        assert lp["token_logprobs"] == pytest.approx(ref["token_logprobs"], abs=1e-5)
        assert [[t["text"] for t in top] for top in lp["top_logprobs"]] == [
            [t["text"] for t in top] for top in ref["top_logprobs"]
        ]
        events = []
        with (
            httpx.Client(timeout=60) as c,
            connect_sse(c, "POST", f"{server.url}/generate/stream", json=body) as es,
        ):
            events = [(e.event, json.loads(e.data)) for e in es.iter_sse()]
        tokens = [d for name, d in events if name == "token"]
        assert "".join(d["text"] for d in tokens) == text
        assert [d["logprob"] for d in tokens] == pytest.approx(lp["token_logprobs"], abs=1e-6)
        for d, want in zip(tokens, lp["top_logprobs"], strict=True):
            assert [t["text"] for t in d["top_logprobs"]] == [t["text"] for t in want]
            assert [t["logprob"] for t in d["top_logprobs"]] == pytest.approx(
                [t["logprob"] for t in want], abs=1e-6
            )


@pytest.mark.e2e
def test_logprobs_zero_and_absent(server):
    gen = post(server, "/generate", prime=PRIME, max_new_chars=20, seed=4, logprobs=0).json()
    assert len(gen["logprobs"]["token_logprobs"]) == 20
    assert gen["logprobs"]["top_logprobs"] == [[]] * 20
    plain = post(server, "/generate", prime=PRIME, max_new_chars=20, seed=4).json()
    assert "logprobs" not in plain and plain["generated_text"] == gen["generated_text"]
    with (
        httpx.Client(timeout=60) as c,
        connect_sse(
            c, "GET", f"{server.url}/generate/stream", params={"prime": PRIME, "logprobs": 0}
        ) as es,
    ):
        tokens = [json.loads(e.data) for e in es.iter_sse() if e.event == "token"]
    assert tokens and all("logprob" in t and "top_logprobs" not in t for t in tokens)


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


@pytest.mark.e2e
@pytest.mark.parametrize(("body", "field"), BAD_SCORE)
def test_bad_score_requests_are_422_naming_the_field(server, body, field):
    r = post(server, "/score", **body)
    assert r.status_code == 422, r.text
    assert field in [str(p) for e in r.json()["detail"] for p in e["loc"]]


@pytest.mark.e2e
def test_score_errors_say_what_to_fix(server):
    r = post(server, "/score", text="Al\u2603ce")
    assert "'\u2603' at position 2" in r.json()["detail"][0]["msg"]
    r = post(server, "/generate", prime=PRIME, logprobs=21)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "logprobs"
    # The body limit of /score is its own (large enough for max_score_chars characters).
    r = post(server, "/score", text="a" * 5000)
    assert r.status_code == 200
    r = httpx.post(f"{server.url}/score", content=b"{" + b" " * 200_000 + b"}", timeout=30)
    assert r.status_code == 413 and "CHARRNN_MAX_SCORE_CHARS" in r.json()["detail"]


# -- tokenizer routes -----------------------------------------------------------------------


@pytest.mark.e2e
def test_tokenizer_routes(server, vocab):
    r = post(server, "/tokenize", prompt="Alice", add_special_tokens=False)
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == vocab.encode("Alice") and body["count"] == 5
    assert body["max_model_len"] == 3000
    assert post(server, "/detokenize", tokens=body["tokens"]).json() == {"prompt": "Alice"}
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "\n" and info["vocab_size"] == len(vocab)
    r = post(server, "/detokenize", tokens=[0, len(vocab)])
    assert r.status_code == 422 and "out of range" in r.text
    r = post(server, "/tokenize", prompt="\u2603")
    assert r.status_code == 422 and "'\\u2603' at position 0" in r.text


# -- OpenAI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


@pytest.mark.e2e
def test_openai_echo_scoring_equals_score(server, client):
    prompt = "The queen said to the rabbit."
    c = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=5, max_tokens=0)
    choice = c.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == list(prompt) and lp.text_offset == list(range(len(prompt)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = score(server, text=prompt, top_logprobs=5)["logprobs"]
    assert lp.token_logprobs[1:] == pytest.approx(ref["token_logprobs"][1:], abs=1e-6)
    for top, want in zip(lp.top_logprobs[1:], ref["top_logprobs"][1:], strict=True):
        assert list(top) == [t["text"] for t in want]
    assert c.usage.prompt_tokens == len(prompt) and c.usage.completion_tokens == 0
    # Echo with generation: the prompt's logprobs, then the generated characters'.
    g = client.completions.create(
        model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=30, seed=9
    ).choices[0]
    generated = g.text[len(prompt) :]
    assert g.text.startswith(prompt) and len(generated) == 30
    assert g.logprobs.text_offset == list(range(len(prompt) + 30))
    ref = score(server, text=generated, context=prompt)["logprobs"]["token_logprobs"]
    assert g.logprobs.token_logprobs[len(prompt) :] == pytest.approx(ref, abs=1e-5)
    # The streaming form: the echoed, scored prompt first, then one chunk per character.
    chunks = list(
        client.completions.create(
            model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=30, seed=9, stream=True
        )
    )
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert texts[0] == prompt and "".join(texts) == g.text
    streamed = [
        x
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for x in ch.choices[0].logprobs.token_logprobs
    ]
    assert streamed[0] is None
    assert streamed[1:] == pytest.approx(g.logprobs.token_logprobs[1:], abs=1e-7)
    plain_echo = list(
        client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=5, stream=True)
    )
    assert plain_echo[0].choices[0].text == prompt
    assert len("".join(ch.choices[0].text for ch in plain_echo if ch.choices)) == len(prompt) + 5
    assert httpx.get(f"{server.url}/info").json()["limits"]["max_score_chars"] == 5000
    stream0 = list(
        client.completions.create(
            model="tiny", prompt=prompt, echo=True, logprobs=5, max_tokens=0, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in stream0 if ch.choices) == prompt


@pytest.mark.e2e
def test_openai_prompt_forms(server, client, vocab):
    a = client.completions.create(model="tiny", prompt="Alice", max_tokens=12, seed=3)
    b = client.completions.create(model="tiny", prompt="The cat", max_tokens=12, seed=3)
    many = client.completions.create(
        model="tiny", prompt=["Alice", "The cat"], max_tokens=12, seed=3
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.text for c in many.choices] == [a.choices[0].text, b.choices[0].text]
    assert many.usage.prompt_tokens == 12 and many.usage.completion_tokens == 24
    ids = vocab.encode("Alice")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, seed=3)
    assert by_ids.choices[0].text == a.choices[0].text
    lists = client.completions.create(
        model="tiny", prompt=[ids, vocab.encode("The cat")], max_tokens=12, seed=3
    )
    assert [c.text for c in lists.choices] == [c.text for c in many.choices]
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=["Alice", "The cat"],
            max_tokens=12,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for i in (0, 1):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == many.choices[i].text
    assert chunks[-1].usage.completion_tokens == 24


@pytest.mark.e2e
def test_openai_models_and_refusals(server, client, vocab):
    assert client.models.retrieve("tiny").id == "tiny"
    r = httpx.get(f"{server.url}/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for field, value in (
        ("suffix", "end"),
        ("best_of", 0),
        ("n", 1000),
        ("logit_bias", {"9999": 10}),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
    ):
        r = post(server, "/v1/completions", prompt="Alice", **{field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    ok = post(
        server,
        "/v1/completions",
        prompt="Alice",
        best_of=1,
        logit_bias={},
        presence_penalty=0,
        frequency_penalty=0.0,
        suffix=None,
        user="me",
    )
    assert ok.status_code == 200, ok.text
    for body in (
        {"prompt": [0, len(vocab)]},
        {"prompt": "Alice", "logprobs": 21},
        {"prompt": "Alice", "max_tokens": 0},
    ):
        r = post(server, "/v1/completions", **body)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text


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
    from tests.conftest import tiny_model

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


@pytest.mark.e2e
def test_scores_side_by_side_equal_scores_alone(server):
    """Ten texts scored at once (primes side by side as batched steps, with a stream
    running) give exactly what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [make_text(2000, seed=20 + i) for i in range(10)]
    alone = [score(server, text=t, context="A")["logprobs"]["token_logprobs"] for t in texts]
    with ThreadPoolExecutor(11) as pool:
        running = pool.submit(post, server, "/generate", prime=PRIME, max_new_chars=3000)
        together = list(pool.map(lambda t: score(server, text=t, context="A"), texts))
        assert running.result().status_code == 200
    for got, want in zip(together, alone, strict=True):
        assert got["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-6)
