"""Bulk import of hash lists and the CSV export of flags (submitters and admins)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine
from sqlmodel import Session

from modelhash.registry.crud.bulk import export_csv, import_rows, parse_import
from modelhash.registry.crud.flags import fingerprints_of
from modelhash.registry.crud.search import FlagQuery, search_flags
from modelhash.registry.deps import SessionDep, SubmitterDep
from modelhash.registry.routes._common import errors
from modelhash.registry.routes.flags import flag_query, refuse_unknown
from modelhash.wire import Category, FlagStatus, ImportRequest, ImportResult, Severity

__all__ = ["router", "stream_export"]

router = APIRouter(prefix="/v1", tags=["bulk"], responses=errors(401, 403, 503))

_EXPORT_PARAMS = frozenset(
    {"q", "status", "category", "severity", "submitter", "since", "until", "reported"}
)
_PAGE = 1000


@router.post("/flags/import", responses=errors(400, 413, 422))
def import_flags(body: ImportRequest, session: SessionDep, principal: SubmitterDep) -> ImportResult:
    """Flag every row of a CSV or a plain hash list; one result per row, in order.

    A row that fails (a malformed hash, no category, a reference base) reports its
    error and the others go on; a row already flagged answers ``exists`` with the
    flag's id and changes nothing. Up to 5000 rows per request.
    """
    rows = import_rows(session, parse_import(body), actor=principal)
    return ImportResult(
        created=sum(r.status == "created" for r in rows),
        existing=sum(r.status == "exists" for r in rows),
        failed=sum(r.status == "error" for r in rows),
        rows=rows,
    )


def stream_export(engine: Engine, query: FlagQuery) -> Iterator[str]:
    """The CSV export of every flag matching ``query``, read a page at a time.

    It opens its own database session: the response streams after the request's
    own session has closed.
    """
    with Session(engine) as session:
        yield from _export_pages(session, query)


def _export_pages(session: Session, query: FlagQuery) -> Iterator[str]:
    offset = 0
    header = True
    while True:
        flags, _ = search_flags(session, query, limit=_PAGE, offset=offset)
        hashes = fingerprints_of(session, flag_ids=[f.id for f in flags])
        lines = export_csv(flags, hashes)
        first = next(lines)
        if header:
            yield first
            header = False
        yield from lines
        if len(flags) < _PAGE:
            return
        offset += _PAGE


@router.get(
    "/flags.csv",
    responses={200: {"content": {"text/csv": {}}, "description": "The flags as CSV."},
               **errors(400, 422)},
    response_class=StreamingResponse,
)
def export_flags(
    principal: SubmitterDep,
    request: Request,
    q: Annotated[str | None, Query(max_length=200)] = None,
    status: FlagStatus | None = None,
    category: Category | None = None,
    severity: Severity | None = None,
    submitter: Annotated[str | None, Query(max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    reported: bool = False,
) -> StreamingResponse:
    """Every flag matching the same filters as the listing, as CSV (dates, submitter,
    status, fingerprints, note); the import reads this format back."""
    refuse_unknown(request, _EXPORT_PARAMS)
    query = flag_query(principal, q, status, category, severity, submitter, since, until, reported)
    return StreamingResponse(
        stream_export(request.app.state.engine, query),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="flags.csv"'},
    )
