"""Request IDs, the access log and per-route request metrics, as plain ASGI middleware
(so streaming responses pass through untouched)."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import AsciiJSONResponse, openai_error
from app.metrics import Metrics

access_log = logging.getLogger("charrnn.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        # A client's id is echoed only when it is safe to put in a header and a log line.
        request_id = supplied if _SAFE_ID.match(supplied) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # uvicorn's send is a method of its connection; its transport lets a stream whose
        # reader stalled be closed (see app/api/sse.py). Absent under other servers.
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        state["abort_connection"] = getattr(transport, "abort", None)
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_seconds.labels(label).observe(elapsed)
            access_log.info(
                '%s "%s %s" %d %.1fms id=%s',
                _client(scope),
                scope["method"],
                scope["path"],
                status,
                elapsed * 1e3,
                request_id,
            )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


class BodyLimitMiddleware:
    """Answer an oversized body with a JSON 413 that says what the limit is: at once when the
    declared Content-Length is too big, else (chunked uploads) as soon as the bytes read pass
    the limit. Bodies here are small, so a chunked one is read whole and replayed."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, route_limits: dict[str, int] | None = None
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Routes whose bodies have a limit of their own (POST /score takes long texts).
        self.route_limits = route_limits or {}

    def _limit(self, scope: Scope) -> int:
        return self.route_limits.get(scope["path"], self.max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            size = int(declared) if declared.isdigit() else 0
            if size > self._limit(scope):
                await self._too_large(scope, receive, send, size)
                return
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self._limit(scope):
                await self._too_large(scope, receive, send, total)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        limit = self._limit(scope)
        setting = (
            "CHARRNN_MAX_SCORE_CHARS"
            if scope["path"] in self.route_limits
            else "CHARRNN_MAX_BODY_BYTES"
        )
        message = f"request body of {size}+ bytes is over the limit of {limit} bytes ({setting})"
        if scope["path"].startswith("/v1/"):
            response = openai_error(413, message)
        else:
            response = AsciiJSONResponse({"detail": message}, status_code=413)
        await response(scope, receive, send)
