"""Admission: which model a request goes to (404, 503) and whether it can be queued (429,
503), answered before any work; and the generations one HTTP request submitted, cancelled
when the request ends however it ends (``app.deps.submitted`` owns them)."""

from __future__ import annotations

from fastapi import HTTPException

from app.engine import Generation, Overloaded, ShuttingDown
from app.generation import GenerationRequest
from app.registry import LoadedModel, Registry, UnknownModel


def resolve_model(registry: Registry, name: str | None) -> LoadedModel:
    """The loaded model a request names (None: the default); 503 while loading or closing,
    404 for a name that is not loaded."""
    if registry.closing:
        raise HTTPException(503, "the server is shutting down", headers={"Retry-After": "5"})
    if not registry.ready:
        raise HTTPException(
            503, "the model is not loaded yet; retry shortly", headers={"Retry-After": "1"}
        )
    try:
        return registry.get(name)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None


class Submitted:
    """The generations of one HTTP request. ``cancel_all`` at the end of the request frees
    the place of every one still running: the client left, gave up, was cut off, or its
    task was cancelled before the response body ever ran."""

    def __init__(self) -> None:
        self._gens: list[tuple[LoadedModel, Generation]] = []

    def submit(self, model: LoadedModel, request: GenerationRequest, backlog: int) -> Generation:
        try:
            gen = model.scheduler.submit(request, backlog)
        except Overloaded:
            raise HTTPException(
                429,
                "the server is at its limit of concurrent and queued generations; retry later",
                headers={"Retry-After": "1"},
            ) from None
        except ShuttingDown:
            raise HTTPException(
                503, "the server is shutting down", headers={"Retry-After": "5"}
            ) from None
        self._gens.append((model, gen))
        return gen

    def cancel_all(self) -> None:
        for model, gen in self._gens:
            model.scheduler.cancel(gen)  # a no-op for one that has ended
        self._gens.clear()
