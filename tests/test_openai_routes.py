"""OpenAI compatibility in-process: ``/v1/completions`` and ``/v1/models`` through the real
``openai`` SDK (its async client over the app's ASGI transport, tests/conftest.py's ``run``),
and the OpenAI error shape. Echo and logprobs are checked against ``POST /score``. The SDK
over a real socket is tests/test_service.py's smoke test."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Client, generate, run, score


def sdk(c: Client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://app/v1", api_key="-", http_client=c)


def test_openai_sdk_plain_and_streaming(tiny_checkpoint):
    async def test(c: Client) -> None:
        client = sdk(c)
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny"]
        request = {
            "model": "tiny",
            "prompt": "Alice",
            "max_tokens": 40,
            "seed": 5,
            "temperature": 0.8,
            "top_p": 0.9,
            "extra_body": {"top_k": 6},
        }
        done = await client.completions.create(**request)
        native = await generate(
            c, prime="Alice", max_new_chars=40, seed=5, temperature=0.8, top_p=0.9, top_k=6
        )
        assert done.object == "text_completion" and done.model == "tiny"
        assert done.choices[0].text == native["generated_text"]
        assert done.choices[0].finish_reason == "length"
        usage = done.usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 40, 45)
        stream = await client.completions.create(
            **request, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == native["generated_text"]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 40 and not chunks[-1].choices
        # Greedy decoding (temperature 0) is the native route's top-k 1.
        greedy = await client.completions.create(
            model="tiny", prompt="the ", max_tokens=20, temperature=0
        )
        native = await generate(c, prime="the ", max_new_chars=20, top_k=1)
        assert greedy.choices[0].text == native["generated_text"]
        # Stop strings.
        stopped = await client.completions.create(
            model="tiny",
            prompt="Alice",
            max_tokens=300,
            seed=5,
            stop=done.choices[0].text[10:12],
            temperature=0,
        )
        assert stopped.choices[0].finish_reason in ("stop", "length")

    run(tiny_checkpoint, test)


def test_openai_errors_use_openai_shape(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post("/v1/completions", json={"prompt": "Alice", "temperature": 50})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "temperature"
        r = await c.post("/v1/completions", json={"prompt": "Al\u2603ce"})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "prompt"
        assert error["message"].startswith("prompt: prompt has characters not in the")
        assert "'\u2603' at position 2" in error["message"]
        r = await c.post("/v1/completions", json={"prompt": "Alice", "model": "gpt-4"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = await c.post("/v1/completions", json={"prompt": "Alice", "n": 99})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"

    run(tiny_checkpoint, test)


def test_chat_completions_names_the_completions_route(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 404
        error = r.json()["error"]
        assert "/v1/completions" in error["message"] and error["code"] != "model_not_found"

    run(tiny_checkpoint, test)


def test_openai_echo_scoring_equals_score(tiny_checkpoint):
    async def test(c: Client) -> None:
        client = sdk(c)
        prompt = "The queen said to the rabbit."
        done = await client.completions.create(
            model="tiny", prompt=prompt, echo=True, logprobs=5, max_tokens=0
        )
        choice = done.choices[0]
        assert choice.text == prompt and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == list(prompt) and lp.text_offset == list(range(len(prompt)))
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = (await score(c, text=prompt, top_logprobs=5))["logprobs"]
        assert lp.token_logprobs[1:] == pytest.approx(ref["token_logprobs"][1:], abs=1e-6)
        for top, want in zip(lp.top_logprobs[1:], ref["top_logprobs"][1:], strict=True):
            assert list(top) == [t["text"] for t in want]
        assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == 0
        # Echo with generation: the prompt's logprobs, then the generated characters'.
        g = (
            await client.completions.create(
                model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=30, seed=9
            )
        ).choices[0]
        generated = g.text[len(prompt) :]
        assert g.text.startswith(prompt) and len(generated) == 30
        assert g.logprobs.text_offset == list(range(len(prompt) + 30))
        ref = (await score(c, text=generated, context=prompt))["logprobs"]["token_logprobs"]
        assert g.logprobs.token_logprobs[len(prompt) :] == pytest.approx(ref, abs=1e-5)
        # The streaming form: the echoed, scored prompt first, then one chunk per character.
        stream = await client.completions.create(
            model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=30, seed=9, stream=True
        )
        chunks = [chunk async for chunk in stream]
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
        stream = await client.completions.create(
            model="tiny", prompt=prompt, echo=True, max_tokens=5, stream=True
        )
        plain_echo = [chunk async for chunk in stream]
        assert plain_echo[0].choices[0].text == prompt
        text = "".join(ch.choices[0].text for ch in plain_echo if ch.choices)
        assert len(text) == len(prompt) + 5
        assert (await c.get("/info")).json()["limits"]["max_score_chars"] == 5000
        stream = await client.completions.create(
            model="tiny", prompt=prompt, echo=True, logprobs=5, max_tokens=0, stream=True
        )
        stream0 = [chunk async for chunk in stream]
        assert "".join(ch.choices[0].text for ch in stream0 if ch.choices) == prompt

    run(tiny_checkpoint, test, max_score_chars=5000)


def test_openai_prompt_forms(tiny_checkpoint, vocab):
    async def test(c: Client) -> None:
        create = sdk(c).completions.create
        a = await create(model="tiny", prompt="Alice", max_tokens=12, seed=3)
        b = await create(model="tiny", prompt="The cat", max_tokens=12, seed=3)
        many = await create(model="tiny", prompt=["Alice", "The cat"], max_tokens=12, seed=3)
        assert [ch.index for ch in many.choices] == [0, 1]
        assert [ch.text for ch in many.choices] == [a.choices[0].text, b.choices[0].text]
        assert many.usage.prompt_tokens == 12 and many.usage.completion_tokens == 24
        ids = vocab.encode("Alice")
        by_ids = await create(model="tiny", prompt=ids, max_tokens=12, seed=3)
        assert by_ids.choices[0].text == a.choices[0].text
        lists = await create(
            model="tiny", prompt=[ids, vocab.encode("The cat")], max_tokens=12, seed=3
        )
        assert [ch.text for ch in lists.choices] == [ch.text for ch in many.choices]
        stream = await create(
            model="tiny",
            prompt=["Alice", "The cat"],
            max_tokens=12,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        for i in (0, 1):
            text = "".join(
                ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == i
            )
            assert text == many.choices[i].text
        assert chunks[-1].usage.completion_tokens == 24

    run(tiny_checkpoint, test)


def test_openai_models_and_refusals(tiny_checkpoint, vocab):
    async def test(c: Client) -> None:
        assert (await sdk(c).models.retrieve("tiny")).id == "tiny"
        r = await c.get("/v1/models/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        for field, value in (
            ("suffix", "end"),
            ("best_of", 0),
            ("n", 1000),
            ("logit_bias", {"9999": 10}),
            ("presence_penalty", 2.5),
            ("frequency_penalty", -3),
        ):
            r = await c.post("/v1/completions", json={"prompt": "Alice", field: value})
            assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
        ok = await c.post(
            "/v1/completions",
            json={
                "prompt": "Alice",
                "best_of": 1,
                "logit_bias": {},
                "presence_penalty": 0,
                "frequency_penalty": 0.0,
                "suffix": None,
                "user": "me",
            },
        )
        assert ok.status_code == 200, ok.text
        for body in (
            {"prompt": [0, len(vocab)]},
            {"prompt": "Alice", "logprobs": 21},
            {"prompt": "Alice", "max_tokens": 0},
        ):
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["message"], r.text

    run(tiny_checkpoint, test)
