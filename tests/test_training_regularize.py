"""AWD-LSTM's regularisers (training/regularize.py): each changes training as it should and
only training; the saved, served and quantized network is unchanged; bad values are refused;
and ``training evaluate`` reports bits per UTF-8 byte."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from charrnn import CharRNN, ModelConfig, Vocabulary, load_checkpoint
from tests.conftest import StopAfter, make_text, tiny_cfg
from training import regularize
from training.__main__ import main
from training.evaluate import Window, utf8_bytes
from training.fit import fit
from training.outputs import last_path, metrics_path
from training.precision import Precision, TrainForward
from training.regularize import Regularizers, locked_dropout, rnn_weights

FP32 = Precision("fp32", "cpu", None, True, False, False)
BF16 = Precision("bf16", "cpu", torch.bfloat16, True, False, False)
EVERY = Regularizers(weight_drop=0.5, locked=True, char_dropout=0.2, ar=2.0, tar=1.0)
EVERY_FLAGS = ("--weight-drop", "0.5", "--locked-dropout", "--char-dropout", "0.2")
EVERY_FLAGS += ("--ar", "2", "--tar", "1")


def _model(dropout: float = 0.0, embed_dropout: float = 0.0, cell: str = "lstm") -> CharRNN:
    torch.manual_seed(0)
    vocab = Vocabulary.from_text(make_text(2000))
    cfg = ModelConfig(len(vocab), 32, 2, 8, dropout, cell, embed_dropout)  # type: ignore[arg-type]
    return CharRNN(cfg)


def _ids(model: CharRNN, batch: int = 3, steps: int = 20) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, steps))


def test_weight_drop_masks_only_weight_hh_and_only_in_training():
    rnn = _model().rnn
    names = rnn._flat_weights_names
    torch.manual_seed(1)
    dropped = dict(zip(names, rnn_weights(rnn, 0.5, training=True), strict=True))
    for name in names:
        raw = getattr(rnn, name)
        if name.startswith("weight_hh"):
            kept = dropped[name] != 0
            assert 0.4 < kept.float().mean() < 0.6  # DropConnect: single weights, p = 0.5
            torch.testing.assert_close(dropped[name][kept], raw[kept] * 2)  # scaled 1 / (1 - p)
        else:
            assert dropped[name] is raw
    plain = rnn_weights(rnn, 0.5, training=False)
    assert all(w is getattr(rnn, n) for n, w in zip(names, plain, strict=True))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_weight_drop_runs_the_fused_op_with_masked_weights_and_trains_the_raw_ones(
    cell, monkeypatch
):
    model = _model(cell=cell).train()
    seen: list[list[torch.Tensor]] = []
    real = regularize.rnn_weights
    monkeypatch.setattr(regularize, "rnn_weights", lambda *a: seen.append(real(*a)) or seen[-1])
    fwd = TrainForward(model, FP32, Regularizers(weight_drop=0.5))
    ids = _ids(model)
    logits, _ = fwd(ids, None)
    # The same network as nn.LSTM's own forward pass with those weights put in its place.
    masked = {n: w.detach() for n, w in zip(model.rnn._flat_weights_names, seen[0], strict=True)}
    out, _ = torch.func.functional_call(model.rnn, masked, (model.embed(ids),))
    torch.testing.assert_close(logits, model.head(out))
    logits.square().sum().backward()
    for name in model.rnn._flat_weights_names:
        grad = getattr(model.rnn, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
        if name.startswith("weight_hh"):  # no gradient through a dropped connection
            assert torch.all(grad[masked[name] == 0] == 0)
    assert list(model.state_dict()) == list(_model(cell=cell).state_dict())


def test_locked_dropout_draws_one_mask_per_sequence():
    x = torch.ones(4, 10, 16)
    y = locked_dropout(x, 0.5, training=True)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(y, y[:, :1].expand_as(y))  # the same at every time step
    assert not torch.equal(y[0], y[1])  # one per sequence
    assert locked_dropout(x, 0.5, training=False) is x


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_locked_dropout_runs_the_layers_one_by_one_as_the_same_network(cell):
    model = _model(cell=cell).train()  # dropout 0: the split stack must equal the fused one
    ids, state = _ids(model), model.init_state(3)
    want, want_state = TrainForward(model, FP32)(ids, state)
    got, got_state = TrainForward(model, FP32, Regularizers(locked=True))(ids, state)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_state, want_state, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("locked", [False, True])
def test_input_and_between_layer_masks_are_locked_only_when_asked(locked, monkeypatch):
    model = _model(dropout=0.5, embed_dropout=0.5).train()
    inputs: list[torch.Tensor] = []
    real = regularize._fused
    monkeypatch.setattr(regularize, "_fused", lambda r, x, *a: inputs.append(x) or real(r, x, *a))
    ids = torch.full((2, 12), 3)  # one character: its embedding is the same at every step
    TrainForward(model, FP32, Regularizers(locked=locked, weight_drop=0.1))(ids, None)
    assert len(inputs) == (2 if locked else 1)  # the layers one at a time when locked
    for x in inputs:
        zeros = x == 0
        same = torch.equal(zeros, zeros[:, :1].expand_as(zeros))
        assert same == locked and zeros.any()


def test_char_dropout_drops_whole_characters_in_training_only():
    model = _model().train()
    ids = torch.arange(model.config.vocab_size).repeat(2, 3)  # every character, 6 times
    torch.manual_seed(2)
    x = regularize.embed(model, ids, Regularizers(char_dropout=0.5))
    rows = model.embed(ids)
    dropped = (x == 0).all(-1)
    assert 0.2 < dropped.float().mean() < 0.8
    for c in range(model.config.vocab_size):  # a character is dropped everywhere or nowhere
        assert dropped[ids == c].all() or not dropped[ids == c].any()
    torch.testing.assert_close(x[~dropped], rows[~dropped] * 2)
    model.eval()
    assert torch.equal(regularize.embed(model, ids, Regularizers(char_dropout=0.5)), rows)


def test_ar_and_tar_add_their_terms_and_the_logged_loss_stays_cross_entropy():
    model = _model().train()
    ids, y = _ids(model), _ids(model)
    plain, _ = TrainForward(model, FP32)(ids, None, y)
    fwd = TrainForward(model, FP32, Regularizers(ar=2.0, tar=3.0))
    loss, _ = fwd(ids, None, y)
    out, _ = model.rnn(model.embed(ids))
    ar = out.pow(2).mean()
    tar = (out[:, 1:] - out[:, :-1]).pow(2).mean()
    torch.testing.assert_close(loss, plain + 2.0 * ar + 3.0 * tar)
    torch.testing.assert_close(fwd.penalty, (2.0 * ar + 3.0 * tar).detach())
    only_ar, _ = TrainForward(model, FP32, Regularizers(ar=2.0))(ids, None, y)
    torch.testing.assert_close(only_ar, plain + 2.0 * ar)


@pytest.mark.parametrize("precision", [FP32, BF16])
def test_eval_mode_is_the_saved_network_whatever_the_regularisers(precision):
    model = _model(dropout=0.3, embed_dropout=0.3).eval()
    ids, state = _ids(model), model.init_state(3)
    want, want_state = TrainForward(model, precision)(ids, state)
    got, got_state = TrainForward(model, precision, EVERY)(ids, state)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_state, want_state, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.e2e
def test_fit_with_every_regulariser_records_it_and_saves_the_served_network(
    corpus_file, tmp_path, capsys
):
    out = tmp_path / "m.pt"
    opts = {"weight_drop": 0.5, "locked_dropout": True, "char_dropout": 0.2, "ar": 2.0}
    result = fit(tiny_cfg(corpus_file, out, epochs=3, lr=1e-2, tar=1.0, **opts))
    ckpt = load_checkpoint(out)
    train = ckpt.meta["train"]
    assert {k: train[k] for k in opts} == opts and train["tar"] == 1.0
    plain = CharRNN(ckpt.model.config)
    assert ckpt.model.config == ModelConfig(len(ckpt.vocab), 32, 2, 8, 0.1)
    got, want = ckpt.model.state_dict(), plain.state_dict()
    assert list(got) == list(want) and all(got[k].shape == want[k].shape for k in want)
    records = [json.loads(line) for line in metrics_path(out).read_text().splitlines()]
    vals = [r["val_nll"] for r in records if "val_nll" in r]
    assert vals[-1] < vals[0] and result.best_val_nll == min(vals)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert all(math.isfinite(v) and v < 5 for v in losses)
    # The service's int8 decode step scores it as closely as any other checkpoint.
    args = ["evaluate", "--checkpoint", str(out), "--data", str(corpus_file), "--tail-frac", "0.05"]
    scores = {}
    for decode in ("fp32", "int8"):
        assert main([*args, "--decode", decode]) == 0
        scores[decode] = json.loads(capsys.readouterr().out)["nll"]
    assert scores["int8"] == pytest.approx(scores["fp32"], rel=2e-2)


@pytest.mark.e2e
def test_resume_with_regularisers_equals_uninterrupted(corpus_file, tmp_path):
    opts = {"weight_drop": 0.3, "locked_dropout": True, "char_dropout": 0.1, "ar": 1.0}
    whole, parts = tmp_path / "whole.pt", tmp_path / "parts.pt"
    total = fit(tiny_cfg(corpus_file, whole, epochs=2, **opts)).steps
    first = fit(tiny_cfg(corpus_file, parts, epochs=2, **opts), StopAfter(total // 2 + 1))
    assert first.interrupted
    assert fit(tiny_cfg(corpus_file, parts, epochs=2, resume=True, **opts)).steps == total
    a, b = load_checkpoint(last_path(whole)).model, load_checkpoint(last_path(parts)).model
    for (k, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(wa, wb), k


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--weight-drop", "1", "--weight-drop must be in [0, 1)"),
        ("--weight-drop", "-0.1", "--weight-drop must be in [0, 1)"),
        ("--char-dropout", "1.5", "--char-dropout must be in [0, 1)"),
        ("--ar", "-1", "--ar must be a finite number >= 0"),
        ("--tar", "nan", "--tar must be a finite number >= 0"),
        ("--tar", "inf", "--tar must be a finite number >= 0"),
    ],
)
def test_bad_regulariser_values_are_refused_in_one_line(
    flag, value, message, corpus_file, tmp_path, capsys
):
    out = tmp_path / "m.pt"
    argv = ["fit", "--data", str(corpus_file), "--out", str(out), "--quiet", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not out.exists()


def test_utf8_bytes_counts_the_predicted_characters():
    text = "a\u00e9\u2014b\U0001f600c"
    vocab = Vocabulary.from_text(text)
    ids = np.array(vocab.encode(text))
    assert utf8_bytes(vocab.chars, ids, [Window(0, 0, len(ids) - 1)]) == len(text[1:].encode())
    assert utf8_bytes(vocab.chars, ids, [Window(1, 1, 2), Window(3, 0, 1)]) == 3 + 1 + 4


def test_evaluate_reports_bits_per_byte(tmp_path, capsys, tiny_checkpoint):
    vocab = load_checkpoint(tiny_checkpoint).vocab
    text = make_text(500)
    data = tmp_path / "t.txt"
    data.write_text(text, encoding="utf-8")
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(data)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["chars"] == len(vocab.encode(text)) - 1 and got["bytes"] == len(text[1:].encode())
    assert got["bits_per_byte"] == pytest.approx(got["bpc"] * got["chars"] / got["bytes"])
    assert got["bpc"] == pytest.approx(got["nll"] / math.log(2))
