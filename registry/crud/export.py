"""The full list as one document, for offline mirrors.

The document is read in one snapshot (REPEATABLE READ on PostgreSQL; a single read
transaction on SQLite), so its ``cursor`` says exactly which changes it includes: a
mirror loads the export, then follows ``/v1/changes?since=cursor``.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlmodel import Session, col, select

from modelhash._export import EXPORT_FORMAT
from modelhash.registry.crud.audit import latest_cursor
from modelhash.registry.models import Fingerprint, Flag, WeakHash
from modelhash.wire import STRONG_ALGORITHMS

__all__ = ["export_document"]


def export_document(session: Session) -> dict[str, Any]:
    """Every flag with its status and hashes, and the feed cursor it is current to."""
    if session.in_transaction():
        session.commit()
    if session.get_bind().dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    cursor = latest_cursor(session)
    hashes: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for table in (Fingerprint, WeakHash):
        rows = session.exec(
            select(table.flag_id, table.algorithm, table.value).order_by(col(table.id))
        )
        for flag_id, algorithm, value in rows:
            hashes[flag_id][algorithm].append(value)
    flags = list(
        session.exec(
            select(Flag.id, Flag.category, Flag.severity, Flag.status).order_by(
                col(Flag.created_at), col(Flag.id)
            )
        )
    )
    session.rollback()
    return {
        "format": EXPORT_FORMAT,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cursor": cursor,
        "strong_algorithms": sorted(STRONG_ALGORITHMS),
        "flags": [
            {
                "id": flag_id,
                "category": category,
                "severity": severity,
                "status": status,
                "fingerprints": dict(sorted(hashes[flag_id].items())),
            }
            for flag_id, category, severity, status in flags
        ],
    }
