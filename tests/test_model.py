import os
import shutil
import subprocess
import sys

import pytest
import torch

from charrnn import Vocabulary, native
from charrnn.decode import StepDecoder
from charrnn.model import CharRNN
from tests.conftest import run_python, tiny_model
from tests.server import ROOT

# The int8 step and prime run native (C++) for an LSTM where a compiler or a prebuilt library
# is at hand, else op by op (the eager reference): the int8 tests run both.
KERNELS = [pytest.param(True, id="native"), pytest.param(False, id="eager")]


def int8_decoder(model: CharRNN, native_kernels: bool) -> StepDecoder:
    decoder = StepDecoder(model, "int8", native_kernels=native_kernels)
    if native_kernels and model.config.cell == "lstm" and decoder.kernels != "native":
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    return decoder


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_shapes_and_state_carry(cell):
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, cell)
    ids = torch.randint(0, 8, (3, 11))
    logits, state = model(ids)
    assert logits.shape == (3, 11, 8)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert state[0].shape == (2, 3, 32)
    # Running in two halves with the carried state equals one pass.
    l1, s1 = model(ids[:, :5])
    l2, _ = model(ids[:, 5:], s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits)


@pytest.mark.parametrize(
    "weights,native_kernels", [("fp32", True), ("fp32", False), ("int8", True), ("int8", False)]
)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_step_matches_forward(cell, weights, native_kernels):
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, cell, seed=3)
    if weights == "int8":
        decoder = int8_decoder(model, native_kernels)
    else:
        decoder = StepDecoder(model, weights, native_kernels=native_kernels)
    ids = torch.randint(0, 8, (4, 6))
    full, _ = model(ids)
    _, state = model(ids[:, :1])
    # int8 is an approximation: close, not equal.
    tol = 3e-2 if weights == "int8" else 1e-5
    for t in range(1, 6):
        logits, state = decoder.step(ids[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=tol, rtol=tol)


@pytest.mark.parametrize("native_kernels", KERNELS)
@pytest.mark.parametrize("hidden", [32, 40, 256])
def test_int8_step_rows_do_not_depend_on_their_neighbours(hidden, native_kernels):
    vocab = Vocabulary("abcdefgh")
    decoder = int8_decoder(tiny_model(vocab, seed=5, hidden=hidden), native_kernels)
    torch.manual_seed(0)
    n = 70
    ids = torch.randint(0, 8, (n,))
    state = (torch.randn(2, n, hidden).tanh(), torch.randn(2, n, hidden))
    alone = [decoder.step(ids[i : i + 1], tuple(s[:, i : i + 1] for s in state)) for i in range(n)]
    # Every row, in batches of every size from 1 to 70 (kernels block rows differently).
    for b in range(1, n + 1):
        logits, (h, c) = decoder.step(ids[:b], tuple(s[:, :b] for s in state))
        for i in range(b):
            assert torch.equal(logits[i], alone[i][0][0]), (b, i)
            assert torch.equal(h[:, i], alone[i][1][0][:, 0]), (b, i)
            assert torch.equal(c[:, i], alone[i][1][1][:, 0]), (b, i)


@pytest.mark.parametrize("native_kernels", KERNELS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_int8_prime_pass_equals_stepping_bit_for_bit(cell, native_kernels):
    """The layer-at-a-time prime pass is an optimisation, not an approximation: the state it
    leaves is exactly the one of feeding the prime through the step one character at a time."""
    vocab = Vocabulary("abcdefgh")
    decoder = int8_decoder(tiny_model(vocab, cell, seed=7, hidden=40), native_kernels)
    ids = torch.randint(0, 8, (37,), generator=torch.Generator().manual_seed(1))  # 3 chunks
    logits, state = decoder.prime(ids)
    stepped = decoder.model.init_state(1)
    for i in ids:
        want, stepped = decoder.step(i[None], stepped)
    assert torch.equal(logits, want)
    for got, exp in zip(state, stepped, strict=True):
        assert torch.equal(got, exp)
    # And it stays close to the fp32 model on the whole sequence.
    full, _ = decoder.model(ids[None])
    torch.testing.assert_close(logits[0], full[0, -1], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    ("weights", "cell", "native_kernels"),
    [
        ("int8", "lstm", True),
        ("int8", "lstm", False),
        ("int8", "gru", False),
        ("fp32", "lstm", True),
        ("fp32", "gru", True),
    ],
)
def test_a_prime_in_parts_equals_the_whole_prime_bit_for_bit(weights, cell, native_kernels):
    """The service primes long prompts in parts, each continued from the state the last left
    (app/engine/loop.py): the logits and state must be exactly those of one pass, wherever the
    cuts fall, or a request's text would depend on how busy the server was."""
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, cell, seed=5, hidden=40)
    if weights == "int8":
        decoder = int8_decoder(model, native_kernels)
        cutting = ([1], [16, 17], [5, 40, 41, 74], [*range(1, 75)])
    else:  # fp32 in fixed blocks: cuts at their edges
        decoder = StepDecoder(model, "fp32")
        decoder._fp32_align = 8
        cutting = ([8], [16, 24], [8, 40, 72], [*range(8, 75, 8)])
    ids = torch.randint(0, 8, (75,), generator=torch.Generator().manual_seed(3))
    want_logits, want_state = decoder.prime(ids)
    for cuts in cutting:
        assert all(cut % decoder.prime_align == 0 for cut in cuts)
        state = None
        for a, b in zip([0, *cuts], [*cuts, 75], strict=True):
            logits, state = decoder.prime(ids[a:b], state)
        assert torch.equal(logits, want_logits), cuts
        for got, exp in zip(state, want_state, strict=True):
            assert torch.equal(got, exp), cuts


def test_fp32_prime_is_the_model_on_the_whole_sequence():
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, seed=2)
    ids = torch.randint(0, 8, (9,))
    logits, (h, c) = StepDecoder(model).prime(ids)
    with torch.inference_mode():
        full, (fh, fc) = model(ids[None])
    assert torch.equal(logits, full[:, -1]) and torch.equal(h, fh) and torch.equal(c, fc)
    # A copy of the last position, not a view that keeps all [1, T, V] alive in the cache.
    assert logits.untyped_storage().nbytes() == logits.numel() * logits.element_size()


def test_native_kernels_build_wherever_there_is_a_compiler():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: the decoder runs the eager reference kernels")
    assert native.load()
    model = tiny_model(Vocabulary("abcdefgh"))
    assert StepDecoder(model, "int8").kernels == "native"
    assert StepDecoder(model, "int8", native_kernels=False).kernels == "eager"
    assert StepDecoder(model, "fp32").kernels == "native"
    assert StepDecoder(tiny_model(Vocabulary("abcdefgh"), "gru"), "int8").kernels == "eager"


def test_native_kernels_agree_with_the_eager_reference():
    """Same weights and quantization, a different tanh: the same logits to ~1e-5."""
    vocab = Vocabulary("abcdefgh")
    model = tiny_model(vocab, seed=11, hidden=64)
    fast = int8_decoder(model, True)
    reference = StepDecoder(model, "int8", native_kernels=False)
    ids = torch.randint(0, 8, (50,), generator=torch.Generator().manual_seed(3))
    (got, got_state), (want, want_state) = fast.prime(ids), reference.prime(ids)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    for a, b in zip(got_state, want_state, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    step_ids = torch.randint(0, 8, (5,))
    state = (torch.randn(2, 5, 64).tanh(), torch.randn(2, 5, 64))
    torch.testing.assert_close(
        fast.step(step_ids, state)[0], reference.step(step_ids, state)[0], atol=2e-3, rtol=0
    )


def test_native_kernels_refuse_bad_arguments_with_a_message():
    decoder = int8_decoder(tiny_model(Vocabulary("abcdefgh"), hidden=16), True)
    state = decoder.model.init_state(2)
    mats = [m.float() for m in decoder.packed.mats]  # fp32 weights with int8 scales
    with pytest.raises(RuntimeError, match="fp32 weights take no scales"):
        torch.ops.charrnn.lstm_step(
            torch.zeros(2, dtype=torch.long),
            *state,
            decoder.packed.table0,
            mats,
            decoder.packed.scales,
            decoder.packed.biases,
        )
    mixed = [*decoder.packed.mats[:-1], mats[-1]]  # an fp32 head after int8 layers
    with pytest.raises(RuntimeError, match="the head's weight must be a contiguous int8"):
        torch.ops.charrnn.lstm_step(
            torch.zeros(2, dtype=torch.long),
            *state,
            decoder.packed.table0,
            mixed,
            decoder.packed.scales,
            decoder.packed.biases,
        )
    with pytest.raises(RuntimeError, match="ids must be"):
        torch.ops.charrnn.lstm_step(
            torch.zeros(3, dtype=torch.long),
            *state,
            decoder.packed.table0,
            decoder.packed.mats,
            decoder.packed.scales,
            decoder.packed.biases,
        )
    with pytest.raises(IndexError, match="out of range"):
        decoder.prime(torch.tensor([0, 99]))
    ids = torch.arange(7) % 8
    args = (
        ids,
        decoder.packed.table0,
        decoder.packed.inputs,
        decoder.packed.recurrent,
        decoder.packed.scales[:2],
    )
    with pytest.raises(RuntimeError, match=r"biases\[0\] must be empty"):
        torch.ops.charrnn.lstm_prime(*args, [torch.ones(64), decoder.packed.biases[1]], 4)
    # A chunk longer than the prime is the whole prime (no overflow in the chunk count).
    whole = torch.ops.charrnn.lstm_prime(*args, decoder.packed.biases[:2], 7)
    huge = torch.ops.charrnn.lstm_prime(*args, decoder.packed.biases[:2], 2**62)
    assert all(torch.equal(a, b) for a, b in zip(whole, huge, strict=True))


def _rows(n: int, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """Sampling settings for ``n`` rows: temperature, top_k, top_p, seeds (int64)."""
    g = torch.Generator().manual_seed(n)
    return (
        torch.rand(n, generator=g) + 0.5,
        torch.randint(4, vocab_size + 1, (n,), generator=g),
        torch.rand(n, generator=g) * 0.3 + 0.7,
        torch.randint(0, 2**62, (n,), generator=g),
    )


@pytest.mark.parametrize("weights", ["int8", "fp32"])
@torch.inference_mode()
def test_native_decode_equals_sampling_then_stepping_however_split(weights):
    """``decode`` of many characters per call gives, bit for bit, the ids, logits and state of
    sampling (with the uniforms of charrnn.sampling) and stepping one character at a time,
    whichever way the characters are split into calls, and a row's ids alone or in a batch."""
    import numpy as np

    from charrnn.sampling import uniforms

    vocab = Vocabulary("abcdefgh")
    decoder = int8_decoder(tiny_model(vocab, seed=9, hidden=40), True)
    if weights == "fp32":
        decoder = StepDecoder(decoder.model, "fp32")
    assert decoder.kernels == "native"
    n, steps = 5, 30
    temperature, top_k, top_p, seeds = _rows(n, 8)
    logits0, state0 = decoder.prime(torch.tensor([1, 2, 3]))
    logits0, state0 = logits0.expand(n, 8).contiguous(), tuple(s.repeat(1, n, 1) for s in state0)
    logits, state, want = logits0, state0, []
    for pos in range(steps):
        positions = np.full(n, pos, dtype=np.uint64)
        u = torch.from_numpy(uniforms(seeds.numpy().astype(np.uint64), positions))
        ids = decoder.sample(logits, temperature, top_k, top_p, u)
        want.append(ids)
        logits, state = decoder.step(ids, state)
    want = torch.stack(want)
    assert len(set(map(tuple, want.t().tolist()))) == n  # the rows differ
    for split in ([steps], [1, 7, 22], [1] * steps):
        got, lg, st, done = [], logits0, state0, 0
        for k in split:
            ids, lg, st = decoder.decode(
                lg, st, temperature, top_k, top_p, seeds, torch.full((n,), done), k
            )
            got.append(ids)
            done += k
        assert torch.equal(torch.cat(got), want), split
        assert torch.equal(lg, logits) and all(map(torch.equal, st, state))
    row = slice(3, 4)
    alone, _, _ = decoder.decode(
        logits0[row],
        tuple(s[:, row] for s in state0),
        temperature[row],
        top_k[row],
        top_p[row],
        seeds[row],
        torch.zeros(1, dtype=torch.long),
        steps,
    )
    assert torch.equal(alone[:, 0], want[:, 3])


def test_native_decode_refuses_bad_arguments_with_a_message():
    decoder = int8_decoder(tiny_model(Vocabulary("abcdefgh"), hidden=16), True)
    temperature, top_k, top_p, seeds = _rows(2, 8)
    logits, state = torch.zeros(2, 8), decoder.model.init_state(2)
    positions = torch.zeros(2, dtype=torch.long)
    args = (temperature, top_k, top_p)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="steps must be >= 1"):
            decoder.decode(logits, state, *args, seeds, positions, 0)
        with pytest.raises(RuntimeError, match="seeds must be a Long CPU vector of 2 rows"):
            decoder.decode(logits, state, *args, seeds.double(), positions, 3)
        with pytest.raises(RuntimeError, match="positions must be a Long CPU vector of 2"):
            decoder.decode(logits, state, *args, seeds, positions[:1], 3)
        with pytest.raises(RuntimeError, match="ids must be"):  # the step's own checks
            decoder.decode(logits, decoder.model.init_state(3), *args, seeds, positions, 3)


@pytest.mark.e2e
def test_native_prime_runs_from_inside_the_inter_op_pool(tmp_path):
    """The prime hands layers to torch's inter-op pool; called from one of that pool's own
    threads (here a TorchScript fork with a pool of one), it must not wait on itself."""
    if not native.load():
        pytest.skip("the native kernels are not available here (no C++ compiler)")
    code = """
import torch
torch.set_num_interop_threads(1)
from torch import Tensor
from charrnn import Vocabulary
from charrnn.decode import StepDecoder
from tests.conftest import tiny_model

def prime(ids: Tensor, table0: Tensor, inputs: list[Tensor], recurrent: list[Tensor],
          scales: list[Tensor], biases: list[Tensor]) -> tuple[Tensor, Tensor]:
    return torch.ops.charrnn.lstm_prime(ids, table0, inputs, recurrent, scales, biases, 4)

def in_pool(ids: Tensor, table0: Tensor, inputs: list[Tensor], recurrent: list[Tensor],
            scales: list[Tensor], biases: list[Tensor]) -> tuple[Tensor, Tensor]:
    return torch.jit.wait(torch.jit.fork(prime, ids, table0, inputs, recurrent, scales, biases))

d = StepDecoder(tiny_model(Vocabulary("abcdefgh"), hidden=24), "int8")
assert d.kernels == "native"
w = d.packed
args = (torch.arange(30) % 8, w.table0, w.inputs, w.recurrent, w.scales[:2], w.biases[:2])
with torch.inference_mode():
    got, want = torch.jit.script(in_pool)(*args), prime(*args)
print(all(torch.equal(a, b) for a, b in zip(got, want)), flush=True)
import os; os._exit(0)  # skip teardown: after torch.jit.fork it sometimes aborts (PyTorch)
"""
    assert run_python(tmp_path, code).stdout.strip() == "True"


@pytest.mark.e2e
@pytest.mark.slow
def test_native_build_is_shared_by_concurrent_processes(tmp_path):
    """Two processes starting together on an empty cache build the library once between
    them and both run it; a lock file left by a killed build blocks nothing."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    (tmp_path / f"{native.library_name()}.lock").touch()
    code = "from charrnn import native; print(native.load())"
    env = {**os.environ, "CHARRNN_NATIVE_DIR": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    assert [p.communicate(timeout=240)[0].strip() for p in procs] == ["True", "True"]
    libraries = [p.name for p in tmp_path.iterdir() if p.suffix == ".so"]
    assert libraries == [f"{native.library_name()}.so"]
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no build folder left behind


@pytest.mark.e2e
def test_without_a_compiler_the_decoder_says_so_and_runs_the_eager_reference(tmp_path):
    """A machine without a C++ compiler (and no prebuilt library) still decodes."""
    code = (
        "import torch\n"
        "from charrnn import Vocabulary\n"
        "from charrnn.decode import StepDecoder\n"
        "from tests.conftest import tiny_model\n"
        "d = StepDecoder(tiny_model(Vocabulary('abcdefgh')), 'int8')\n"
        "logits, _ = d.prime(torch.tensor([1, 2, 3]))\n"
        "print(d.kernels, tuple(logits.shape), flush=True)\n"
        # Known PyTorch flake, not ours to test: after torch.jit.fork (the eager int8
        # prime's wavefront) the interpreter's teardown sometimes aborts ("terminate called
        # without an active exception"). Leave before it.
        "import os; os._exit(0)\n"
    )
    out = run_python(tmp_path, code, CXX="/bin/false", CHARRNN_NATIVE_DIR=str(tmp_path))
    assert out.stdout.split() == ["eager", "(1,", "8)"]
    assert "native LSTM kernels unavailable" in out.stderr
