"""Error responses: FastAPI's shapes on native routes, OpenAI's shape under /v1; and the one
place where the engine's refusals and failures become HTTP statuses.

Bodies are rendered ASCII-only and never echo the raw input, so a lone surrogate, NaN or a
huge string in a request can never turn an error into a 500."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.engine import (
    GenerationFailed,
    NotReady,
    Overloaded,
    ShuttingDown,
    UnknownModel,
)

log = logging.getLogger("charrnn.errors")

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    503: "server_error",
}
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}

# What each refusal of the engine answers: status, message, Retry-After.
_ENGINE: dict[type[Exception], tuple[int, str, str | None]] = {
    Overloaded: (
        429,
        "the server is at its limit of concurrent and queued generations; retry later",
        "1",
    ),
    ShuttingDown: (503, "the server is shutting down", "5"),
    NotReady: (503, "the model is not loaded yet; retry shortly", "1"),
}


class AsciiJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def _clean(errors: list[Any]) -> list[dict[str, Any]]:
    """Keep type, loc and msg; drop the echoed input and context."""
    out = []
    for e in errors:
        loc = [p if isinstance(p, int) else str(p) for p in e.get("loc", ())]
        out.append(
            {
                "type": str(e.get("type", "value_error")),
                "loc": loc,
                "msg": str(e.get("msg", "invalid value")),
            }
        )
    return out


def openai_error(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> AsciiJSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "api_error"),
            "param": param,
            "code": code or _OPENAI_CODES.get(status),
        }
    }
    return AsciiJSONResponse(body, status_code=status, headers=headers)


def _error(
    request: Request,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> AsciiJSONResponse:
    """An error in the shape of the request's protocol."""
    if _is_openai(request):
        return openai_error(status, message, headers=headers, code=code)
    return AsciiJSONResponse({"detail": message}, status_code=status, headers=headers)


async def engine_handler(request: Request, exc: Exception) -> AsciiJSONResponse:
    """The engine said no before any work, or a whole-text generation failed."""
    if isinstance(exc, UnknownModel):
        return _error(request, 404, str(exc), code="model_not_found")
    if isinstance(exc, GenerationFailed):
        status = 503 if exc.failed.type == "unavailable" else 500
        return _error(request, status, exc.failed.message)
    status, message, retry = _ENGINE[type(exc)]
    return _error(request, status, message, {"Retry-After": retry} if retry else None)


async def validation_handler(request: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _clean(list(exc.errors()))
    if _is_openai(request):
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        loc = [str(p) for p in first["loc"] if p not in ("body", "query")]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return openai_error(400, message, param)
    return AsciiJSONResponse({"detail": errors}, status_code=422)


async def http_handler(request: Request, exc: Exception) -> AsciiJSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI answers a body that is not UTF-8 with a bare 400; it is a validation error.
        cause = exc.__cause__
        invalid = RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", cause.start),
                    "msg": f"the body is not valid UTF-8 (byte {cause.start}); send UTF-8 JSON",
                }
            ]
        )
        return await validation_handler(request, invalid)
    if isinstance(exc.__cause__, RecursionError):
        # JSON nested deeper than Python's parser recurses (a constraint's schema may nest
        # at most 64 levels): FastAPI's bare 400 would not say so.
        too_deep = RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body",),
                    "msg": "the body's JSON nests too deep to read; objects and lists may nest "
                    "a few hundred levels (a constraint's json_schema at most 64)",
                }
            ]
        )
        return await validation_handler(request, too_deep)
    headers = dict(exc.headers or {})
    if _is_openai(request):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":  # no such route
            message = (
                f"{request.method} {request.url.path} is not served: this server serves "
                "completion models; use POST /v1/completions (GET /v1/models lists them)"
            )
        return openai_error(exc.status_code, message, headers=headers)
    return AsciiJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


async def unexpected_handler(request: Request, exc: Exception) -> AsciiJSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    if _is_openai(request):
        return openai_error(500, "internal server error")
    return AsciiJSONResponse({"detail": "internal server error"}, status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(HTTPException, http_handler)
    for refusal in (*_ENGINE, UnknownModel, GenerationFailed):
        app.add_exception_handler(refusal, engine_handler)
    app.add_exception_handler(Exception, unexpected_handler)
