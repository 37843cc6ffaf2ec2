"""Platform feedback on flags, and the review side of it.

Any key may report (platforms hold reader keys): ``POST /v1/flags/{id}/reports``.
Analysts read the reports of a flag, or the queue of all reports, as submitters.
A report never changes the flag's status.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from modelhash.registry.crud.flags import get_flag
from modelhash.registry.crud.reports import create_report, list_reports, reports_of
from modelhash.registry.deps import ReaderDep, SessionDep, SubmitterDep
from modelhash.registry.models import Report
from modelhash.registry.routes._common import errors
from modelhash.wire import ReportCreate, ReportKind, ReportPublic

__all__ = ["public", "router"]

router = APIRouter(prefix="/v1", tags=["reports"], responses=errors(401, 403, 503))

FlagId = Annotated[str, Path(max_length=64, description="The flag's id.")]


def public(report: Report) -> ReportPublic:
    """The wire form of a stored report."""
    return ReportPublic(
        id=report.id or 0, flag_id=report.flag_id, kind=report.kind,
        note=report.note, by=report.by, at=report.created_at,
    )


@router.post(
    "/flags/{flag_id}/reports",
    status_code=201,
    responses={200: {"model": ReportPublic, "description": "Already reported by this key."},
               **errors(404, 422)},
)
def report_flag(
    flag_id: FlagId, body: ReportCreate, session: SessionDep, principal: ReaderDep,
    response: Response,
) -> ReportPublic:
    """Report a suspected false positive or a confirmed hit (any key, readers included).

    The report is stored, attributed to the key and audited; the flag's status does
    not change. Reporting the same kind again answers 200 with the first report.
    """
    report, created = create_report(
        session, flag_id=flag_id, kind=body.kind, note=body.note, actor=principal
    )
    if not created:
        response.status_code = 200
    return public(report)


@router.get("/flags/{flag_id}/reports", responses=errors(404, 422))
def flag_reports(flag_id: FlagId, session: SessionDep, _: SubmitterDep) -> list[ReportPublic]:
    """The reports on one flag, oldest first (submitters and admins)."""
    flag = get_flag(session, flag_id=flag_id)
    return [public(r) for r in reports_of(session, flag_id=flag.id)]


@router.get("/reports", responses=errors(422))
def all_reports(
    session: SessionDep,
    _: SubmitterDep,
    kind: ReportKind | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[ReportPublic]:
    """Every report, newest first: the platform side of the review queue."""
    return [public(r) for r, _ in list_reports(session, kind=kind, limit=limit, offset=offset)]
