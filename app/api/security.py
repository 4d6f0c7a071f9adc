"""Optional bearer-key authentication for the generation routes."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


async def check_api_key(request: Request) -> None:
    """FastAPI dependency (async: see app/api/deps.py): 401 unless ``Authorization: Bearer <key>``
    names a configured key.

    Every key is compared in constant time, and all of them are compared, so the time taken
    says nothing about which key or how much of it matched. Keys are never logged."""
    keys: list[str] = request.app.state.settings.api_key_list
    if not keys:
        return
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    supplied_b = supplied.strip().encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(supplied_b, key.encode("utf-8"))
    if scheme.lower() != "bearer" or not ok:
        raise HTTPException(
            401,
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
