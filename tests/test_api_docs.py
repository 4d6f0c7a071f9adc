"""docs/api.md keeps in step with the app: every route the app serves is documented there.

In-process and fast: the app is built (not started: no model is loaded) and its OpenAPI
schema and route table are read."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from starlette.routing import Mount, Route

from app.config import Settings
from app.main import create_app
from tests.server import ROOT

DOC = ROOT / "docs/api.md"
# FastAPI's own helper page for Swagger UI's OAuth2 flow, which this service does not use.
UNDOCUMENTED = {"/docs/oauth2-redirect"}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def app() -> FastAPI:
    return create_app(Settings(admin_keys="docs"))  # the admin routes too


def test_every_route_in_the_openapi_schema_is_documented(app: FastAPI, doc: str):
    operations = [
        f"{method.upper()} {path}"
        for path, item in app.openapi()["paths"].items()
        for method in item
    ]
    assert len(operations) >= 15  # the schema was read, not an empty stand-in
    missing = [op for op in operations if f"`{op}`" not in doc]
    assert not missing, f"docs/api.md does not document: {missing}"


def test_every_route_outside_the_schema_is_documented(app: FastAPI, doc: str):
    """The OpenAPI console and schema, and the static files' mount."""
    paths = [r.path for r in app.routes if isinstance(r, Route | Mount)]
    assert "/openapi.json" in paths and "/static" in paths
    missing = [p for p in paths if p not in UNDOCUMENTED and not re.search(rf"`[^`]*{p}", doc)]
    assert not missing, f"docs/api.md does not mention: {missing}"


def test_documented_routes_exist(app: FastAPI, doc: str):
    """The other way round: a route the reference names in its table is served (the chat
    route is served as a 404 by design, see docs/api.md)."""
    served = {
        f"{method.upper()} {path}"
        for path, item in app.openapi()["paths"].items()
        for method in item
    }
    table = re.findall(r"^\| `(GET|POST) (/[^`]*)` \|", doc, flags=re.M)
    assert table, "the routes table of docs/api.md was not found"
    extra = [f"{m} {p}" for m, p in table if f"{m} {p}" not in served]
    assert set(extra) <= {"POST /v1/chat/completions"}, extra
