"""Platform reports on flags: a suspected false positive, or a confirmed hit.

A platform holding only a reader key sees matches and can say what it found. The
report is stored, attributed to the key and audited, and is shown to analysts in
the review queue; it never changes the flag's status, because a platform is not a
reviewer. One report per key, flag and kind: reporting again updates nothing.
"""

from __future__ import annotations

from sqlmodel import Session, col, func, select

from modelhash.registry._db import begin_write
from modelhash.registry.crud.audit import record
from modelhash.registry.crud.flags import get_flag
from modelhash.registry.crud.keys import Principal
from modelhash.registry.models import Flag, Report

__all__ = ["REPORT_KINDS", "count_reports", "create_report", "list_reports", "reports_of"]

#: ``false-positive``: the platform believes the match is wrong.
#: ``confirmed-hit``: the platform reviewed the upload and agrees it is the flagged model.
REPORT_KINDS: tuple[str, ...] = ("false-positive", "confirmed-hit")


def create_report(
    session: Session, *, flag_id: str, kind: str, note: str | None, actor: Principal
) -> tuple[Report, bool]:
    """Store ``actor``'s report on a flag; returns ``(report, created)``."""
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}")
    begin_write(session)
    flag = get_flag(session, flag_id=flag_id)
    if actor.key_id is not None:
        seen = session.exec(
            select(Report).where(
                Report.flag_id == flag.id, Report.key_id == actor.key_id, Report.kind == kind
            )
        ).first()
        if seen is not None:
            session.rollback()
            return seen, False
    report = Report(flag_id=flag.id, kind=kind, note=note, by=actor.label, key_id=actor.key_id)
    session.add(report)
    record(
        session,
        actor=actor,
        action="flag.reported",
        target_type="flag",
        target_id=flag.id,
        reason=note,
        detail={"kind": kind, "status": flag.status},
    )
    session.commit()
    return report, True


def reports_of(session: Session, *, flag_id: str) -> list[Report]:
    """Every report on one flag, oldest first."""
    return list(
        session.exec(select(Report).where(Report.flag_id == flag_id).order_by(col(Report.id)))
    )


def count_reports(session: Session) -> int:
    """How many reports there are."""
    return int(session.exec(select(func.count()).select_from(Report)).one())


def list_reports(
    session: Session, *, kind: str | None = None, limit: int = 100, offset: int = 0
) -> list[tuple[Report, Flag]]:
    """Reports with their flags, newest first, optionally of one kind."""
    query = select(Report, Flag).join(Flag, col(Flag.id) == col(Report.flag_id))
    if kind is not None:
        query = query.where(Report.kind == kind)
    rows = session.exec(query.order_by(col(Report.id).desc()).offset(offset).limit(limit))
    return [(r, f) for r, f in rows]
