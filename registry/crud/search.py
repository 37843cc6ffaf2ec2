"""Flag search: the filters the REST listing, the CSV export and the web UI share.

One :class:`FlagQuery` describes a search, so every surface filters the same way:
``q`` is any accepted hash form (bare hex of any length an algorithm uses, or
``algorithm:hex``), a flag id, or (for roles that may read notes) text in the note
or evidence. The answer carries the total count, so callers can page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, or_
from sqlmodel import Session, col, select

from modelhash.errors import InvalidHashError
from modelhash.fingerprint import parse_hash
from modelhash.registry.models import AuditEvent, Fingerprint, Flag, Report, WeakHash

__all__ = ["FlagQuery", "activity", "counts", "search_flags"]

_LIKE_ESCAPE = "\\"


@dataclass(frozen=True)
class FlagQuery:
    """A flag search. Every field is optional; given fields must all hold."""

    q: str | None = None
    status: str | None = None
    category: str | None = None
    severity: str | None = None
    submitter: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    reported: bool = False
    text: bool = False
    """Whether ``q`` may also search note and evidence text (submitters and admins)."""

    def filters(self) -> list[ColumnElement[bool]]:
        """The WHERE clauses of this search, on the ``flag`` table."""
        out: list[ColumnElement[bool]] = []
        if self.status:
            out.append(col(Flag.status) == self.status)
        if self.category:
            out.append(col(Flag.category) == self.category)
        if self.severity:
            out.append(col(Flag.severity) == self.severity)
        if self.submitter:
            out.append(col(Flag.created_by).ilike(_contains(self.submitter), escape=_LIKE_ESCAPE))
        if self.since is not None:
            out.append(col(Flag.created_at) >= self.since)
        if self.until is not None:
            out.append(col(Flag.created_at) < self.until)
        if self.reported:
            out.append(col(Flag.id).in_(select(Report.flag_id)))
        if self.q and self.q.strip():
            out.append(self._matching(self.q.strip()))
        return out

    def _matching(self, q: str) -> ColumnElement[bool]:
        either: list[ColumnElement[bool]] = [col(Flag.id) == q.lower()[:36]]
        try:
            digests = parse_hash(q)
        except InvalidHashError:
            digests = []
        for table in (Fingerprint, WeakHash):
            pairs = [
                and_(col(table.algorithm) == d.algorithm, col(table.value) == d.hex)
                for d in digests
            ]
            if pairs:
                either.append(col(Flag.id).in_(select(table.flag_id).where(or_(*pairs))))
        if self.text:
            like = _contains(q)
            either.append(col(Flag.note).ilike(like, escape=_LIKE_ESCAPE))
            either.append(col(Flag.evidence).ilike(like, escape=_LIKE_ESCAPE))
        return or_(*either) if either else false()


def _contains(text: str) -> str:
    escaped = (
        text.replace(_LIKE_ESCAPE, _LIKE_ESCAPE * 2).replace("%", "\\%").replace("_", "\\_")
    )
    return f"%{escaped}%"


def search_flags(
    session: Session, query: FlagQuery, *, limit: int, offset: int
) -> tuple[list[Flag], int]:
    """Flags matching ``query``, newest first, one page of them, and how many match in all."""
    where = query.filters()
    total = session.exec(select(func.count()).select_from(Flag).where(*where)).one()
    rows = session.exec(
        select(Flag)
        .where(*where)
        .order_by(col(Flag.created_at).desc(), col(Flag.id))
        .offset(offset)
        .limit(limit)
    )
    return list(rows), int(total)


def counts(session: Session, column: str) -> dict[str, int]:
    """How many flags have each value of ``column`` (``status``, ``category``, ``severity``)."""
    field: Any = {"status": Flag.status, "category": Flag.category, "severity": Flag.severity}[
        column
    ]
    rows = session.exec(select(field, func.count()).group_by(field))
    return {str(value): int(n) for value, n in rows}


def activity(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[AuditEvent], int]:
    """Audit events, newest first, filtered; and how many match in all."""
    where: list[ColumnElement[bool]] = []
    if actor:
        where.append(col(AuditEvent.actor).ilike(_contains(actor), escape=_LIKE_ESCAPE))
    if action:
        where.append(col(AuditEvent.action).ilike(_contains(action), escape=_LIKE_ESCAPE))
    if target:
        where.append(col(AuditEvent.target_id) == target)
    if since is not None:
        where.append(col(AuditEvent.at) >= since)
    if until is not None:
        where.append(col(AuditEvent.at) < until)
    total = session.exec(select(func.count()).select_from(AuditEvent).where(*where)).one()
    rows = session.exec(
        select(AuditEvent)
        .where(*where)
        .order_by(col(AuditEvent.id).desc())
        .offset(offset)
        .limit(limit)
    )
    return list(rows), int(total)
