"""The native int8 matmul kernels (charrnn/csrc/int8_gemm.cpp): every path this CPU has,
forced in turn, gives the integer sums of torch._int_mm bit for bit, and so the same text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from charrnn import SamplingParams, load_checkpoint, native
from charrnn.decode import StepDecoder
from charrnn.generate import generate
from charrnn.quantization import WEIGHT_MAX, _worst_cases, int8_is_exact
from tests.conftest import run_python

pytestmark = pytest.mark.skipif(not native.load(), reason="no C++ compiler for the native kernels")

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "alice.pt"
# (K, N): odd widths, none a multiple of a vector's 16 int32 lanes or 4-byte groups, and the
# shipped model's shapes (layer 0, layer 1, head).
SHAPES = ((3, 5), (97, 40), (130, 75), (255, 33), (512, 2048), (1024, 2048), (512, 75))


@pytest.fixture
def each_path():
    """Runs the test body once per path this CPU has, then restores the setting."""
    before = native.int8_kernel()
    yield native.int8_kernels()
    native.int8_kernel(native.int8_kernel_setting())
    assert native.int8_kernel() == before


def int8_mm(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.charrnn.int8_mm(x, packed)


def test_every_path_equals_int_mm_on_worst_cases(each_path):
    assert "portable" in each_path and each_path[-1] == "onednn"
    for path in each_path:
        assert native.int8_kernel(path) == path
        for k, n in SHAPES:
            big = k * n > 100_000
            for rows in (1, 2, 3, 7, 13, 16, 25, 40) if big else range(1, 41):
                for x, w in _worst_cases(rows, k, n, WEIGHT_MAX)[:: 3 if big else 1]:
                    [packed] = native.pack_int8([w])
                    want = torch._int_mm(x, w.t())
                    assert torch.equal(want.long(), x.long() @ w.long().t())  # exact
                    got = int8_mm(x, packed)
                    assert got.dtype == torch.int32 and torch.equal(got, want), (path, rows, k, n)


def test_a_packed_matrix_is_still_the_matrix():
    w = torch.randint(-63, 64, (75, 130), dtype=torch.int8)
    [packed] = native.pack_int8([w])
    assert packed.dtype == torch.int8 and packed.shape == w.shape and packed.is_contiguous()
    assert torch.equal(packed, w)
    x = torch.randint(-127, 128, (5, 130), dtype=torch.int8)
    assert torch.equal(torch._int_mm(x, packed.t()), torch._int_mm(x, w.t()))
    # An unpacked matrix (a copy, a slice) is packed on the call: the same sums, slower.
    for plain in (packed.clone(), torch.cat([w, w])[:75]):
        assert torch.equal(int8_mm(x, plain), int8_mm(x, packed))
    # Other tensors pass through.
    f = torch.randn(3, 4)
    assert native.pack_int8([f, torch.empty(0)])[0] is f


def test_the_avx2_path_refuses_weights_it_would_saturate():
    if "avx2" not in native.int8_kernels():
        pytest.skip("this CPU has no AVX2")
    before = native.int8_kernel()
    try:
        native.int8_kernel("avx2")
        x = torch.full((2, 8), -127, dtype=torch.int8)
        [wide] = native.pack_int8([torch.full((3, 8), 100, dtype=torch.int8)])
        with pytest.raises(RuntimeError, match=r"avx2 int8 kernel needs weights within \+-64"):
            int8_mm(x, wide)
        # The self-test checks the path in force: 8-bit weights fail it there, 7-bit pass.
        exact, why = int8_is_exact(127)
        assert not exact and "native avx2" in why
        assert int8_is_exact() == (True, "int8 sums exact")
    finally:
        native.int8_kernel(before)


def test_the_setting_refuses_unknown_paths(monkeypatch):
    monkeypatch.setenv("CHARRNN_INT8_KERNEL", "avx9000")
    with pytest.raises(ValueError, match="CHARRNN_INT8_KERNEL='avx9000' is not one of auto"):
        native.int8_kernel_setting()
    monkeypatch.setenv("CHARRNN_INT8_KERNEL", " AVX2 ")
    assert native.int8_kernel_setting() == "avx2"
    with pytest.raises(ValueError, match="unknown int8 kernel 'sse'"):
        native.int8_kernel("sse")
    for path in native.INT8_KERNELS[1:]:
        if path not in native.int8_kernels():  # a path this CPU lacks: one clear line
            with pytest.raises(ValueError, match=f"this CPU lacks the {path} int8 kernel"):
                native.int8_kernel(path)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_setting_is_read_at_load(tmp_path):
    code = "from charrnn import native\nnative.load()\nprint(native.int8_kernel())\n"
    assert run_python(tmp_path, code, CHARRNN_INT8_KERNEL="portable").stdout.strip() == "portable"
    assert run_python(tmp_path, code, CHARRNN_INT8_KERNEL="onednn").stdout.strip() == "onednn"
    best = native.int8_kernels()[0]
    assert run_python(tmp_path, code, CHARRNN_INT8_KERNEL="auto").stdout.strip() == best


def test_the_shipped_model_gives_the_same_numbers_and_text_on_every_path(each_path):
    """The batched step's logits and state at batch sizes 1 to 40, the prime, and a seeded
    generation: bit for bit the same on every path as on torch._int_mm ("onednn")."""
    ckpt = load_checkpoint(SHIPPED)
    decoder = StepDecoder(ckpt.model, "int8")
    assert decoder.kernels == "native"
    g = torch.Generator().manual_seed(0)
    vocab, hidden = len(ckpt.vocab), ckpt.model.config.hidden
    ids = torch.randint(0, vocab, (40,), generator=g)
    state = (
        torch.randn(2, 40, hidden, generator=g).tanh(),
        torch.randn(2, 40, hidden, generator=g),
    )
    prime = torch.tensor(ckpt.vocab.encode("Alice was beginning to get very tired of sitting"))
    runs = {}
    with torch.inference_mode():
        for path in each_path:
            native.int8_kernel(path)
            steps = []
            for b in (1, 2, 3, 8, 17, 40):
                logits, (h, c) = decoder.step(ids[:b], (state[0][:, :b], state[1][:, :b]))
                steps.append((logits, h, c))
            primed = decoder.prime(prime)
            text = generate(
                ckpt.model, ckpt.vocab, "Alice", 200, SamplingParams(0.8, None, 0.95, 3), decoder
            )
            runs[path] = (steps, primed, text)
    steps, (p_logits, (ph, pc)), text = runs["onednn"]
    assert len(text) == 200 and len(set(text)) > 10
    for path, (s, (pl, (h, c)), t) in runs.items():
        assert t == text, path
        assert torch.equal(pl, p_logits) and torch.equal(h, ph) and torch.equal(c, pc), path
        for mine, ref in zip(s, steps, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(mine, ref, strict=True)), path
    # And a row's numbers do not depend on its batch: row 0 alone equals row 0 of 40.
    for logits, _, _ in steps[1:]:
        assert torch.equal(logits[0], steps[0][0][0])
