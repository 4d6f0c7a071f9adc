"""The copy guard through the service: /info says which models have a text index; a model
without one refuses the guard naming the field; each route gives the reference text, alone
and among other requests; a name generator never returns a listed name."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import openai
import pytest

from charrnn import SamplingParams, Vocabulary
from charrnn.checkpoint import load_checkpoint, save_checkpoint
from charrnn.controls import Controls
from charrnn.decode import StepDecoder
from charrnn.generate import generate as reference
from charrnn.textindex import TextIndex, index_path
from tests.conftest import Client, events, fit_tiny, generate, run
from tests.test_copy_guard import NAMES


@pytest.fixture(scope="module")
def names_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny model fitted on a list of names, saved with its training text's index."""
    rng = random.Random(0)
    text = "\n".join(rng.choice(NAMES) for _ in range(600)) + "\n"
    vocab = Vocabulary.from_text(text)
    model = fit_tiny(text, vocab, hidden=64, lr=0.02, steps=250)[0]
    path = tmp_path_factory.mktemp("names") / "names.pt"
    save_checkpoint(path, model, vocab, {})
    TextIndex.build(text, vocab).save(index_path(path))
    return path, text


def _reference(path: Path, prime: str, length: int, seed: int, **guard: object) -> str:
    ckpt = load_checkpoint(path)
    index = TextIndex.load(index_path(path))
    if guard.get("novel_lines"):
        guard["length"] = length
    params = SamplingParams(1.0, None, 1.0, seed)
    decoder = StepDecoder(ckpt.model, "int8")  # the service's default on the CPU
    return reference(
        ckpt.model, ckpt.vocab, prime, length, params, decoder, Controls(**guard), index
    )  # type: ignore[arg-type]


def test_info_says_which_models_have_a_text_index(names_checkpoint, tiny_checkpoint):
    async def has_index(c: Client) -> None:
        entry = (await c.get("/info")).json()["models"][0]
        assert entry["text_index"]["chars"] == len(names_checkpoint[1])
        assert entry["text_index"]["lines"] == len(NAMES)
        names = {x["name"] for x in (await c.get("/info")).json()["limits"]["controls"]}
        assert {"max_copy_chars", "novel_lines"} <= names

    async def has_none(c: Client) -> None:
        assert (await c.get("/info")).json()["models"][0]["text_index"] is None

    run(names_checkpoint[0], has_index)
    run(tiny_checkpoint, has_none)


def test_a_model_without_an_index_refuses_the_guard_naming_the_field(tiny_checkpoint):
    async def test(c: Client) -> None:
        for field, value in (("max_copy_chars", 8), ("novel_lines", True)):
            r = await c.post("/generate", json={"prime": "Alice", field: value})
            assert r.status_code == 422, r.text
            detail = r.json()["detail"][0]
            assert detail["loc"] == ["body", field] and "text index" in detail["msg"]
            r = await c.post(
                "/v1/completions", json={"model": "tiny", "prompt": "Alice", field: value}
            )
            assert r.status_code == 400 and field in r.json()["error"]["message"]
        # It keeps serving.
        assert (await generate(c, prime="Alice", max_new_chars=5))["generated_text"]

    run(tiny_checkpoint, test)


def test_bad_guard_values_answer_422(names_checkpoint):
    async def test(c: Client) -> None:
        for body in (
            {"max_copy_chars": 3},
            {"max_copy_chars": 257},
            {"max_copy_chars": "x"},
            {"novel_lines": "maybe"},
            {"novel_lines": True, "stop": ["a"]},  # a stop string that cuts a line short
        ):
            r = await c.post("/generate", json={"prime": "\n", **body})
            assert r.status_code == 422, (body, r.text)
            assert r.json()["detail"][0]["loc"][-1] in body, r.text
        # A stop string that begins with a newline ends a line the guard has checked.
        out = await generate(c, prime="\n", novel_lines=True, stop=["\n"], max_new_chars=30)
        assert out["generated_text"] not in NAMES

    run(names_checkpoint[0], test)


GUARDS = [{"max_copy_chars": 4}, {"novel_lines": True}, {"max_copy_chars": 5, "novel_lines": True}]


@pytest.mark.parametrize("guard", GUARDS, ids=lambda g: "+".join(g))
def test_each_route_gives_the_reference_text_alone_and_among_others(names_checkpoint, guard):
    path, _ = names_checkpoint
    want = [_reference(path, "\n", 40, seed, **guard) for seed in (1, 2, 3)]
    plain = [_reference(path, "\n", 40, seed) for seed in (1, 2, 3)]
    assert want != plain  # the guard bites

    async def test(c: Client) -> None:
        body = {"prime": "\n", "max_new_chars": 40, **guard}
        alone = [(await generate(c, **body, seed=s))["generated_text"] for s in (1, 2, 3)]
        assert alone == want
        # Among plain requests, other guards and samples of its own, at once.
        crowd = [generate(c, **body, seed=1, n=3)]
        crowd += [generate(c, prime="\n", max_new_chars=40, seed=s) for s in (1, 2, 3)]
        crowd += [
            generate(c, prime="\n", max_new_chars=40, seed=s, **g) for s, g in enumerate(GUARDS)
        ]
        # Beside constrained rows (a masked batch), greedy: as alone.
        greedy = {**body, "temperature": 0, "max_new_chars": 30}
        alone_greedy = (await generate(c, **greedy))["generated_text"]
        crowd += [generate(c, prime="\n", max_new_chars=30, constraint={"regex": "[A-Z][a-z]+"})]
        crowd += [generate(c, **greedy)]
        together = await asyncio.gather(*crowd)
        assert [s["generated_text"] for s in together[0]["samples"]] == want
        assert [r["generated_text"] for r in together[1:4]] == plain
        assert together[-1]["generated_text"] == alone_greedy
        # The stream and the OpenAI route.
        streamed = await events(c, **body, seed=2)
        assert streamed[-1][0] == "done" and streamed[-1][1]["generated_text"] == want[1]
        r = await c.post(
            "/v1/completions",
            json={"model": "tiny", "prompt": "\n", "max_tokens": 40, "seed": 3, **guard},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want[2]

    run(path, test)


def test_a_name_generator_never_returns_a_listed_name(names_checkpoint):
    """200 names (25 requests of n: 8, one name each up to a newline) with ``novel_lines``:
    none is a listed name; without it most are."""
    path, _ = names_checkpoint
    names = set(NAMES)

    async def test(c: Client) -> None:
        async def names_of(seed: int, **guard: object) -> list[str]:
            out = await generate(
                c, prime="\n", max_new_chars=20, stop=["\n"], n=8, seed=seed * 8, **guard
            )
            return [s["generated_text"] for s in out["samples"]]

        guarded = [n for seed in range(25) for n in await names_of(seed, novel_lines=True)]
        free = [n for seed in range(25) for n in await names_of(seed)]
        assert len(guarded) == 200 and not names & set(guarded), names & set(guarded)
        assert sum(n in names for n in free) > 100

    run(path, test)


def test_the_openai_sdk_sends_the_guard_as_extra_body(names_checkpoint):
    path, _ = names_checkpoint
    want = _reference(path, "\n", 30, 7, novel_lines=True)

    async def test(c: Client) -> None:
        client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="-", http_client=c)
        out = await client.completions.create(
            model="tiny", prompt="\n", max_tokens=30, seed=7, extra_body={"novel_lines": True}
        )
        assert out.choices[0].text == want

    run(path, test)
