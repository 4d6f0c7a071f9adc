"""Optional bearer-key authentication: the generation routes' keys, and the admin routes'."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


async def check_api_key(request: Request) -> None:
    """FastAPI dependency (async: see app/api/deps.py): 401 unless ``Authorization: Bearer <key>``
    names a configured key (none configured: open)."""
    keys: list[str] = request.app.state.settings.api_key_list
    if keys:
        _check(request, keys, "API key")


async def check_admin_key(request: Request) -> None:
    """401 unless ``Authorization: Bearer <key>`` names an admin key (``CHARRNN_ADMIN_KEYS``;
    without any, the admin routes are not mounted at all)."""
    _check(request, request.app.state.settings.admin_key_list, "admin key")


def _check(request: Request, keys: list[str], what: str) -> None:
    """Every key is compared in constant time, and all of them are compared, so the time
    taken says nothing about which key or how much of it matched. Keys are never logged."""
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    supplied_b = supplied.strip().encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(supplied_b, key.encode("utf-8"))
    if scheme.lower() != "bearer" or not ok:
        raise HTTPException(
            401,
            f"missing or invalid {what}: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
