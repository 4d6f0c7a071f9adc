"""The loaded models: one backend and one scheduler per configured checkpoint."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from dataclasses import dataclass, field

import torch

from app.backend import ModelBackend, decode_precision
from app.batcher import MIN_BACKLOG
from app.config import Settings
from app.engine import Scheduler
from app.generation import Done, Failed, GenerationRequest
from app.graphs import prepare
from app.metrics import Metrics
from charrnn.checkpoint import load_checkpoint
from charrnn.model import resolve_device
from charrnn.sampling import SamplingParams

log = logging.getLogger("charrnn.registry")

WARMUP_PRIME_CHARS = 8
WARMUP_ROUNDS = 3


@dataclass
class LoadedModel:
    name: str
    path: str
    created: int
    backend: ModelBackend
    scheduler: Scheduler


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        super().__init__(f"model {name!r} is not loaded; loaded models: {', '.join(known)}")


class WarmUpFailed(RuntimeError):
    """A model could not generate at start-up: the server must not serve it."""


@dataclass
class Registry:
    models: dict[str, LoadedModel] = field(default_factory=dict)
    default: str | None = None
    ready: bool = False
    closing: bool = False

    @property
    def failing(self) -> dict[str, str]:
        """The models whose decode keeps failing, with the reason."""
        return {n: m.scheduler.failing for n, m in self.models.items() if m.scheduler.failing}

    def get(self, name: str | None) -> LoadedModel:
        key = name if name is not None else self.default
        if key is None or key not in self.models:
            raise UnknownModel(str(name), list(self.models))
        return self.models[key]

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics) -> Registry:
        """Load every configured checkpoint onto the device. Raises CheckpointError (naming
        the path) for the first one that cannot be used."""
        # torch's CPU threads belong to the decode threads (ModelBackend.worker). Any
        # other thread that runs torch with several threads keeps its own OpenMP team, whose
        # idle workers spin on the same cores: the decode step then runs 2-3x slower.
        torch.set_num_threads(1)
        device = resolve_device(settings.device)
        reg = cls()
        for name, path in settings.model_paths.items():
            backend = ModelBackend(
                load_checkpoint(path, device),
                device,
                cache_size=settings.prime_cache_size,
                weights=decode_precision(settings.decode_weights, device),
                threads=settings.threads,
                native_kernels=settings.native_kernels,
            )
            scheduler = Scheduler(
                name,
                backend,
                metrics,
                max_concurrent=settings.max_concurrent,
                max_queue=settings.max_queue,
                prime_budget=settings.prime_budget,
                prime_slice_s=settings.prime_slice_ms / 1e3,
            )
            reg.models[name] = LoadedModel(
                name, path, int(os.path.getmtime(path)), backend, scheduler
            )
            log.info(
                "loaded model %s from %s on %s (%d parameters)",
                name,
                path,
                device,
                backend.model.num_parameters(),
            )
            prepare(name, backend, settings.max_concurrent, settings.decode_weights)
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
            chars = m.backend.vocab.chars
            for round_ in range(WARMUP_ROUNDS):
                request = GenerationRequest(
                    prime=(chars[round_ % len(chars) :] + chars)[:WARMUP_PRIME_CHARS],
                    max_new=8,
                    sampling=SamplingParams(seed=0),
                    stream=False,
                )
                gen = m.scheduler.submit(request, backlog=MIN_BACKLOG)
                while not isinstance(event := await gen.channel.get(), Done | Failed):
                    pass
                if isinstance(event, Failed):
                    raise WarmUpFailed(f"warm-up of model {m.name} failed: {event.message}")
            m.backend.clear_cache()
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
