"""Operations: liveness, readiness, model info, Prometheus metrics, and the playground."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api import constraints
from app.api.deps import EngineDep, SettingsDep
from app.api.validation import controls_info
from app.schemas import Architecture, Health, Info, Limits, ModelInfo, Ready

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """200 while the process is alive."""
    return Health()


@router.get("/ready", response_model=Ready, responses={503: {"model": Ready}})
async def ready(engine: EngineDep) -> Ready | JSONResponse:
    """200 once every model is loaded, on its device and warmed up, and while none keeps
    failing to decode; 503 otherwise."""
    failing = engine.failing
    if engine.ready and not engine.closing and not failing:
        return Ready(status="ready", models={name: True for name in engine.models})
    status = "shutting_down" if engine.closing else "failing" if failing else "loading"
    body = Ready(
        status=status,
        models={name: engine.ready and name not in failing for name in engine.models},
        failing=failing,
    )
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "1"})


@router.get("/info", response_model=Info)
async def info(engine: EngineDep, settings: SettingsDep) -> Info:
    """The models (vocabulary, size, architecture, training metrics, device) and the limits."""
    models = []
    for m in engine.models.values():
        f = m.facts()
        models.append(
            ModelInfo(
                name=m.name,
                default=m.name == engine.default,
                path=m.path,
                vocabulary=f.vocabulary,
                parameters=f.parameters,
                architecture=Architecture(
                    cell=f.cell,
                    layers=f.layers,
                    hidden=f.hidden,
                    embed=f.embed,
                    vocab_size=len(f.vocabulary),
                ),
                metrics=f.metrics,
                device=f.device,
                dtype=f.dtype,
                decode_weights=f.decode_weights,  # type: ignore[arg-type]
                decode_kernels=f.decode_kernels,  # type: ignore[arg-type]
                decode_failing=m.failing,
                decode_reason=f.decode_reason,
                batch_invariant=f.batch_invariant,
                batch_invariance=f.batch_invariance,
                text_index=f.text_index,  # type: ignore[arg-type]
            )
        )
    limits = Limits(
        max_n=settings.max_n,
        controls=controls_info(settings),
        max_prime_chars=settings.max_prime_chars,
        max_new_chars_limit=settings.max_new_chars_limit,
        max_concurrent=settings.max_concurrent,
        max_queue=settings.max_queue,
        max_body_bytes=settings.max_body_bytes,
        max_score_chars=settings.max_score_chars,
        auth_required=bool(settings.api_key_list),
        constraint=constraints.limits(settings),
    )
    return Info(models=models, limits=limits)


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}}
)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/", response_class=HTMLResponse, include_in_schema=True)
async def playground() -> HTMLResponse:
    """The playground page."""
    page = resources.files("app").joinpath("static/index.html")
    return HTMLResponse(page.read_text(encoding="utf-8"))
