"""Continued training (``fit --init-from``): the grown vocabulary keeps the parent's ids and
rows, the new characters' rows start as training/finetune.py says, an incompatible checkpoint
is refused in one line, a run resumes exactly, and the result serves (in-process) and decodes
in int8 like any model. The texts are made here: a parent's and a new one with characters the
parent lacks."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from charrnn import SamplingParams, Vocabulary, load_checkpoint, save_checkpoint
from charrnn.generate import generate
from charrnn.textindex import TextIndex, index_path
from tests.conftest import Client, StopAfter, make_text, run, tiny_cfg, tiny_model
from training.__main__ import main
from training.errors import TrainingError
from training.finetune import CALIBRATION_CHARS
from training.fit import Trainer, fit
from training.outputs import last_path

NEW = "@Zz24é"  # what the new text adds (sorted)


def new_text(n: int = 6000) -> str:
    """Another text of the same kind, with characters the parent's lacks."""
    text = make_text(n, seed=1).replace("a", "@", 40).replace("e", "é", 60)
    return text[: n - 24] + "\nZz 42 Zé! @ 24 é@Z zz.\n"


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    """An untrained checkpoint over the test text's vocabulary (tiny_cfg's architecture),
    recording its corpus's sha256 as fit does."""
    text = make_text()
    vocab = Vocabulary.from_text(text)
    path = tmp_path / "parent.pt"
    sha = hashlib.sha256(text.encode()).hexdigest()
    meta = {"metrics": {"corpus_sha256": sha, "best_val_nll": 3.0}}
    save_checkpoint(path, tiny_model(vocab, seed=3), vocab, meta)
    return path


@pytest.fixture
def new_file(tmp_path: Path) -> Path:
    path = tmp_path / "new.txt"
    path.write_text(new_text(), encoding="utf-8")
    return path


def test_grown_model_keeps_the_parents_ids_rows_and_predictions(parent, new_file, tmp_path):
    trainer = Trainer(tiny_cfg(new_file, tmp_path / "m.pt", init_from=parent))
    old = load_checkpoint(parent)
    n = len(old.vocab)
    # The parent's characters in their order, then the new ones, sorted among themselves.
    added = "".join(sorted(set(new_text()) - set(old.vocab.chars)))
    assert trainer.vocab.chars == old.vocab.chars + added and set(NEW) <= set(added)
    model, source = trainer.model, old.model.state_dict()
    for key, value in model.state_dict().items():
        if key in ("embed.weight", "head.weight", "head.bias"):
            assert torch.equal(value[:n], source[key]), key
        else:
            assert torch.equal(value, source[key]), key
    # New rows: the mean embedding and head row.
    for key in ("embed.weight", "head.weight"):
        mean = source[key].mean(0)
        assert all(torch.allclose(row, mean) for row in model.state_dict()[key][n:])
    # On old characters the grown model's old logits are the parent's, exactly.
    prime = make_text(200, seed=5)
    ids = torch.tensor([old.vocab.encode(prime)])
    model.eval()
    with torch.no_grad():
        grown_logits, _ = model(ids)
        old_logits, _ = old.model(ids)
    assert torch.equal(grown_logits[..., :n], old_logits)
    # Each new character starts at about its frequency in the training text (calibrated on
    # its start), not at an average old character's share.
    train = np.asarray(trainer.train_ids)
    sample = torch.from_numpy(train[:CALIBRATION_CHARS].astype(np.int64))[None]
    with torch.no_grad():
        probs = torch.softmax(model(sample)[0][0], -1).mean(0)
    counts = np.bincount(train, minlength=len(trainer.vocab))[n:]
    freq = np.maximum(counts, 1) / len(train)  # one held out entirely: as if seen once
    for p, f in zip(probs[n:].tolist(), freq.tolist(), strict=True):
        assert math.isclose(p, f, rel_tol=0.15), (p, f)
    # And a sample from the grown model, primed with old characters, works.
    text = generate(model, trainer.vocab, "Alice was", 40, SamplingParams(1.0, None, 1.0, 3))
    assert len(text) == 40 and not trainer.vocab.unknown(text)


@pytest.mark.e2e
def test_continued_run_records_its_parent_and_serves(parent, new_file, tmp_path, capsys):
    out = tmp_path / "m.pt"
    result = fit(tiny_cfg(new_file, out, epochs=2, init_from=parent, keep_index=True))
    assert math.isfinite(result.best_val_nll)
    ckpt = load_checkpoint(out)
    grown = ckpt.vocab
    added = grown.chars[len(load_checkpoint(parent).vocab) :]
    assert set(NEW) <= set(added) and added == "".join(sorted(added))
    recorded = ckpt.meta["train"]["parent"]
    assert recorded["sha256"] == hashlib.sha256(parent.read_bytes()).hexdigest()
    assert recorded["name"] == "parent.pt" and recorded["path"] == str(parent)
    assert recorded["corpus_sha256"] == load_checkpoint(parent).meta["metrics"]["corpus_sha256"]
    assert recorded["new_chars"] == added
    sha = hashlib.sha256(new_file.read_bytes()).hexdigest()
    assert ckpt.meta["metrics"]["corpus_sha256"] == sha
    # --keep-index: the text's index beside the checkpoint, under the grown vocabulary.
    index = TextIndex.load(index_path(out))
    assert index.corpus_sha256 == sha and index.vocab == grown
    assert index.occurs(grown.encode("Zz 42")) and index.is_line("Zz 42 Zé! @ 24 é@Z zz.")
    # The int8 decode step scores it as fp32 does, near enough.
    scores = {}
    for decode in ("fp32", "int8"):
        args = ["evaluate", "--checkpoint", str(out), "--data", str(new_file), "--tail-frac"]
        assert main([*args, "0.1", "--decode", decode]) == 0
        scores[decode] = json.loads(capsys.readouterr().out)["nll"]
    assert scores["int8"] == pytest.approx(scores["fp32"], rel=2e-2)

    # The service loads it: new characters in a prime, in its tokenizer and in a constraint.
    async def test(c: Client) -> None:
        r = await c.post("/generate", json={"prime": "Zé @", "max_new_chars": 30, "seed": 1})
        assert r.status_code == 200, r.text
        assert not grown.unknown(r.json()["generated_text"])
        r = await c.post("/tokenize", json={"prompt": "aé"})
        assert r.json()["tokens"] == grown.encode("aé")
        info = (await c.get("/tokenizer_info")).json()
        assert info["vocab_size"] == len(grown) and info["vocab"]["é"] == grown.encode("é")[0]
        body = {"prime": "Alice", "seed": 2, "constraint": {"choice": ["Zé@", "42"]}}
        r = await c.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["generated_text"] in ("Zé@", "42") and r.json()["constraint"]["matched"]

    run(out, test)


@pytest.mark.e2e
def test_continued_run_resumes_exactly(parent, new_file, tmp_path):
    whole, parts = tmp_path / "whole.pt", tmp_path / "parts.pt"
    opts = {"init_from": parent, "schedule": "onecycle"}
    total = fit(tiny_cfg(new_file, whole, **opts)).steps
    first = fit(tiny_cfg(new_file, parts, **opts), StopAfter(total // 3 + 2))
    assert first.interrupted
    second = fit(tiny_cfg(new_file, parts, **opts, resume=True))
    assert not second.interrupted and second.steps == total
    a, b = load_checkpoint(last_path(whole)).model, load_checkpoint(last_path(parts)).model
    for (k, wa), (_, wb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(wa, wb), k


def _one_line_error(capsys, argv: list[str], fragment: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


def test_incompatible_checkpoints_are_refused_in_one_line(parent, new_file, tmp_path, capsys):
    out = tmp_path / "m.pt"
    base = ["fit", "--data", str(new_file), "--out", str(out), "--quiet"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for init, more, fragment in [
        (tmp_path / "nope.pt", [], "cannot continue from --init-from"),
        (tmp_path / "junk.pt", [], "corrupt or truncated"),
        (new_file, [], "cannot continue from --init-from"),
        (parent, ["--hidden", "64"], "--hidden 64 contradicts"),
        (parent, ["--cell", "gru"], "--cell gru contradicts"),
        (parent, ["--layers", "3"], "--layers 3 contradicts"),
    ]:
        _one_line_error(capsys, [*base, "--init-from", str(init), *more], fragment)
    assert not out.exists()
    # The same architecture given again is no contradiction; nor in the API.
    cfg = tiny_cfg(new_file, out, init_from=parent)
    assert Trainer(cfg).model.config.hidden == 32
    with pytest.raises(TrainingError, match="--embed 16 contradicts"):
        Trainer(tiny_cfg(new_file, out, init_from=parent, embed=16))


@pytest.mark.e2e
def test_resume_refuses_another_parent(parent, new_file, tmp_path, capsys):
    out = tmp_path / "m.pt"
    fit(tiny_cfg(new_file, out, epochs=1, init_from=parent))
    base = ["fit", "--data", str(new_file), "--out", str(out), "--quiet", "--resume"]
    tiny = ["--hidden", "32", "--embed", "8", "--batch-size", "8", "--seq-len", "25"]
    _one_line_error(capsys, [*base, *tiny], "was trained with --init-from")


def test_index_command_checks_the_texts_sha256(parent, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(make_text(), encoding="utf-8")
    other = tmp_path / "other.txt"
    other.write_text(make_text(seed=9), encoding="utf-8")
    _one_line_error(
        capsys,
        ["index", "--checkpoint", str(parent), "--data", str(other)],
        "is not " + str(parent) + "'s training text",
    )
    assert not index_path(parent).exists()
    assert main(["index", "--checkpoint", str(parent), "--data", str(text)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["index"] == str(index_path(parent)) and summary["chars"] == len(make_text())
    index = TextIndex.load(index_path(parent))
    assert index.corpus_sha256 == load_checkpoint(parent).meta["metrics"]["corpus_sha256"]
    # A checkpoint that records no corpus cannot be checked: refused.
    bare = tmp_path / "bare.pt"
    vocab = Vocabulary.from_text(make_text())
    save_checkpoint(bare, tiny_model(vocab), vocab, {})
    _one_line_error(
        capsys, ["index", "--checkpoint", str(bare), "--data", str(text)], "records no corpus"
    )
