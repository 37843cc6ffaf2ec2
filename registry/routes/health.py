"""Liveness, readiness and metrics: unauthenticated, for orchestrators and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.exc import SQLAlchemyError

from modelhash.registry._metrics import Metrics
from modelhash.registry._migrations import current_revision
from modelhash.registry.routes._common import errors

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up. Touches nothing else."""
    return {"status": "ok"}


@router.get("/readyz", responses=errors(503))
def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and is at the newest migration; 503 otherwise."""
    head: str = request.app.state.head_revision
    try:
        revision = current_revision(request.app.state.engine)
    except SQLAlchemyError:
        return JSONResponse({"detail": "database unreachable"}, status_code=503)
    if revision != head:
        return JSONResponse(
            {
                "detail": f"database schema is at {revision or 'no revision'}, "
                f"not {head}: run 'modelhash db upgrade'"
            },
            status_code=503,
        )
    return JSONResponse({"status": "ready", "revision": revision})


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text format: request counts and latency by route template."""
    registry: Metrics = request.app.state.metrics
    return PlainTextResponse(
        registry.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
    )
