"""Flags: create (idempotently), read, dispute, confirm, revoke and reinstate.

Every function that changes state takes the registry's writer lock, writes its audit
event (and, where a mirror cares, a change-feed entry) and commits once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from modelhash.fingerprint import Digest
from modelhash.registry._db import begin_write
from modelhash.registry.crud.audit import emit_change, record
from modelhash.registry.crud.bases import matching_base
from modelhash.registry.crud.keys import Principal
from modelhash.registry.crud.sketches import (
    PreparedSketch,
    prepare_flag_sketch,
    refuse_near_base,
    store_flag_sketch,
)
from modelhash.registry.errors import (
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    ReferenceBaseConflict,
)
from modelhash.registry.models import Fingerprint, Flag, Opinion, WeakHash, utcnow
from modelhash.wire import STRONG_ALGORITHMS, FlagCreate

__all__ = [
    "COUNTING_STATUSES",
    "change_status",
    "create_flag",
    "fingerprints_of",
    "get_flag",
    "list_flags",
    "opinions_of",
]

#: Statuses that make a check's verdict "match". Revoked flags are still shown.
COUNTING_STATUSES = ("active", "disputed")

_RETRIES = 5


def get_flag(session: Session, *, flag_id: str) -> Flag:
    """The flag with ``flag_id``, or NotFoundError."""
    flag = session.get(Flag, flag_id) if len(flag_id) <= 36 else None
    if flag is None:
        raise NotFoundError(f"no flag {flag_id!r}")
    return flag


def list_flags(session: Session, *, status: str | None, limit: int, offset: int) -> list[Flag]:
    """Flags, newest first, optionally of one status."""
    query = select(Flag)
    if status is not None:
        query = query.where(Flag.status == status)
    query = query.order_by(col(Flag.created_at).desc(), col(Flag.id)).offset(offset).limit(limit)
    return list(session.exec(query))


def fingerprints_of(
    session: Session, *, flag_ids: Iterable[str]
) -> dict[str, dict[str, list[str]]]:
    """``flag_id -> algorithm -> values`` for strong and weak hashes alike."""
    ids = list(flag_ids)
    out: dict[str, dict[str, list[str]]] = {i: defaultdict(list) for i in ids}
    if not ids:
        return out
    for table in (Fingerprint, WeakHash):
        rows = session.exec(
            select(table.flag_id, table.algorithm, table.value)
            .where(col(table.flag_id).in_(ids))
            .order_by(col(table.id))
        )
        for flag_id, algorithm, value in rows:
            out[flag_id][algorithm].append(value)
    return {i: dict(sorted(v.items())) for i, v in out.items()}


def opinions_of(session: Session, *, flag_id: str) -> list[Opinion]:
    """Every confirmation and dispute of a flag, oldest first."""
    return list(
        session.exec(select(Opinion).where(Opinion.flag_id == flag_id).order_by(col(Opinion.id)))
    )


def create_flag(
    session: Session,
    *,
    data: FlagCreate,
    actor: Principal,
    before_commit: Callable[[Flag], None] | None = None,
) -> tuple[Flag, bool]:
    """Flag a model, or find the flag it already has; returns ``(flag, created)``.

    ``before_commit`` sees the flag once it is written but not yet committed; the
    route builds and serialises its answer there, so that nothing is committed that
    could not then be answered (an exception rolls the write back).

    Flagging is idempotent: if any strong hash is already flagged, the existing flag
    is returned, hashes it lacked are added to it, and the submission is recorded as
    the submitter's confirming opinion. A model that matches a reference base is
    refused unless an admin forces it. Races between writers end in one flag: the
    loser's insert violates the unique (algorithm, value) and is retried, finding
    the winner's flag.
    """
    if data.force and not actor.allows("admin"):
        raise PermissionDeniedError("only an admin may force a flag over a reference base")
    digests = [Digest(a, v) for a, v in data.fingerprint.items()]
    for _ in range(_RETRIES):
        try:
            result = _create_once(session, data=data, digests=digests, actor=actor)
        except IntegrityError:
            session.rollback()
            continue
        if before_commit is not None:
            before_commit(result[0])
        session.commit()
        return result
    raise ConflictError("the flag could not be stored: too many concurrent writers, retry")


def _create_once(
    session: Session, *, data: FlagCreate, digests: list[Digest], actor: Principal
) -> tuple[Flag, bool]:
    begin_write(session)
    strong = [d for d in digests if d.algorithm in STRONG_ALGORITHMS]
    taken = _strong_owners(session, strong)
    if taken:
        flag = min(
            (get_flag(session, flag_id=f) for f in set(taken.values())),
            key=lambda f: (f.created_at, f.id),
        )
        added = _attach(session, flag=flag, digests=digests, taken=taken)
        if added:
            flag.updated_at = utcnow()
            session.add(flag)
        _add_opinion(session, flag=flag, actor=actor, kind="confirm", reason=data.note)
        record(
            session,
            actor=actor,
            action="flag.resubmitted",
            target_type="flag",
            target_id=flag.id,
            reason=data.note,
            detail={
                "category": data.category,
                "severity": data.severity,
                "added": [str(d) for d in added],
            },
        )
        session.flush()
        return flag, False

    base = matching_base(session, digests=strong)
    if base is not None and not data.force:
        raise ReferenceBaseConflict(base.id, base.name)
    sketch = data.parsed_sketch()
    prepared: PreparedSketch | None = None
    if sketch is not None:
        prepared = prepare_flag_sketch(session, sketch)
        refuse_near_base(prepared, force=data.force)
    flag = Flag(
        category=data.category,
        severity=data.severity,
        note=data.note,
        evidence=data.evidence,
        files=data.files,
        model=data.model,
        created_by=actor.label,
        created_by_key_id=actor.key_id,
    )
    session.add(flag)
    session.flush()
    _attach(session, flag=flag, digests=digests, taken={}, feed=False)
    _add_opinion(session, flag=flag, actor=actor, kind="confirm", reason=None)
    detail: dict[str, Any] = {"fingerprint": {d.algorithm: d.hex for d in digests}}
    if base is not None:
        detail["forced_over_base"] = base.id
    if prepared is not None and sketch is not None:
        store_flag_sketch(session, flag_id=flag.id, prepared=prepared, algorithm=sketch.algorithm)
        detail["sketch"] = {
            "kind": prepared.kind,
            "base_id": prepared.base_id,
            "tensors": prepared.tensors,
        }
        if prepared.near_base is not None:
            detail["forced_over_base"] = prepared.near_base[0]
    record(
        session,
        actor=actor,
        action="flag.created",
        target_type="flag",
        target_id=flag.id,
        reason=data.note,
        detail=detail,
    )
    emit_change(
        session,
        kind="flag.created",
        flag_id=flag.id,
        data={
            "category": flag.category,
            "severity": flag.severity,
            "status": flag.status,
            "fingerprints": _as_map(digests),
        },
    )
    session.flush()
    return flag, True


def _strong_owners(session: Session, strong: list[Digest]) -> dict[Digest, str]:
    if not strong:
        return {}
    out: dict[Digest, str] = {}
    for digest in strong:
        owner = session.exec(
            select(Fingerprint.flag_id).where(
                Fingerprint.algorithm == digest.algorithm, Fingerprint.value == digest.hex
            )
        ).first()
        if owner is not None:
            out[digest] = owner
    return out


def _attach(
    session: Session,
    *,
    flag: Flag,
    digests: list[Digest],
    taken: dict[Digest, str],
    feed: bool = True,
) -> list[Digest]:
    """Add the hashes ``flag`` lacks; strong ones another flag owns are left there."""
    existing = fingerprints_of(session, flag_ids=[flag.id])[flag.id] if feed else {}
    added: list[Digest] = []
    for digest in digests:
        if digest in taken or digest.hex in existing.get(digest.algorithm, []):
            continue
        table = Fingerprint if digest.algorithm in STRONG_ALGORITHMS else WeakHash
        session.add(table(flag_id=flag.id, algorithm=digest.algorithm, value=digest.hex))
        added.append(digest)
    session.flush()
    if feed:
        for digest in added:
            emit_change(
                session,
                kind="fingerprint.added",
                flag_id=flag.id,
                data={"algorithm": digest.algorithm, "value": digest.hex},
            )
    return added


def _as_map(digests: Iterable[Digest]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for d in digests:
        out[d.algorithm].append(d.hex)
    return dict(sorted(out.items()))


def _add_opinion(
    session: Session, *, flag: Flag, actor: Principal, kind: str, reason: str | None
) -> bool:
    """Record an opinion once per key and kind; returns whether it was new."""
    if actor.key_id is not None:
        seen = session.exec(
            select(Opinion.id).where(
                Opinion.flag_id == flag.id, Opinion.key_id == actor.key_id, Opinion.kind == kind
            )
        ).first()
        if seen is not None:
            return False
    session.add(
        Opinion(flag_id=flag.id, key_id=actor.key_id, by=actor.label, kind=kind, reason=reason)
    )
    return True


# action -> (role needed, statuses it applies to, status it sets or None)
_ACTIONS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "confirm": ("submitter", ("active", "disputed", "revoked"), None),
    "dispute": ("submitter", ("active", "disputed"), "disputed"),
    "revoke": ("admin", ("active", "disputed"), "revoked"),
    "reinstate": ("admin", ("disputed", "revoked"), "active"),
}


_AUDIT_ACTION = {
    "confirm": "flag.confirmed",
    "dispute": "flag.disputed",
    "revoke": "flag.revoked",
    "reinstate": "flag.reinstated",
}


def change_status(
    session: Session, *, flag_id: str, action: str, reason: str, actor: Principal
) -> Flag:
    """Confirm, dispute, revoke or reinstate a flag; takes effect at once.

    A dispute moves an active flag to ``disputed`` and records the submitter's
    opinion (once per key); revocation and reinstatement are for admins. Each change
    is audited with its reason, and status changes enter the change feed.
    """
    role, allowed_from, new_status = _ACTIONS[action]
    if not actor.allows(role):
        raise PermissionDeniedError(f"a {actor.role} key may not {action} flags")
    begin_write(session)
    flag = get_flag(session, flag_id=flag_id)
    if flag.status not in allowed_from:
        raise ConflictError(f"flag {flag_id} is {flag.status}; it cannot be {action}d")
    changed = False
    if action in ("confirm", "dispute"):
        changed = _add_opinion(session, flag=flag, actor=actor, kind=action, reason=reason)
    if new_status is not None and flag.status != new_status:
        previous, flag.status = flag.status, new_status
        flag.status_reason = reason
        flag.status_changed_by = actor.label
        flag.status_changed_at = flag.updated_at = utcnow()
        session.add(flag)
        emit_change(
            session,
            kind="flag.status",
            flag_id=flag.id,
            data={"status": new_status, "previous": previous},
        )
        changed = True
    if changed:
        record(
            session,
            actor=actor,
            action=_AUDIT_ACTION[action],
            target_type="flag",
            target_id=flag.id,
            reason=reason,
            detail={"status": flag.status},
        )
    session.commit()
    return flag
