"""The audit log and the change feed, written in the caller's transaction.

Every state change writes its audit event before the caller commits, so a change
and its record are committed together or not at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, func, select

from modelhash.registry.models import AuditEvent, ChangeEvent

if TYPE_CHECKING:
    from modelhash.registry.crud.keys import Principal

__all__ = ["emit_change", "latest_cursor", "list_audit", "list_changes", "record"]


def record(
    session: Session,
    *,
    actor: Principal,
    action: str,
    target_type: str,
    target_id: str,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one audit event to the current transaction."""
    session.add(
        AuditEvent(
            actor=actor.label,
            actor_key_id=actor.key_id,
            action=action,
            target_type=target_type,
            target_id=target_id,
            reason=reason,
            detail=detail,
        )
    )


def emit_change(session: Session, *, kind: str, flag_id: str, data: dict[str, Any]) -> None:
    """Add one entry to the mirror feed in the current (write-locked) transaction."""
    session.add(ChangeEvent(kind=kind, flag_id=flag_id, data=data))


def list_changes(session: Session, *, since: int, limit: int) -> tuple[list[ChangeEvent], bool]:
    """Changes after cursor ``since``, oldest first, and whether more follow."""
    rows = list(
        session.exec(
            select(ChangeEvent)
            .where(col(ChangeEvent.id) > since)
            .order_by(col(ChangeEvent.id))
            .limit(limit + 1)
        )
    )
    return rows[:limit], len(rows) > limit


def latest_cursor(session: Session) -> int:
    """The cursor of the newest change, or 0 when there is none."""
    newest = session.exec(select(func.max(ChangeEvent.id))).one()
    return int(newest or 0)


def list_audit(session: Session, *, target_type: str, target_id: str) -> list[AuditEvent]:
    """The audit trail of one record, oldest first."""
    return list(
        session.exec(
            select(AuditEvent)
            .where(AuditEvent.target_type == target_type, AuditEvent.target_id == target_id)
            .order_by(col(AuditEvent.id))
        )
    )
