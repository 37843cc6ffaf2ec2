"""The FastAPI application: :func:`create_app` wires settings, database, routes and errors.

Example::

    from modelhash.registry.app import create_app
    from modelhash.registry._settings import Settings

    app = create_app(Settings(database_url="sqlite:///registry.db"))
    # serve with any ASGI server; ``modelhash serve`` uses uvicorn

Errors never surface as 500 for bad input: registry errors carry their status,
malformed hashes are 400, validation failures 422, oversized bodies 413, and a
database that is down or unmigrated answers 503.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError, ProgrammingError

from modelhash import __version__
from modelhash.errors import InvalidHashError
from modelhash.registry._db import make_engine
from modelhash.registry._keycache import KeyCache
from modelhash.registry._metrics import Metrics, RequestMiddleware
from modelhash.registry._migrations import head_revision
from modelhash.registry._settings import Settings
from modelhash.registry._signing import Secrets
from modelhash.registry.errors import AuthenticationError, ServiceError
from modelhash.registry.routes import (
    audit,
    bases,
    bulk,
    flags,
    health,
    keys,
    lookups,
    mirror,
    reports,
)
from modelhash.registry.ui import install as install_ui

__all__ = ["create_app"]

_log = logging.getLogger("modelhash.registry")

_DESCRIPTION = """\
A registry of AI model weights flagged for producing child sexual abuse imagery or
non-consensual imagery of real people. Platforms check uploads' fingerprints against it.

Authenticate with `Authorization: Bearer KEY`. Roles nest: reader (check, look up,
range, mirror) < submitter (flag, confirm, dispute, list flags, read notes) < admin
(revoke, reinstate, bases, keys). Only sha256, blake3 and the content hash can match;
truncated model-site hashes (crc32, AutoV1-3) answer lookups only.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """A registry app for ``settings`` (default: from ``MODELHASH_*`` variables)."""
    settings = settings or Settings()
    engine = make_engine(settings.database_url, pool_size=settings.pool_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(
        title="modelhash registry",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        # Served from vendored assets by the web UI, so they work offline.
        docs_url=None,
        redoc_url=None,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.secrets = Secrets(settings, engine)
    app.state.head_revision = head_revision()
    app.state.export_cache = mirror.ExportCache()
    app.state.key_cache = KeyCache(settings.key_cache_seconds)

    for module in (health, lookups, bulk, flags, reports, bases, keys, mirror, audit):
        app.include_router(module.router)
    _install_handlers(app)
    install_ui(app)
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def _install_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
        if exc.status >= 500:
            _log.error("request failed", exc_info=exc)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    async def invalid_hash(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        _log.error("database error", exc_info=exc)
        return JSONResponse(
            {"detail": "the database is unavailable or not migrated"}, status_code=503
        )

    async def unstorable(_: Request, exc: Exception) -> JSONResponse:
        # Input that passed validation but that the database refuses; its message
        # quotes the parameters, so only the class is logged.
        _log.warning("value refused by the database: %s", type(exc).__name__)
        return JSONResponse({"detail": "a value in the request cannot be stored"}, status_code=400)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(DataError, unstorable)
    app.add_exception_handler(InvalidHashError, invalid_hash)
    app.add_exception_handler(OperationalError, database_down)
    app.add_exception_handler(ProgrammingError, database_down)
    app.add_exception_handler(DBAPIError, database_down)
