"""The engine: the loaded models, one runner and one scheduler each, and the one way in for
the API: ``model(name)`` then ``submit(model, request)``, which returns a ``Handle``."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from app.config import MIN_BACKLOG, Settings
from app.engine.handle import GenerationFailed, Handle
from app.engine.outbox import HAND_OVER_CALLS
from app.engine.policy import MAX_STEPS
from app.engine.request import GenerationRequest
from app.engine.scheduler import Scheduler, ShuttingDown
from app.metrics import Metrics
from app.runner import ModelRunner, decode_precision
from app.runner.graphs import prepare
from charrnn.checkpoint import Checkpoint, load_checkpoint
from charrnn.model import resolve_device
from charrnn.sampling import SamplingParams
from charrnn.textindex import TextIndex, TextIndexError, index_path
from charrnn.vocab import Vocabulary

log = logging.getLogger("charrnn.engine")


def _return_freed_memory() -> None:
    """Give the memory a retired model freed back to the system: glibc keeps freed blocks of
    a thread's arena for reuse, so the process would look as large as with both models."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def checkpoint_id(path: str) -> str:
    """The first 12 hex digits of a checkpoint file's sha256: which weights served."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _text_index(checkpoint: str, vocab: Vocabulary) -> TextIndex | None:
    """The checkpoint's training text index (``NAME.index.npz`` beside it), for the copy
    guard; None without one. One that cannot serve this model is logged and left out: the
    model serves without the guard rather than not at all."""
    path = index_path(checkpoint)
    if not path.exists():
        return None
    try:
        index = TextIndex.load(path)
    except TextIndexError as e:
        log.warning("text index %s left out: %s", path, e.problem)
        return None
    if index.vocab != vocab:
        log.warning("text index %s left out: its vocabulary is not the checkpoint's", path)
        return None
    return index


WARMUP_PRIME_CHARS = 8
WARMUP_ROUNDS = 3
# One hand-over brings a reader at most this many characters of a row: a smaller backlog
# would cut off a client that reads at full speed.
assert HAND_OVER_CALLS * MAX_STEPS <= MIN_BACKLOG


@dataclass(frozen=True)
class ModelFacts:
    """What a client may know about a loaded model (``/info``)."""

    vocabulary: str
    parameters: int
    cell: str
    layers: int
    hidden: int
    embed: int
    metrics: dict[str, Any]
    device: str
    dtype: str
    decode_weights: str
    decode_kernels: str
    decode_reason: str
    batch_invariant: bool
    batch_invariance: str
    # The training text's index that the copy guard reads: its size, or None without one.
    text_index: dict[str, Any] | None = None


@dataclass(eq=False)
class LoadedModel:
    name: str
    path: str
    created: int
    runner: ModelRunner  # the engine's own: the API asks through ``vocab`` and ``facts``
    scheduler: Scheduler
    checkpoint: str = ""  # the first 12 hex digits of the checkpoint file's sha256
    # Replaced or unloaded: it finishes what it was given, then its decode thread stops.
    retired: bool = False

    @property
    def vocab(self) -> Vocabulary:
        return self.runner.vocab

    @property
    def failing(self) -> str | None:
        """Why this model's decode keeps failing, or None."""
        return self.scheduler.failing

    @property
    def has_text_index(self) -> bool:
        """Whether the copy guard can serve this model (its training text's index loaded)."""
        return self.runner.index is not None

    def facts(self) -> ModelFacts:
        r = self.runner
        cfg = r.model.config
        return ModelFacts(
            vocabulary=r.vocab.chars,
            parameters=r.model.num_parameters(),
            cell=cfg.cell,
            layers=cfg.layers,
            hidden=cfg.hidden,
            embed=cfg.embed,
            metrics=r.ckpt.meta.get("metrics", {}),
            device=str(r.device),
            dtype=str(r.dtype).removeprefix("torch."),
            decode_weights=r.decoder.weights,
            decode_kernels=r.decoder.kernels,
            decode_reason=r.decode_reason,
            batch_invariant=r.decoder.batch_invariant,
            batch_invariance=r.decoder.invariance,
            text_index=None
            if r.index is None
            else {
                "chars": len(r.index),
                "lines": len(r.index.line_keys),
                "corpus_sha256": r.index.corpus_sha256,
            },
        )


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        super().__init__(f"model {name!r} is not loaded; loaded models: {', '.join(known)}")


class NotReady(Exception):
    """The models are still loading or warming up."""


class WarmUpFailed(RuntimeError):
    """A model could not generate at start-up: the server must not serve it."""


class ModelExists(Exception):
    def __init__(self, name: str):
        super().__init__(f"a model named {name!r} is loaded already; PUT swaps it")


class DefaultModel(Exception):
    def __init__(self, name: str):
        super().__init__(f"{name!r} is the default model and cannot be unloaded")


@dataclass
class Engine:
    models: dict[str, LoadedModel] = field(default_factory=dict)
    default: str | None = None
    ready: bool = False
    closing: bool = False
    backlog: int = MIN_BACKLOG  # characters a client may fall behind (CHARRNN_STREAM_BACKLOG)
    settings: Settings | None = None
    metrics: Metrics | None = None
    # Models replaced or unloaded that still finish their generations.
    retiring: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def failing(self) -> dict[str, str]:
        """The models whose decode keeps failing, with the reason."""
        return {n: m.scheduler.failing for n, m in self.models.items() if m.scheduler.failing}

    def get(self, name: str | None) -> LoadedModel:
        """The loaded model ``name`` (None: the default), whatever the engine's state."""
        key = name if name is not None else self.default
        if key is None or key not in self.models:
            raise UnknownModel(str(name), list(self.models))
        return self.models[key]

    def model(self, name: str | None) -> LoadedModel:
        """The model a request names, if it can take requests now: ``ShuttingDown``,
        ``NotReady`` or ``UnknownModel`` otherwise."""
        if self.closing:
            raise ShuttingDown()
        if not self.ready:
            raise NotReady()
        return self.get(name)

    def submit(self, model: LoadedModel, request: GenerationRequest) -> Handle:
        """Queue a generation (``Overloaded`` or ``ShuttingDown`` before any work if it
        cannot be queued)."""
        return self._serving(model).scheduler.submit(request, self.backlog)

    def submit_many(self, model: LoadedModel, requests: list[GenerationRequest]) -> list[Handle]:
        """Queue several generations that belong together, all or none."""
        return self._serving(model).scheduler.submit_many(requests, self.backlog)

    def _serving(self, model: LoadedModel) -> LoadedModel:
        """``model``, or, where it retired and has stopped since the request looked it up,
        the model that serves its name now."""
        if model.scheduler.stopped:
            return self.get(model.name)
        return model

    @classmethod
    def load(
        cls,
        settings: Settings,
        metrics: Metrics,
        checkpoints: dict[str, Checkpoint] | None = None,
    ) -> Engine:
        """Load every configured checkpoint onto the device. Raises CheckpointError (naming
        the path) for the first one that cannot be used."""
        # torch's CPU threads belong to the decode threads (ModelRunner.worker). Any other
        # thread that runs torch with several threads keeps its own OpenMP team, whose idle
        # workers spin on the same cores and slow the decode step down several times.
        torch.set_num_threads(1)
        reg = cls(backlog=settings.stream_backlog, settings=settings, metrics=metrics)
        for name, path in settings.model_paths.items():
            reg.models[name] = reg._load_one(name, path, (checkpoints or {}).get(name))
        reg.default = next(iter(reg.models))
        return reg

    def _load_one(self, name: str, path: str, ckpt: Checkpoint | None = None) -> LoadedModel:
        """One checkpoint on the device with its scheduler (not started). Blocking: run it
        off the event loop once serving."""
        settings, metrics = self.settings, self.metrics
        assert settings is not None and metrics is not None
        device = resolve_device(settings.device)
        weights, why = decode_precision(settings.decode_weights, device)
        ckpt = ckpt or load_checkpoint(path, device)
        runner = ModelRunner(
            ckpt,
            device,
            cache_size=settings.prime_cache_size,
            weights=weights,
            threads=settings.threads,
            native_kernels=settings.native_kernels,
            decode_reason=why,
            index=_text_index(path, ckpt.vocab),
        )
        scheduler = Scheduler(
            name,
            runner,
            metrics,
            max_concurrent=settings.max_concurrent,
            max_queue=settings.max_queue,
            prime_budget=settings.prime_budget,
            prime_slice_s=settings.prime_slice_ms / 1e3,
        )
        sha = checkpoint_id(path)
        scheduler.checkpoint = sha
        model = LoadedModel(name, path, int(os.path.getmtime(path)), runner, scheduler, sha)
        log.info(
            "loaded model %s from %s (checkpoint %s) on %s (%d parameters)",
            name,
            path,
            sha,
            device,
            runner.model.num_parameters(),
        )
        prepare(name, runner, settings.max_concurrent)
        return model

    # -- models at run time --------------------------------------------------------------------

    async def add(self, name: str, path: str) -> LoadedModel:
        """Load a checkpoint under a new name, warm it up, then serve it."""
        if name in self.models:
            raise ModelExists(name)
        model = await self._started(name, path)
        self.models[name] = model
        return model

    async def swap(self, name: str, path: str) -> LoadedModel:
        """Serve ``name`` from another checkpoint: requests that looked the name up before
        finish on the old model, later ones use the new one; none fails. The old one's decode
        thread stops, and its memory is freed, once its last generation ends."""
        old = self.get(name)
        model = await self._started(name, path)
        self.models[name] = model  # one assignment on the event loop: atomic for requests
        self._retire(old)
        return model

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` once its generations end (the default model stays)."""
        if name == self.default:
            raise DefaultModel(name)
        self.get(name)  # UnknownModel where it is not loaded
        self._retire(self.models.pop(name))

    async def reload(self, wanted: dict[str, str]) -> list[str]:
        """Serve the models ``wanted`` (name -> path): load the new names, swap the changed
        paths, unload the names gone; what changed, one line each."""
        changes = []
        for name, path in wanted.items():
            if name not in self.models:
                await self.add(name, path)
                changes.append(f"loaded {name} from {path}")
            elif self.models[name].path != path:
                await self.swap(name, path)
                changes.append(f"swapped {name} to {path}")
        if self.default not in wanted:
            self.default = next(iter(wanted))
        for name in [n for n in self.models if n not in wanted]:
            await self.unload(name)
            changes.append(f"unloaded {name}")
        return changes

    async def _started(self, name: str, path: str) -> LoadedModel:
        model = await asyncio.to_thread(self._load_one, name, path)
        await self._warm(model)
        return model

    def _retire(self, model: LoadedModel) -> None:
        model.retired = True
        task = asyncio.create_task(self._close_when_idle(model), name=f"retire-{model.name}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def _close_when_idle(self, model: LoadedModel) -> None:
        while model.scheduler.live:
            await asyncio.sleep(0.05)
        model.scheduler.stopped = True  # with no await since the check: no request slips in
        await model.scheduler.close()
        log.info("retired model %s (checkpoint %s)", model.name, model.checkpoint)
        del model
        # The start-up's gc.freeze() keeps frozen objects from the collector: let the
        # retired model's cycles (if any) go, then freeze what stays.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        _return_freed_memory()

    async def warm_up(self) -> None:
        """Start the schedulers and run one short generation through each, so the first client
        does not pay for lazy initialisation (thread pools, allocator, kernels)."""
        for m in self.models.values():
            await self._warm(m)
        # Everything loaded so far (torch, FastAPI, the models) lives as long as the process:
        # move it out of the collector's sight, or every full collection under load walks
        # a million long-lived objects and stalls the event loop for tens of milliseconds.
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("ready: %s", ", ".join(self.models))

    async def _warm(self, m: LoadedModel) -> None:
        """Start ``m``'s scheduler and run generations through it."""
        m.scheduler.start()
        # Three rounds, each with a prime not yet cached, so that the allocator, the thread
        # pools and the branch predictors have seen a prime and a decode call more than once
        # before the first client's.
        chars = m.vocab.chars
        for round_ in range(WARMUP_ROUNDS):
            request = GenerationRequest(
                prime=(chars[round_ % len(chars) :] + chars)[:WARMUP_PRIME_CHARS],
                max_new=8,
                sampling=SamplingParams(seed=0),
                stream=False,
            )
            try:
                await m.scheduler.submit(request, MIN_BACKLOG).result()
            except GenerationFailed as e:
                await m.scheduler.close()
                raise WarmUpFailed(f"warm-up of model {m.name} failed: {e}") from None
        m.runner.clear_cache()

    async def drain(self, grace_s: float) -> None:
        self.closing = True
        self.ready = False
        await asyncio.gather(*(m.scheduler.drain(grace_s) for m in self.models.values()))

    async def close(self) -> None:
        for task in list(self.retiring):
            task.cancel()
        await asyncio.gather(*(m.scheduler.close() for m in self.models.values()))
