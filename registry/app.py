"""The FastAPI application: :func:`create_app` wires settings, database, routes and errors.

Example::

    from modelhash.registry.app import create_app
    from modelhash.registry._settings import Settings

    app = create_app(Settings(database_url="sqlite:///registry.db"))
    # serve with any ASGI server; ``modelhash serve`` uses uvicorn

Errors never surface as 500 for bad input: registry errors carry their status,
malformed hashes are 400, validation failures 422 (JSON nested too deep or text that
is not valid Unicode included, see :mod:`modelhash.registry._body`), oversized bodies
413, and any database error 503 (:mod:`modelhash.registry._handlers`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from modelhash import __version__
from modelhash.registry._body import JsonBodyGuard
from modelhash.registry._db import make_engine
from modelhash.registry._handlers import install_handlers
from modelhash.registry._logging import configure_logging
from modelhash.registry._metrics import Metrics, RequestMiddleware
from modelhash.registry._migrations import head_revision
from modelhash.registry._settings import Settings
from modelhash.registry._signing import Secrets
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
    configure_logging(settings.log_level)
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
    metrics = Metrics(engine)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.secrets = Secrets(settings, engine)
    app.state.head_revision = head_revision()
    app.state.export_cache = mirror.ExportCache()

    for module in (health, lookups, bulk, flags, reports, bases, keys, mirror, audit):
        app.include_router(module.router)
    install_handlers(app)
    install_ui(app)
    app.add_middleware(JsonBodyGuard)
    app.add_middleware(RequestMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app
