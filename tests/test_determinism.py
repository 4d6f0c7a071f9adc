"""The same text on every machine and at every batch size.

A request's text depends only on (model, prime, parameters, seed): the int8 decode gives the
same bits whichever x86 kernels oneDNN picks, and every CPU path gives a row the same bits
alone or among many others."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest
import torch

from app.runner import Batch, ModelRunner
from charrnn import Vocabulary, native, quantization
from charrnn.checkpoint import Checkpoint
from charrnn.decode import StepDecoder
from charrnn.quantization import choose_precision, int8_is_exact
from tests.conftest import make_text, primed_row, run_python, tiny_model

X86 = platform.machine().lower() in ("x86_64", "amd64")

# Runs in a fresh interpreter under one ONEDNN_MAX_CPU_ISA: the int8 step on a batch, the
# prime and a whole seeded generation, by every kernel set at hand, hashed. The model's
# weights are scaled up so that its hidden states reach +-1 and the int8 activations +-127:
# the inputs on which saturating 16-bit pair sums (8-bit weights without VNNI) go wrong.
ISA_SCRIPT = """
import hashlib, json
import torch
from charrnn import SamplingParams, Vocabulary, native
from charrnn.decode import StepDecoder
from charrnn.generate import generate
from charrnn.controls import Controls
from charrnn.quantization import int8_is_exact
from tests.conftest import tiny_model

CONTROLS = Controls(presence_penalty=0.5, dry_multiplier=1.0, banned_strings=("ab", "c."))
vocab = Vocabulary(" .abcdefghijklmnop")
model = tiny_model(vocab, seed=4, hidden=96)
with torch.no_grad():
    for p in model.parameters():
        p.mul_(6.0)
out = {"eight_bit_weights_exact": int8_is_exact(127)[0]}
kernels = [True, False] if native.load() else [False]
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, len(vocab), (40,), generator=g)
state = (torch.randn(2, 40, 96, generator=g).tanh(), torch.randn(2, 40, 96, generator=g))
with torch.inference_mode():
    for native_kernels in kernels:
        d = StepDecoder(model, "int8", native_kernels=native_kernels)
        h = hashlib.sha256()
        logits, (hs, cs) = d.step(ids, state)
        h.update(logits.numpy().tobytes() + hs.numpy().tobytes() + cs.numpy().tobytes())
        p_logits, (ph, pc) = d.prime(ids[:37])
        h.update(p_logits.numpy().tobytes() + ph.numpy().tobytes() + pc.numpy().tobytes())
        text = generate(model, vocab, "abc", 300, SamplingParams(1.0, None, 1.0, 7), d)
        controlled = generate(
            model, vocab, "abc", 300, SamplingParams(1.0, None, 1.0, 7), d, CONTROLS
        )
        out[d.kernels] = [h.hexdigest(), text, controlled]
print(json.dumps(out), flush=True)
import os; os._exit(0)  # skip teardown: after torch.jit.fork it sometimes aborts (PyTorch)
"""


@pytest.mark.e2e
@pytest.mark.skipif(not X86, reason="the int8 decode is an x86 path (oneDNN)")
def test_int8_decode_is_bit_identical_whatever_kernels_onednn_picks(tmp_path):
    """AVX2 and AVX512_CORE (no VNNI) add int8 pairs in saturating 16-bit arithmetic; the
    default here has VNNI. The 7-bit weights make all three exact, so they agree bit for bit."""
    runs = {}
    for isa in ("AVX2", "AVX512_CORE", None):
        env = {"ONEDNN_MAX_CPU_ISA": isa} if isa else {}
        runs[isa or "default"] = json.loads(run_python(tmp_path, ISA_SCRIPT, **env).stdout)
    # The restriction bites: 8-bit weights would give other sums (so other text) there.
    assert runs["AVX2"].pop("eight_bit_weights_exact") is False
    assert runs["AVX512_CORE"].pop("eight_bit_weights_exact") is False
    runs["default"].pop("eight_bit_weights_exact")
    assert runs["AVX2"] == runs["AVX512_CORE"] == runs["default"]
    # The generation is a real one, not a constant; the controls change it.
    for _, text, controlled in runs["default"].values():
        assert len(text) == 300 and len(set(text)) > 5
        assert controlled != text and "ab" not in controlled


def test_the_self_test_catches_sums_that_are_not_exact(monkeypatch):
    assert int8_is_exact() == (True, "int8 sums exact") or not X86
    real = torch._int_mm

    def saturating(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return real(a, b).clamp(-(2**15), 2**15 - 1)

    monkeypatch.setattr(torch, "_int_mm", saturating)
    exact, why = int8_is_exact()
    assert not exact and "int8 sums off by up to" in why


@pytest.fixture
def fresh_choice(monkeypatch):
    """choose_precision without the process's cached self-test and choices."""
    self_test = quantization._self_test
    choose_precision.cache_clear()
    self_test.cache_clear()
    yield
    choose_precision.cache_clear()
    self_test.cache_clear()


def test_precision_choice_and_its_reason(monkeypatch, fresh_choice, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_precision("fp32", cpu) == ("fp32", "CHARRNN_DECODE_WEIGHTS=fp32")
    assert choose_precision("auto", cuda)[0] == "fp32"
    with pytest.raises(ValueError, match="CHARRNN_DECODE_WEIGHTS=int8 is CPU-only"):
        choose_precision("int8", cuda)
    if X86:
        precision, why = choose_precision("auto", cpu)
        assert precision == "int8" and "exact" in why
    choose_precision.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    if native.load():  # off x86, int8 runs on the native kernels (their portable path there)
        assert choose_precision("auto", cpu)[0] == "int8"
        choose_precision.cache_clear()
    monkeypatch.setattr(native, "load", lambda: False)
    precision, why = choose_precision("auto", cpu)
    assert precision == "fp32" and "aarch64" in why and "native kernels" in why
    assert "decoding in fp32" in caplog.text
    with pytest.raises(ValueError, match="cannot run exactly here"):
        choose_precision("int8", cpu)
    choose_precision.cache_clear()
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(quantization, "_self_test", lambda: (False, "int8 sums off by up to 9"))
    precision, why = choose_precision("auto", cpu)
    assert precision == "fp32" and "self-test failed (int8 sums off by up to 9)" in why


def _generate_in_crowd(backend: ModelRunner, crowd: int, length: int) -> str:
    """The text of request (prime "the ", seed 5) decoded among ``crowd`` others with other
    primes, seeds and settings, through the service's batched step, one character a call."""
    rows = [primed_row(backend, "the ", 0.9, None, 1.0, 5)]
    rng = np.random.default_rng(crowd)
    for i in range(crowd):
        prime = "".join(rng.choice(list("aelothis "), size=int(rng.integers(1, 12))))
        rows.append(primed_row(backend, prime, 0.5 + i / crowd, 3 + i % 5, 0.9, 1000 + i))
    # The request sits in the middle of the batch, not at row 0.
    middle = len(rows) // 2
    rows[0], rows[middle] = rows[middle], rows[0]
    batch = Batch.concat(rows)
    out: list[int] = []

    with backend.worker():
        for pos in range(length):
            positions = np.full(len(rows), pos, dtype=np.uint64)
            sampled = backend.sample(batch, positions)
            out.append(sampled.runs()[middle][0])
            batch = backend.forward(batch, sampled)
    return backend.vocab.decode(out)


@pytest.mark.parametrize(
    "weights,native_kernels",
    [("fp32", True), ("int8", True), ("int8", False)],
    ids=["fp32-native", "int8-native", "int8-eager"],
)
def test_a_request_gives_the_same_text_alone_and_among_64_others(weights, native_kernels):
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab, seed=6, hidden=64)
    if native_kernels and not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    backend = ModelRunner(
        Checkpoint(model, vocab),
        torch.device("cpu"),
        weights=weights,
        native_kernels=native_kernels,
    )
    alone = _generate_in_crowd(backend, 0, 200)
    among = _generate_in_crowd(backend, 64, 200)
    assert alone == among
    assert len(set(alone)) > 5


@pytest.mark.parametrize("native_kernels", [True, False], ids=["native", "eager"])
def test_fp32_step_rows_do_not_depend_on_their_neighbours(native_kernels):
    """Bit for bit at every batch size from 1 to 40, for LSTM and GRU (MKL alone gives a
    lone row, 2-3 rows and 4+ rows other last bits)."""
    vocab = Vocabulary("abcdefgh")
    for cell in ("lstm", "gru"):
        model = tiny_model(vocab, cell, seed=5, hidden=64)
        decoder = StepDecoder(model, native_kernels=native_kernels)
        assert decoder.batch_invariant and "8-row fp32 blocks" in decoder.invariance
        n = 40
        ids = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(0))
        state = tuple(torch.randn(2, n, 64).tanh() for _ in range(2 if cell == "lstm" else 1))
        with torch.inference_mode():
            alone = [
                decoder.step(ids[i : i + 1], tuple(s[:, i : i + 1] for s in state))
                for i in range(n)
            ]
            for b in range(1, n + 1):
                logits, new = decoder.step(ids[:b], tuple(s[:, :b] for s in state))
                for i in range(b):
                    assert torch.equal(logits[i], alone[i][0][0]), (cell, b, i)
                    for got, want in zip(new, alone[i][1], strict=True):
                        assert torch.equal(got[:, i], want[:, 0]), (cell, b, i)


def test_a_path_that_is_not_batch_invariant_says_so():
    decoder = StepDecoder(tiny_model(Vocabulary("abcdefgh"), "gru", hidden=48))
    assert not decoder.batch_invariant
    assert "NOT batch-invariant: hidden size 48 is not a multiple of 32" in decoder.invariance


@pytest.mark.e2e
def test_served_text_is_the_same_alone_and_among_64_concurrent_requests_fp32(
    tiny_checkpoint, tmp_path
):
    """Over HTTP, on the fp32 path: /info and the start-up log say the path and that it is
    batch-invariant, and a seeded request's text alone equals its text among 64 others."""
    import asyncio

    import httpx

    from tests.server import run_server

    body = {"prime": "the ", "max_new_chars": 300, "temperature": 1.0, "seed": 11}
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", decode_weights="fp32") as s:
        (m,) = httpx.get(f"{s.url}/info").json()["models"]
        assert m["decode_weights"] == "fp32"
        assert m["decode_reason"] == "CHARRNN_DECODE_WEIGHTS=fp32"
        assert m["batch_invariant"] is True and "fp32 blocks" in m["batch_invariance"]
        assert "model tiny decodes with fp32 weights (CHARRNN_DECODE_WEIGHTS=fp32)" in s.log()
        alone = httpx.post(f"{s.url}/generate", json=body, timeout=60).json()["generated_text"]

        async def crowd() -> list[str]:
            async with httpx.AsyncClient(timeout=120) as client:
                others = [
                    {"prime": "she said", "max_new_chars": 300, "temperature": 0.7, "seed": i}
                    for i in range(64)
                ]
                bodies = [*others[:32], body, *others[32:]]
                replies = await asyncio.gather(
                    *(client.post(f"{s.url}/generate", json=b) for b in bodies)
                )
                return [r.json()["generated_text"] for r in replies]

        texts = asyncio.run(crowd())
    assert texts[32] == alone and len(alone) == 300
    assert len(set(texts)) > 10  # the crowd was real: other seeds, other texts
