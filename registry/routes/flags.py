"""Flags: submit, read, list, confirm, dispute, revoke, reinstate, and their audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from sqlmodel import Session

from modelhash.registry._body import body_problem
from modelhash.registry.crud.audit import list_audit
from modelhash.registry.crud.flags import (
    change_status,
    create_flag,
    fingerprints_of,
    get_flag,
    opinions_of,
)
from modelhash.registry.crud.keys import Principal
from modelhash.registry.crud.search import FlagQuery, search_flags
from modelhash.registry.deps import AdminDep, ReaderDep, SessionDep, SubmitterDep
from modelhash.registry.errors import BadRequestError, PermissionDeniedError, UnprocessableError
from modelhash.registry.models import Flag
from modelhash.registry.routes._common import errors
from modelhash.wire import (
    AuditRecord,
    Category,
    FlagCreate,
    FlagDetail,
    FlagStatus,
    Opinion,
    ReasonBody,
    Severity,
)

__all__ = ["router"]

router = APIRouter(prefix="/v1/flags", tags=["flags"], responses=errors(401, 403, 503))

FlagId = Annotated[str, Path(max_length=64, description="The flag's id.")]


def _detail(
    session: Session,
    flag: Flag,
    principal: Principal,
    fingerprints: dict[str, list[str]] | None = None,
) -> FlagDetail:
    if fingerprints is None:
        fingerprints = fingerprints_of(session, flag_ids=[flag.id])[flag.id]
    out = FlagDetail(
        id=flag.id,
        category=flag.category,
        severity=flag.severity,
        status=flag.status,
        created_at=flag.created_at,
        updated_at=flag.updated_at,
        fingerprints=fingerprints,
        redacted=not principal.allows("submitter"),
    )
    if out.redacted:
        return out
    out.note = flag.note
    out.evidence = flag.evidence
    # Rows stored before bodies were bounded may hold JSON no answer can carry;
    # they are left out rather than failing every page that lists the flag.
    out.files = flag.files if body_problem(flag.files) is None else None
    out.model = flag.model if body_problem(flag.model) is None else None
    out.created_by = flag.created_by
    out.status_reason = flag.status_reason
    out.opinions = [
        Opinion(kind=o.kind, reason=o.reason, by=o.by, at=o.created_at)
        for o in opinions_of(session, flag_id=flag.id)
    ]
    return out


@router.post(
    "",
    status_code=201,
    responses={
        200: {"model": FlagDetail, "description": "Already flagged: the existing flag."},
        **errors(409, 413, 422),
    },
)
def submit_flag(
    body: FlagCreate, session: SessionDep, principal: SubmitterDep, response: Response
) -> FlagDetail:
    """Flag a model by its fingerprint map (201), or get the flag it already has (200).

    A second submission of a flagged model is recorded as that submitter's
    confirmation. A model matching a reference base is refused (409) unless an admin
    sets ``force``.
    """
    answers: list[FlagDetail] = []

    def answer(flag: Flag) -> None:
        # Render the answer before committing: what cannot be answered is not stored.
        detail = _detail(session, flag, principal)
        try:
            detail.model_dump_json()
        except (ValueError, RecursionError):
            raise UnprocessableError("the flag could not be rendered back; nothing was stored")\
                from None
        answers.append(detail)

    _, created = create_flag(session, data=body, actor=principal, before_commit=answer)
    if not created:
        response.status_code = 200
    return answers[-1]


_LIST_PARAMS = frozenset(
    {"q", "status", "category", "severity", "submitter", "since", "until", "reported",
     "limit", "offset"}
)


def flag_query(
    principal: Principal,
    q: str | None = None,
    status: str | None = None,
    category: str | None = None,
    severity: str | None = None,
    submitter: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    reported: bool = False,
) -> FlagQuery:
    """The search these parameters describe; text search only for roles that read notes."""
    for name, when in (("since", since), ("until", until)):
        if when is not None and when.tzinfo is None:
            raise BadRequestError(f"{name}: give a time zone (for example 2026-01-31T00:00:00Z)")
    return FlagQuery(
        q=q, status=status, category=category, severity=severity, submitter=submitter,
        since=since, until=until, reported=reported, text=principal.allows("submitter"),
    )


def refuse_unknown(request: Request, known: frozenset[str]) -> None:
    """400 for a query parameter this route does not know, so a typo never widens a search."""
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise BadRequestError(
            f"unknown query parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )


@router.get(
    "",
    responses=errors(400, 422),
    response_description="The page of flags; the header X-Total-Count has the number matching.",
)
def list_all(
    session: SessionDep,
    principal: SubmitterDep,
    request: Request,
    response: Response,
    q: Annotated[
        str | None,
        Query(max_length=200, description="Any hash form, a flag id, or text in notes."),
    ] = None,
    status: FlagStatus | None = None,
    category: Category | None = None,
    severity: Severity | None = None,
    submitter: Annotated[
        str | None, Query(max_length=64, description="Part of the submitting key's label.")
    ] = None,
    since: Annotated[datetime | None, Query(description="Created at or after.")] = None,
    until: Annotated[datetime | None, Query(description="Created before.")] = None,
    reported: Annotated[bool, Query(description="Only flags with platform reports.")] = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[FlagDetail]:
    """Search flags, newest first (submitters and admins); unknown parameters are refused.

    The total number of matching flags is in the ``X-Total-Count`` header.
    """
    refuse_unknown(request, _LIST_PARAMS)
    query = flag_query(
        principal, q, status, category, severity, submitter, since, until, reported
    )
    flags, total = search_flags(session, query, limit=limit, offset=offset)
    response.headers["X-Total-Count"] = str(total)
    hashes = fingerprints_of(session, flag_ids=[f.id for f in flags])
    return [_detail(session, f, principal, hashes[f.id]) for f in flags]


@router.get("/{flag_id}", responses=errors(404, 422))
def read_flag(flag_id: FlagId, session: SessionDep, principal: ReaderDep) -> FlagDetail:
    """One flag. Readers get it redacted: no note, evidence, files or opinions."""
    return _detail(session, get_flag(session, flag_id=flag_id), principal)


def may_read_audit(principal: Principal, flag: Flag) -> bool:
    """Admins read every flag's audit trail; a submitter reads those of their own flags."""
    return principal.allows("admin") or (
        principal.key_id is not None and principal.key_id == flag.created_by_key_id
    )


def _act(
    action: str, flag_id: str, body: ReasonBody, session: Session, principal: Principal
) -> FlagDetail:
    flag = change_status(
        session, flag_id=flag_id, action=action, reason=body.reason, actor=principal
    )
    return _detail(session, flag, principal)


@router.post("/{flag_id}/dispute", responses=errors(404, 409, 422))
def dispute(
    flag_id: FlagId, body: ReasonBody, session: SessionDep, principal: SubmitterDep
) -> FlagDetail:
    """Dispute a flag: it becomes ``disputed`` at once (still a match) until an admin acts."""
    return _act("dispute", flag_id, body, session, principal)


@router.post("/{flag_id}/confirm", responses=errors(404, 409, 422))
def confirm(
    flag_id: FlagId, body: ReasonBody, session: SessionDep, principal: SubmitterDep
) -> FlagDetail:
    """Record that this submitter agrees with the flag; the status does not change."""
    return _act("confirm", flag_id, body, session, principal)


@router.post("/{flag_id}/revoke", responses=errors(404, 409, 422))
def revoke(
    flag_id: FlagId, body: ReasonBody, session: SessionDep, principal: AdminDep
) -> FlagDetail:
    """Revoke a flag (admins): checks stop matching it at once; it stays visible as revoked."""
    return _act("revoke", flag_id, body, session, principal)


@router.post("/{flag_id}/reinstate", responses=errors(404, 409, 422))
def reinstate(
    flag_id: FlagId, body: ReasonBody, session: SessionDep, principal: AdminDep
) -> FlagDetail:
    """Make a disputed or revoked flag active again (admins)."""
    return _act("reinstate", flag_id, body, session, principal)


@router.get("/{flag_id}/audit", responses=errors(404, 422))
def audit_trail(
    flag_id: FlagId, session: SessionDep, principal: SubmitterDep
) -> list[AuditRecord]:
    """Every recorded change to a flag, oldest first (admins, and the flag's submitter)."""
    flag = get_flag(session, flag_id=flag_id)
    if not may_read_audit(principal, flag):
        raise PermissionDeniedError("only an admin or the flag's submitter may read its audit")
    return [
        AuditRecord.model_validate(e, from_attributes=True)
        for e in list_audit(session, target_type="flag", target_id=flag.id)
    ]
