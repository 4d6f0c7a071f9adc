"""The engine: the loaded models, one runner and one scheduler each, and the one way in for
the API: ``model(name)`` then ``submit(model, request)``, which returns a ``Handle``."""

from __future__ import annotations

import asyncio
import gc
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
from charrnn.vocab import Vocabulary

log = logging.getLogger("charrnn.engine")

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


@dataclass
class LoadedModel:
    name: str
    path: str
    created: int
    runner: ModelRunner  # the engine's own: the API asks through ``vocab`` and ``facts``
    scheduler: Scheduler

    @property
    def vocab(self) -> Vocabulary:
        return self.runner.vocab

    @property
    def failing(self) -> str | None:
        """Why this model's decode keeps failing, or None."""
        return self.scheduler.failing

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
        )


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        super().__init__(f"model {name!r} is not loaded; loaded models: {', '.join(known)}")


class NotReady(Exception):
    """The models are still loading or warming up."""


class WarmUpFailed(RuntimeError):
    """A model could not generate at start-up: the server must not serve it."""


@dataclass
class Engine:
    models: dict[str, LoadedModel] = field(default_factory=dict)
    default: str | None = None
    ready: bool = False
    closing: bool = False
    backlog: int = MIN_BACKLOG  # characters a client may fall behind (CHARRNN_STREAM_BACKLOG)

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
        return model.scheduler.submit(request, self.backlog)

    def submit_many(self, model: LoadedModel, requests: list[GenerationRequest]) -> list[Handle]:
        """Queue several generations that belong together, all or none."""
        return model.scheduler.submit_many(requests, self.backlog)

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
        device = resolve_device(settings.device)
        reg = cls(backlog=settings.stream_backlog)
        for name, path in settings.model_paths.items():
            weights, why = decode_precision(settings.decode_weights, device)
            runner = ModelRunner(
                (checkpoints or {}).get(name) or load_checkpoint(path, device),
                device,
                cache_size=settings.prime_cache_size,
                weights=weights,
                threads=settings.threads,
                native_kernels=settings.native_kernels,
                decode_reason=why,
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
            reg.models[name] = LoadedModel(
                name, path, int(os.path.getmtime(path)), runner, scheduler
            )
            log.info(
                "loaded model %s from %s on %s (%d parameters)",
                name,
                path,
                device,
                runner.model.num_parameters(),
            )
            prepare(name, runner, settings.max_concurrent)
        reg.default = next(iter(reg.models))
        return reg

    async def warm_up(self) -> None:
        """Start the schedulers and run one short generation through each, so the first client
        does not pay for lazy initialisation (thread pools, allocator, kernels)."""
        for m in self.models.values():
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
                    raise WarmUpFailed(f"warm-up of model {m.name} failed: {e}") from None
            m.runner.clear_cache()
        # Everything loaded so far (torch, FastAPI, the models) lives as long as the process:
        # move it out of the collector's sight, or every full collection under load walks
        # a million long-lived objects and stalls the event loop for tens of milliseconds.
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("ready: %s", ", ".join(self.models))

    async def drain(self, grace_s: float) -> None:
        self.closing = True
        self.ready = False
        await asyncio.gather(*(m.scheduler.drain(grace_s) for m in self.models.values()))

    async def close(self) -> None:
        await asyncio.gather(*(m.scheduler.close() for m in self.models.values()))
