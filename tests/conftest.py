"""Shared fixtures and helpers: small deterministic texts, tiny models and checkpoints,
training's tiny configurations, and the two ways the service is tested. What two test
modules share lives here (or in tests/server.py, tests/crowd.py), never in a test module.

- In-process (every route test that needs no socket): ``run(checkpoint, test, **settings)``
  builds the ASGI app, runs its lifespan (models loaded and warmed up, decode threads running)
  and hands ``test`` an ``httpx.AsyncClient`` over httpx's ASGI transport; ``generate``,
  ``events``, ``score`` and ``scrape`` are the requests most tests make. No process, no
  socket: these tests are in ``make test-fast``.
- On a real server (``e2e``: what needs a socket, a signal or another process): the
  module-scoped ``server`` fixture, ``python -m app`` on a loopback port (tests/server.py),
  with the settings of the module's ``pytest.mark.server(...)``.

Tests never read ../shared: users' clones do not have it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import string
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from httpx_sse import aconnect_sse

from charrnn import CharRNN, ModelConfig, Vocabulary, load_checkpoint, save_checkpoint
from tests.server import ROOT, Server, metric_values, run_server
from training.config import FitConfig
from training.fit import StopFlag

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "server(checkpoint=fixture, name=..., models=..., **settings): the model and the "
        "settings (CHARRNN_* without the prefix) of the module's real server, the ``server`` "
        "fixture",
    )


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


def run_python(folder: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (from a file: TorchScript reads functions' source),
    which must succeed."""
    script = folder / "script.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    return out


TINY = {
    "hidden": 32,
    "layers": 2,
    "embed": 8,
    "dropout": 0.1,
    "batch_size": 8,
    "seq_len": 25,
    "threads": 1,
    "progress": False,
}


def tiny_cfg(data: Path, out: Path, **overrides) -> FitConfig:
    return FitConfig(data=data, out=out, **{**TINY, "epochs": 3, **overrides})


class StopAfter(StopFlag):
    """Acts as if SIGINT arrived once the loop has checked ``n`` times (after n steps)."""

    def __init__(self, n: int):
        super().__init__()
        self.checks, self.n = 0, n

    @property
    def signum(self):  # type: ignore[override]
        self.checks += 1
        return signal.SIGINT if self.checks >= self.n else None

    @signum.setter
    def signum(self, _value):
        pass


def reference_interval(logits, temperature, top_k, top_p, u, pick) -> float:
    """How far (in kept mass, float64) the draw lies outside ``pick``'s share of the CDF."""
    z = logits.double() / temperature
    p = torch.softmax(z, -1)
    order = torch.sort(p, descending=True, stable=True).indices
    sorted_p = p[order][: int(top_k)]
    before = torch.cumsum(sorted_p, 0) - sorted_p
    kept = sorted_p[(before < top_p * sorted_p.sum()) | (torch.arange(len(sorted_p)) == 0)]
    edges = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(kept, 0)])
    rank = int((order[: len(kept)] == pick).nonzero()[0, 0])
    target = float(u) * float(edges[-1])
    return max(float(edges[rank]) - target, target - float(edges[rank + 1]), 0.0) / float(edges[-1])


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


@pytest.fixture(scope="session")
def vocab(tiny_checkpoint: Path) -> Vocabulary:
    """``tiny_checkpoint``'s vocabulary."""
    return load_checkpoint(tiny_checkpoint).vocab


# -- the service in-process ----------------------------------------------------------------

Client = httpx.AsyncClient


@contextlib.asynccontextmanager
async def served(checkpoint: Path, **settings: object) -> AsyncIterator[Client]:
    """A client of the app serving ``checkpoint`` as ``tiny``, once its models are loaded and
    warmed up; ``settings`` are ``app.config.Settings`` fields."""
    from app.config import Settings
    from app.main import create_app

    app = create_app(
        Settings(models=f"tiny={checkpoint}", shutdown_grace_s=0, **settings)  # type: ignore[arg-type]
    )
    async with app.router.lifespan_context(app):
        for _ in range(500):
            if app.state.engine.ready:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            client.app = app  # type: ignore[attr-defined]  # for tests that look inside
            yield client


def run(checkpoint: Path, test: Callable[[Client], Awaitable[None]], **settings: object) -> None:
    """``test(client)`` against the app (``served``), in an event loop of its own."""

    async def main() -> None:
        async with served(checkpoint, **settings) as client:
            await test(client)

    asyncio.run(main())


async def generate(c: Client, **body: object) -> dict:
    """``POST /generate``'s answer, which must be a 200."""
    r = await c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def events(c: Client, method: str = "POST", **body: object) -> list[tuple[str, dict]]:
    """Every event of one ``/generate/stream`` (a 200 with SSE headers), as (name, data)."""
    kwargs = {"json": body} if method == "POST" else {"params": body}
    async with aconnect_sse(c, method, "/generate/stream", **kwargs) as es:
        assert es.response.status_code == 200, await es.response.aread()
        assert es.response.headers["content-type"].startswith("text/event-stream")
        assert es.response.headers["cache-control"] == "no-cache"
        assert es.response.headers["x-accel-buffering"] == "no"
        return [(sse.event, json.loads(sse.data)) async for sse in es.aiter_sse()]


async def score(c: Client, **body: object) -> dict:
    """``POST /score``'s answer, which must be a 200."""
    r = await c.post("/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def scrape(c: Client, *names: str, **labels: str) -> dict[str, float]:
    """Samples of one ``/metrics`` scrape (0 when absent), as ``Server.metrics``."""
    r = await c.get("/metrics")
    assert r.status_code == 200
    return metric_values(r.text, names, labels)


# -- the service on a real server (e2e) ------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``python -m app`` on a free loopback port, shared by a module's tests (which must be
    marked ``e2e``), with the settings of the module's ``pytest.mark.server(...)``:
    ``CHARRNN_*`` settings without the prefix, and which model it serves: ``checkpoint``, the
    name of a checkpoint fixture (``tiny_checkpoint`` if not given) served as ``name``
    (``tiny``), or ``models``, a ``CHARRNN_MODELS`` list."""
    mark = request.node.get_closest_marker("server")
    settings = dict(mark.kwargs) if mark else {}
    if "models" in settings:
        models = settings.pop("models")
    else:
        checkpoint = request.getfixturevalue(settings.pop("checkpoint", "tiny_checkpoint"))
        models = f"{settings.pop('name', 'tiny')}={checkpoint}"
    with run_server(tmp_path_factory.mktemp("server"), models, **settings) as s:
        yield s


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
    model, losses = fit_tiny(text, vocab, hidden=64, lr=0.01, steps=150)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0  # it learnt something
    return model, vocab


def fit_tiny(
    text: str, vocab: Vocabulary, hidden: int, lr: float, steps: int
) -> tuple[CharRNN, list[float]]:
    """A tiny LSTM fitted on ``text`` for ``steps`` Adam steps of 16 windows (seeded): the
    eval-mode model and its training losses."""
    model = tiny_model(vocab, hidden=hidden).train()
    ids = torch.tensor(vocab.encode(text))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (16,), generator=g)
        batch = torch.stack([ids[s : s + 33] for s in starts.tolist()])
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.fixture(scope="session")
def structured_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train_structured``'s model as a checkpoint, for the service."""
    model, vocab = train_structured()
    path = tmp_path_factory.mktemp("ckpt") / "structured.pt"
    save_checkpoint(path, model, vocab, {"metrics": {"epochs": 1}})
    return path


def generations(
    decoder: Any,
    vocab: Vocabulary,
    prime: str,
    seeds: range,
    length: int,
    controls: Any = None,
    index: Any = None,
    temperature: float = 1.0,
) -> list[str]:
    """``len(seeds)`` texts after ``prime`` (a ``charrnn.decode.StepDecoder``), one row each,
    in one multi-step decode (or a step at a time without the native kernels), with the
    generation ``controls`` (a ``charrnn.controls.Controls``; its copy guard reads ``index``);
    each cut at "end"."""
    from charrnn.controls import ControlsBatch
    from charrnn.sampling import SamplingBatch, SamplingParams

    ids = vocab.encode(prime)
    logits, state = decoder.prime(torch.tensor(ids))
    n = len(seeds)
    logits, state = logits.expand(n, -1).contiguous(), tuple(s.repeat(1, n, 1) for s in state)
    sampling = SamplingBatch.of(
        [SamplingParams(temperature, None, 1.0, s) for s in seeds], len(vocab), logits.device
    )
    rows = None
    if controls is not None:
        rows = ControlsBatch.of(controls, len(vocab), ids, vocab.encode, index).repeat(n)
    if decoder.multi_step:
        out, _, _ = decoder.decode_batch(
            logits, state, sampling, np.zeros(n, np.uint64), length, controls=rows
        )
    else:
        steps = []
        for pos in range(length):
            u = sampling.uniforms(np.full(n, pos, np.uint64), logits.device)
            nxt, logits, state = decoder.sample_and_step(logits, state, sampling, u, controls=rows)
            steps.append(nxt)
        out = torch.stack(steps)
    texts = []
    for b in range(n):
        chars = out[:, b].tolist()
        if len(vocab) in chars:
            chars = chars[: chars.index(len(vocab))]
        texts.append(vocab.decode(chars))
    return texts


def pack_mask(allowed: torch.Tensor) -> torch.Tensor:
    """The int32 bitmask [B, ceil(n / 32)] of a bool [B, n], as llguidance fills it."""
    b, n = allowed.shape
    words = (n + 31) // 32
    bits = torch.zeros(b, words * 32, dtype=torch.int64)
    bits[:, :n] = allowed.long()
    packed = (bits.view(b, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


# The contract's generation controls (docs/api.md, "Generation controls"), besides n/best_of.
CONTROLS = frozenset(
    {
        "logit_bias",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "penalty_last_n",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_sequence_breakers",
        "dry_penalty_last_n",
        "banned_strings",
        "min_p",
        "typical_p",
    }
)
