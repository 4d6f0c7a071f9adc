import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bench.notebook import get_batches as notebook_get_batches
from charrnn import Vocabulary, load_checkpoint
from tests.conftest import StopAfter, tiny_cfg, tiny_fit_args
from training.__main__ import main
from training.data import encode, make_batches
from training.fit import fit
from training.outputs import curve_path, last_path, metrics_path


def test_batches_are_shifted_streams_like_the_notebook(corpus_text):
    vocab = Vocabulary.from_text(corpus_text)
    ids = torch.from_numpy(encode(vocab, corpus_text).astype(np.int64))
    b = make_batches(ids, 8, 50)
    assert b.n_batches == (len(ids) - 1) // 400
    x0, y0 = b[0]
    assert x0.shape == y0.shape == (8, 50)
    # Targets are the inputs shifted one character forward, across batch boundaries too.
    x1, _ = b[1]
    assert torch.equal(y0[:, :-1], x0[:, 1:])
    assert torch.equal(y0[:, -1], x1[:, 0])
    # Each row continues the same contiguous stream of the text.
    row_len = b.n_batches * 50
    row3 = torch.cat([b[i][0][3] for i in range(b.n_batches)])
    assert torch.equal(row3, ids[3 * row_len : 4 * row_len])
    # Same windows as the notebook's generator (whose last target wraps; ours does not).
    arr = ids.numpy()[: b.n_batches * 400 + 1]
    for i, (nx, ny) in enumerate(notebook_get_batches(arr[:-1], 8, 50)):
        x, y = b[i]
        assert np.array_equal(x.numpy(), nx)
        assert np.array_equal(y.numpy()[:, :-1], ny[:, :-1])


def test_ddp_ranks_take_disjoint_rows(corpus_text):
    ids = encode(Vocabulary.from_text(corpus_text), corpus_text)
    full = make_batches(ids, 8, 25)
    r0, r1 = make_batches(ids, 8, 25, 0, 2), make_batches(ids, 8, 25, 1, 2)
    for i in range(full.n_batches):
        assert torch.equal(r0[i][0], full[i][0][0::2]) and torch.equal(r1[i][1], full[i][1][1::2])


@pytest.mark.e2e
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_short_fit_lowers_validation_nll_and_writes_outputs(corpus_file, tmp_path, precision):
    out = tmp_path / "m.pt"
    result = fit(tiny_cfg(corpus_file, out, epochs=4, lr=1e-2, precision=precision))
    records = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    vals = [r["val_nll"] for r in records if "val_nll" in r]
    assert len(vals) == 4
    assert vals[-1] < vals[0] - 0.3
    assert result.best_val_nll == min(vals)
    assert any("train_loss" in r and "chars_per_s" in r for r in records)
    assert curve_path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = load_checkpoint(out)
    m = ckpt.meta["metrics"]
    assert m["best_val_nll"] == pytest.approx(min(vals))
    assert m["best_val_bpc"] == pytest.approx(min(vals) / math.log(2))
    assert len(m["corpus_sha256"]) == 64 and m["steps"] > 0 and m["wall_time_s"] > 0
    assert ckpt.meta["train"]["hidden"] == 32 and ckpt.meta["train"]["precision"] == precision
    # Mixed precision changes the arithmetic, not what is stored.
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    assert load_checkpoint(last_path(out)).extra["resume"]["progress"]["epoch"] == 4


@pytest.mark.parametrize(
    ("schedule", "ema", "precision"),
    [("onecycle", None, "fp32"), ("constant", 0.9, "fp32"), ("onecycle", None, "bf16")],
)
@pytest.mark.e2e
def test_interrupt_and_resume_equals_uninterrupted(corpus_file, tmp_path, schedule, ema, precision):
    whole = tmp_path / "whole.pt"
    parts = tmp_path / "parts.pt"
    opts = {"schedule": schedule, "ema": ema, "precision": precision}
    total = fit(tiny_cfg(corpus_file, whole, **opts)).steps
    per_epoch = total // 3
    first = fit(tiny_cfg(corpus_file, parts, **opts), StopAfter(per_epoch + 3))
    assert first.interrupted and first.steps == per_epoch + 3  # mid-epoch
    second = fit(tiny_cfg(corpus_file, parts, **opts, resume=True))
    assert not second.interrupted and second.steps == total
    a, b = load_checkpoint(last_path(whole)).model, load_checkpoint(last_path(parts)).model
    for (k, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(wa, wb), k
    assert load_checkpoint(whole).meta["metrics"]["best_val_nll"] == pytest.approx(
        load_checkpoint(parts).meta["metrics"]["best_val_nll"]
    )


@pytest.mark.e2e
def test_early_stopping(corpus_file, tmp_path):
    # A huge learning rate makes validation worse after the first epoch.
    result = fit(tiny_cfg(corpus_file, tmp_path / "m.pt", epochs=20, lr=0.5, clip=100, patience=2))
    assert result.stopped_early and result.epochs < 20


@pytest.mark.e2e
def test_evaluate_matches_hand_computation(corpus_file, tmp_path, capsys):
    out = tmp_path / "m.pt"
    fit(tiny_cfg(corpus_file, out, epochs=1))
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out),
                "--data",
                str(corpus_file),
                "--tail-frac",
                "0.05",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    ckpt = load_checkpoint(out)
    text = corpus_file.read_text()
    tail = text[len(text) - int(len(text) * 0.05) :]
    ids = ckpt.vocab.encode(tail)
    total, state = 0.0, None
    with torch.no_grad():
        for prev, nxt in itertools.pairwise(ids):
            logits, state = ckpt.model(torch.tensor([[prev]]), state)
            total -= torch.log_softmax(logits[0, 0].double(), -1)[nxt].item()
    assert got["chars"] == len(ids) - 1
    assert got["nll"] == pytest.approx(total / (len(ids) - 1), rel=1e-4)
    assert got["bpc"] == pytest.approx(got["nll"] / math.log(2))
    # Through the serving step: fp32 equals the forward pass, int8 stays close to it.
    for decode, rel in (("fp32", 1e-4), ("int8", 2e-2)):
        args = ["evaluate", "--checkpoint", str(out), "--data", str(corpus_file)]
        assert main([*args, "--tail-frac", "0.05", "--decode", decode]) == 0
        stepped = json.loads(capsys.readouterr().out)
        assert stepped["chars"] == got["chars"]
        assert stepped["nll"] == pytest.approx(got["nll"], rel=rel)


@pytest.mark.e2e
def test_sample_cli(corpus_file, tmp_path, capsys):
    out = tmp_path / "m.pt"
    fit(tiny_cfg(corpus_file, out, epochs=1))
    args = [
        "sample",
        "--checkpoint",
        str(out),
        "--prime",
        "Alice",
        "--length",
        "40",
        "--top-k",
        "5",
        "--seed",
        "7",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("Alice") and len(first.rstrip("\n")) == 45


BAD_CLI = [
    (["fit", "--data", "{missing}", "--out", "{out}"], "data file not found"),
    (["fit", "--data", "{empty}", "--out", "{out}"], "data file is empty"),
    (["fit", "--data", "{latin1}", "--out", "{out}"], "not valid UTF-8"),
    (["fit", "--data", "{short}", "--out", "{out}"], "text too short for one batch"),
    (["fit", "--data", "{corpus}", "--out", "{out}", "--lr", "-1"], "--lr must be"),
    (["fit", "--data", "{corpus}", "--out", "{out}", "--val-frac", "1.5"], "--val-frac must"),
    (["fit", "--data", "{corpus}", "--out", "{out}", "--hidden", "0"], "--hidden must"),
    (["fit", "--data", "{corpus}", "--out", "{out}", "--dropout", "1"], "--dropout must"),
    (["fit", "--data", "{corpus}", "--out", "/proc/m.pt"], "cannot write to output directory"),
    (["fit", "--data", "{corpus}", "--out", "{tmp}"], "output path is a directory"),
    (
        ["fit", "--data", "{corpus}", "--out", "{out}", "--batch-size", "8", "--resume"],
        "cannot resume",
    ),
    (["evaluate", "--checkpoint", "{missing}", "--data", "{corpus}"], "file not found"),
    (["sample", "--checkpoint", "{ckpt}", "--prime", "Zebra\u2603"], "'\u2603' at position 5"),
    (["sample", "--checkpoint", "{ckpt}", "--length", "0"], "--length must be"),
    (["sample", "--checkpoint", "{ckpt}", "--top-p", "2"], "top_p must be"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_CLI)
def test_bad_cli_input_gives_one_clear_line(
    argv, message, corpus_file, tmp_path, capsys, tiny_checkpoint
):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "short.txt").write_text("abc def")
    names = {
        "missing": tmp_path / "nope.txt",
        "empty": tmp_path / "empty.txt",
        "latin1": tmp_path / "latin1.txt",
        "short": tmp_path / "short.txt",
        "corpus": corpus_file,
        "out": tmp_path / "m.pt",
        "tmp": tmp_path,
        "ckpt": tiny_checkpoint,
    }
    argv = [a.format(**names) for a in argv] + (["--quiet"] if argv[0] == "fit" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err
    assert not (tmp_path / "m.pt").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "training", *args]


@pytest.mark.e2e
@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint(corpus_file, tmp_path):
    out = tmp_path / "m.pt"

    def args(epochs: int, *more: str) -> list[str]:
        return _cli(*tiny_fit_args(corpus_file, out, epochs, *more))

    proc = subprocess.Popen(
        args(400), stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.monotonic() + 60
    while not (metrics_path(out).exists() and "val_nll" in metrics_path(out).read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "resumable checkpoint saved" in err
    saved = load_checkpoint(last_path(out)).extra["resume"]["progress"]
    per_epoch = saved["step"] // max(saved["epoch"], 1) if saved["batch"] == 0 else None
    assert saved["step"] > 0
    # --resume with fewer total epochs finishes at once from where it stopped.
    done = subprocess.run(
        args(saved["epoch"] + 1, "--resume"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)["steps"]
    assert steps > saved["step"]
    if per_epoch:
        assert steps == (saved["epoch"] + 1) * per_epoch


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_two_process_ddp(corpus_file, tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "training",
        *tiny_fit_args(corpus_file, out, 2, "--device", "cpu"),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = load_checkpoint(out)
    assert ckpt.meta["metrics"]["world_size"] == 2
    single = make_batches(torch.zeros(5400, dtype=torch.long), 8, 25).n_batches
    assert ckpt.meta["metrics"]["steps"] == 2 * single
    # Only rank 0 writes: one metrics line per record, not two.
    lines = metrics_path(out).read_text().splitlines()
    assert sum("val_nll" in line for line in lines) == 2
