"""Flags: submit, read, list, confirm, dispute, revoke, reinstate, and their audit trail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from sqlmodel import Session

from modelhash.registry._body import body_problem
from modelhash.registry.crud.audit import list_audit
from modelhash.registry.crud.flags import (
    change_status,
    create_flag,
    fingerprints_of,
    get_flag,
    list_flags,
    opinions_of,
)
from modelhash.registry.crud.keys import Principal
from modelhash.registry.deps import AdminDep, ReaderDep, SessionDep, SubmitterDep
from modelhash.registry.errors import UnprocessableError
from modelhash.registry.models import Flag
from modelhash.registry.routes._common import errors
from modelhash.wire import AuditRecord, FlagCreate, FlagDetail, FlagStatus, Opinion, ReasonBody

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


@router.get("", responses=errors(422))
def list_all(
    session: SessionDep,
    principal: SubmitterDep,
    status: FlagStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> list[FlagDetail]:
    """List flags, newest first (submitters and admins)."""
    flags = list_flags(session, status=status, limit=limit, offset=offset)
    hashes = fingerprints_of(session, flag_ids=[f.id for f in flags])
    return [_detail(session, f, principal, hashes[f.id]) for f in flags]


@router.get("/{flag_id}", responses=errors(404, 422))
def read_flag(flag_id: FlagId, session: SessionDep, principal: ReaderDep) -> FlagDetail:
    """One flag. Readers get it redacted: no note, evidence, files or opinions."""
    return _detail(session, get_flag(session, flag_id=flag_id), principal)


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
def audit_trail(flag_id: FlagId, session: SessionDep, _: AdminDep) -> list[AuditRecord]:
    """Every recorded change to a flag, oldest first (admins)."""
    flag = get_flag(session, flag_id=flag_id)
    return [
        AuditRecord.model_validate(e, from_attributes=True)
        for e in list_audit(session, target_type="flag", target_id=flag.id)
    ]
