"""Shared fixtures: small deterministic texts and a tiny trained checkpoint.

Tests never read ../shared: users' clones do not have it."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from charrnn import CharRNN, ModelConfig, Vocabulary, save_checkpoint

torch.set_num_threads(1)

WORDS = (
    "alice rabbit queen hatter tea time garden door key little bottle cake drink eat curious "
    "white said the and she was very into down hole"
).split()


def make_text(n_chars: int = 6000, seed: int = 0) -> str:
    """A pseudo-English text with a little structure for a tiny model to learn."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        sentence = sentence.capitalize() + rng.choice([".", "!", "?", ","]) + " "
        if rng.random() < 0.15:
            sentence += "\n"
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


@pytest.fixture(autouse=True, scope="session")
def _native_built() -> None:
    """The native kernels are built (a compiler run) before any test, once: a test that is not
    ``e2e`` may then start no process at all (``_no_processes``)."""
    from charrnn import native

    native.load()


_running: list[pytest.Item] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.fixture(autouse=True, scope="session")
def _no_processes(_native_built: None) -> Iterator[None]:
    """A test that starts a server or another process (its fixtures included) must say so
    with ``@pytest.mark.e2e``: ``make test-fast`` (``-m "not slow and not e2e"``) then starts
    none."""
    start = subprocess.Popen.__init__

    def checked(self: subprocess.Popen, *args: Any, **kwargs: Any) -> None:
        item = _running[-1] if _running else None
        if item is not None and item.get_closest_marker("e2e") is None:
            raise AssertionError(f"{item.nodeid} starts a process: mark it @pytest.mark.e2e")
        start(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "__init__", checked)
        yield


@pytest.fixture(autouse=True, scope="session")
def _id_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Training's encoded-corpus cache goes to a temp folder, not the user's ~/.cache."""
    os.environ["CHARRNN_CACHE_DIR"] = str(tmp_path_factory.mktemp("id-cache"))


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_text()


@pytest.fixture
def corpus_file(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


def tiny_fit_args(data: Path, out: Path, epochs: int, *more: str) -> list[str]:
    """`python -m training` arguments for a quick fit of a tiny model on one thread."""
    return [
        "fit",
        "--data",
        str(data),
        "--out",
        str(out),
        "--hidden",
        "32",
        "--embed",
        "8",
        "--batch-size",
        "8",
        "--seq-len",
        "25",
        "--epochs",
        str(epochs),
        "--threads",
        "1",
        "--quiet",
        *more,
    ]


def tiny_model(vocab: Vocabulary, cell: str = "lstm", seed: int = 0, hidden: int = 32) -> CharRNN:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=len(vocab), hidden=hidden, layers=2, embed=8, dropout=0.1, cell=cell
    )
    return CharRNN(cfg).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained but valid checkpoint over the test text's vocabulary."""
    vocab = Vocabulary.from_text(make_text())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    meta = {"metrics": {"best_val_nll": 3.0, "best_val_bpc": 4.3, "epochs": 0}}
    save_checkpoint(path, tiny_model(vocab), vocab, meta)
    return path


def primed_row(backend, prime: str, temperature: float, top_k, top_p: float, seed: int):
    """A one-row ``app.runner.Batch`` primed on ``prime`` with these sampling parameters."""
    from charrnn.sampling import SamplingParams

    logits, state = backend.prime(backend.encode(prime), None)
    return backend.new_row(logits, state, SamplingParams(temperature, top_k, top_p, seed))


def json_text(n_lines: int, seed: int = 0) -> str:
    """JSON lines of people and number lists, for a model that must write JSON."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        tags = [rng.choice(WORDS)[:6] for _ in range(rng.randint(0, 3))]
        person = {"name": rng.choice(WORDS), "age": rng.randint(0, 99), "tags": tags}
        lines.append(json.dumps(person, separators=(",", ":")))
        numbers = [str(rng.randint(1, 99)) for _ in range(rng.randint(1, 4))]
        lines.append("[" + ",".join(numbers) + "]")
    return "\n".join(lines) + "\n"


def train_structured() -> tuple[CharRNN, Vocabulary]:
    """A tiny LSTM fitted for a second or two on prose and JSON lines (braces, quotes and
    digits in its vocabulary): it has learnt where words end, which is what a constraint's
    "end" outcome draws on."""
    text = make_text(4000) + json_text(150)
    vocab = Vocabulary.from_text(text + string.ascii_letters + "'")
    model = tiny_model(vocab, hidden=64).train()
    ids = torch.tensor(vocab.encode(text))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=g)
        batch = torch.stack([ids[s : s + 33] for s in starts.tolist()])
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0  # it learnt something
    return model.eval(), vocab


@pytest.fixture(scope="session")
def structured_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train_structured``'s model as a checkpoint, for the service."""
    model, vocab = train_structured()
    path = tmp_path_factory.mktemp("ckpt") / "structured.pt"
    save_checkpoint(path, model, vocab, {"metrics": {"epochs": 1}})
    return path
