"""Audit log search (admins); a flag's own trail is under ``/v1/flags/{id}/audit``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response

from modelhash.registry.crud.search import activity
from modelhash.registry.deps import AdminDep, SessionDep
from modelhash.registry.routes._common import errors
from modelhash.wire import AuditRecord

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["audit"], responses=errors(401, 403, 503))


@router.get("/audit", responses=errors(422))
def search_audit(
    session: SessionDep,
    _: AdminDep,
    response: Response,
    actor: Annotated[str | None, Query(max_length=64, description="Part of the actor.")] = None,
    action: Annotated[str | None, Query(max_length=64, description="Part of the action.")] = None,
    target: Annotated[str | None, Query(max_length=64, description="A record's id.")] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[AuditRecord]:
    """Audit events, newest first; the header X-Total-Count has the number matching."""
    rows, total = activity(
        session, actor=actor, action=action, target=target, since=since, until=until,
        limit=limit, offset=offset,
    )
    response.headers["X-Total-Count"] = str(total)
    return [AuditRecord.model_validate(e, from_attributes=True) for e in rows]
