"""--precision: what runs on each device (CPU tests of the policy and the split forward pass),
and on a CUDA machine (bench/gpu_check.sh) the LSTM's dtype, a few hundred steps with a
finite, falling loss, and resume, for each precision."""

from __future__ import annotations

import json

import pytest
import torch

from charrnn import Vocabulary, load_checkpoint
from tests.conftest import make_text, tiny_model
from training import precision
from training.__main__ import main
from training.config import FitConfig
from training.errors import TrainingError
from training.fit import Trainer, fit
from training.outputs import last_path, metrics_path
from training.precision import Precision, TrainForward

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rnn_out_dtype(forward: TrainForward, ids: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(the LSTM's output dtype, the logits' dtype) of one forward pass."""
    seen: list[torch.dtype] = []
    hook = forward.model.rnn.register_forward_hook(lambda _m, _i, out: seen.append(out[0].dtype))
    try:
        logits, _ = forward(ids, None)
    finally:
        hook.remove()
    return seen[0], logits.dtype


def test_cpu_policies_say_what_runs():
    cpu = torch.device("cpu")
    fp32, bf16 = precision.resolve("fp32", cpu), precision.resolve("bf16", cpu)
    assert fp32.autocast is None and fp32.rnn_dtype() == torch.float32 and not fp32.grad_scaler
    # On a CPU, oneDNN runs the LSTM in bf16 under autocast (bf16 has fp32's exponent range).
    assert bf16.autocast == torch.bfloat16 and bf16.rnn_dtype() == torch.bfloat16
    assert bf16.rnn_dtype("gru") == torch.float32  # CPU autocast has no bf16 GRU
    assert bf16.describe() == "bf16 on cpu: embedding/head bf16, LSTM bf16; weights fp32"
    for name in ("tf32", "fp16"):
        with pytest.raises(TrainingError, match=f"--precision {name} needs CUDA"):
            precision.resolve(name, cpu)


def test_cuda_policies_keep_the_lstm_out_of_bf16_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    got = {n: precision.resolve(n, CUDA) for n in precision.PRECISIONS}
    assert not got["fp32"].tf32 and got["tf32"].tf32  # TF32 only when asked for
    assert got["bf16"].autocast == torch.bfloat16 and not got["bf16"].rnn_autocast
    assert got["bf16"].rnn_dtype() == torch.float32 and got["bf16"].tf32
    assert got["fp16"].rnn_dtype() == torch.float16 and got["fp16"].grad_scaler
    assert not any(got[n].grad_scaler for n in ("fp32", "tf32", "bf16"))
    assert got["bf16"].describe() == ("bf16 on cuda: embedding/head bf16, LSTM tf32; weights fp32")
    assert got["fp16"].describe().endswith("LSTM fp16, GradScaler; weights fp32")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(TrainingError, match="no bf16"):
        precision.resolve("bf16", CUDA)


def test_tf32_is_an_explicit_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        precision.resolve("tf32", CUDA).apply_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        precision.resolve("fp32", CUDA).apply_tf32()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_split_forward_runs_the_rnn_in_fp32_and_matches_the_model(cell):
    """The CUDA bf16 path (LSTM outside autocast), exercised with the CPU's autocast."""
    vocab = Vocabulary.from_text(make_text(2000))
    model = tiny_model(vocab, cell=cell)
    ids = torch.randint(0, len(vocab), (3, 20))
    split = TrainForward(model, Precision("bf16", "cpu", torch.bfloat16, False, False, False))
    whole = TrainForward(model, Precision("bf16", "cpu", torch.bfloat16, True, False, False))
    assert _rnn_out_dtype(split, ids) == (torch.float32, torch.bfloat16)
    assert _rnn_out_dtype(whole, ids) == (whole.precision.rnn_dtype(cell), torch.bfloat16)
    state = model.init_state(3)
    fp32 = TrainForward(model, Precision("fp32", "cpu", None, True, False, False))
    want, want_state = model(ids, state)
    got, got_state = fp32(ids, state)
    assert torch.equal(got, want) and all(map(torch.equal, got_state, want_state))
    near, near_state = split(ids, state)
    torch.testing.assert_close(near.float(), want, atol=0.05, rtol=0.05)
    for a, b in zip(near_state, want_state, strict=True):
        torch.testing.assert_close(a, b)  # the recurrence itself is fp32: exact inputs aside
        assert a.dtype == torch.float32


def test_fp16_on_a_cpu_is_refused_in_one_line(corpus_file, tmp_path, capsys):
    args = ["fit", "--data", str(corpus_file), "--out", str(tmp_path / "m.pt"), "--quiet"]
    assert main([*args, "--precision", "fp16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --precision fp16 needs CUDA; on a CPU use fp32 or bf16\n"


# -- on a GPU (bench/gpu_check.sh) ---------------------------------------------------------------


def _cuda_cfg(tmp_path, name: str, **more) -> FitConfig:
    data = tmp_path / "t.txt"
    if not data.exists():
        data.write_text(make_text(120_000), encoding="utf-8")
    opts = {"hidden": 128, "embed": 16, "batch_size": 32, "seq_len": 64, "lr": 3e-3}
    return FitConfig(
        data=data,
        out=tmp_path / f"{name}.pt",
        device="cuda",
        precision=name,  # type: ignore[arg-type]
        dropout=0.1,
        progress=False,
        **{**opts, **more},
    )


@needs_cuda
@pytest.mark.parametrize(
    ("name", "rnn", "logits"),
    [
        ("fp32", torch.float32, torch.float32),
        ("tf32", torch.float32, torch.float32),
        ("bf16", torch.float32, torch.bfloat16),
        ("fp16", torch.float16, torch.float16),
    ],
)
def test_cuda_lstm_dtype_per_precision(tmp_path, name, rnn, logits):
    trainer = Trainer(_cuda_cfg(tmp_path, name, epochs=1))
    x, _ = trainer.batches[0]
    assert _rnn_out_dtype(trainer.net, x) == (rnn, logits)  # type: ignore[arg-type]
    assert torch.backends.cudnn.allow_tf32 == (name in ("tf32", "bf16"))
    assert torch.backends.cuda.matmul.allow_tf32 == (name in ("tf32", "bf16"))


@needs_cuda
@pytest.mark.parametrize("name", precision.PRECISIONS)
def test_cuda_few_hundred_steps_finite_falling_loss_and_resume(tmp_path, name):
    whole = fit(_cuda_cfg(tmp_path, name, max_steps=300, epochs=100, eval_every=100))
    assert whole.steps == 300
    records = [
        json.loads(x) for x in metrics_path(tmp_path / f"{name}.pt").read_text().splitlines()
    ]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.8  # falling
    assert whole.best_val_nll < 2.6
    # Interrupted at step 150 and resumed, it finishes where the whole run did.
    part = _cuda_cfg(tmp_path, name, max_steps=150, epochs=100, eval_every=100)
    part.out = tmp_path / f"{name}-part.pt"
    fit(part)
    part.max_steps, part.resume = 300, True
    resumed = fit(part)
    assert resumed.steps == 300
    saved = load_checkpoint(last_path(part.out)).extra["resume"]
    assert (saved["scaler"] is not None) == (name == "fp16")
    a = load_checkpoint(last_path(tmp_path / f"{name}.pt")).model.state_dict()
    b = load_checkpoint(last_path(part.out)).model.state_dict()
    for k in a:  # cuDNN's kernels may differ in the last bits between runs
        torch.testing.assert_close(a[k], b[k], atol=2e-2, rtol=0), k
