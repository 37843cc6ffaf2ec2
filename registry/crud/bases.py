"""Reference bases: public models that are never flagged.

Only a base's strong hashes are kept: they are what a flag is compared against, and
a truncated hash could refuse an innocent flag by chance.

A reference may also be a public fine-tune (it is then a base of its own as well)
or a public adapter (never a base of deltas). Both are known-innocent derivatives:
the similarity layer learns from them the direction that all derivatives of a base
share, and removes it before scoring
(see :class:`modelhash.registry.crud.sketches.SharedDirections`).
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from modelhash.fingerprint import Digest
from modelhash.registry._db import begin_write
from modelhash.registry.crud.audit import record
from modelhash.registry.crud.keys import Principal
from modelhash.registry.crud.sketches import rebase_flag_sketches, store_base_sketch
from modelhash.registry.errors import ConflictError
from modelhash.registry.models import BaseFingerprint, ReferenceBase, SketchRow
from modelhash.wire import STRONG_ALGORITHMS, BaseCreate

__all__ = ["base_fingerprints", "base_sketch_kinds", "create_base", "list_bases", "matching_base"]


def create_base(session: Session, *, data: BaseCreate, actor: Principal) -> ReferenceBase:
    """Register a reference base; 409 if its name or a strong hash is already a base."""
    strong = [Digest(a, v) for a, v in data.fingerprint.items() if a in STRONG_ALGORITHMS]
    begin_write(session)
    if session.exec(select(ReferenceBase.id).where(ReferenceBase.name == data.name)).first():
        raise ConflictError(f"a reference base named {data.name!r} exists")
    other = matching_base(session, digests=strong)
    if other is not None:
        raise ConflictError(f"that fingerprint is already reference base {other.name!r}")
    base = ReferenceBase(
        name=data.name, description=data.description, model=data.model, created_by=actor.label
    )
    session.add(base)
    try:
        session.flush()
        for d in strong:
            session.add(BaseFingerprint(base_id=base.id, algorithm=d.algorithm, value=d.hex))
        sketch = data.parsed_sketch()
        rebased = 0
        if sketch is not None:
            store_base_sketch(session, base_id=base.id, sketch=sketch)
            # A reference adapter is not a base of deltas: no flag is re-based on it.
            if sketch.kind == "model":
                rebased = rebase_flag_sketches(session, base_id=base.id, base=sketch)
        record(
            session,
            actor=actor,
            action="base.created",
            target_type="reference_base",
            target_id=base.id,
            detail={
                "name": data.name,
                "fingerprint": {d.algorithm: d.hex for d in strong},
                **({"sketch_tensors": len(sketch), "sketch_kind": sketch.kind,
                    "rebased_flags": rebased} if sketch is not None else {}),
            },
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError("that reference base was registered concurrently") from None
    return base


def list_bases(session: Session) -> list[ReferenceBase]:
    """Every reference base, by name."""
    return list(session.exec(select(ReferenceBase).order_by(col(ReferenceBase.name))))


def base_sketch_kinds(session: Session, *, base_ids: list[str]) -> dict[str, str]:
    """``base_id -> kind`` of its stored sketch (``model`` or ``lora``), for those that have one."""
    if not base_ids:
        return {}
    rows = session.exec(
        select(SketchRow.owner_id, SketchRow.kind).where(
            SketchRow.owner_type == "base", col(SketchRow.owner_id).in_(base_ids)
        )
    )
    return {owner: kind for owner, kind in rows}


def base_fingerprints(session: Session, *, base_ids: list[str]) -> dict[str, dict[str, list[str]]]:
    """``base_id -> algorithm -> values``."""
    out: dict[str, dict[str, list[str]]] = {i: defaultdict(list) for i in base_ids}
    if base_ids:
        rows = session.exec(
            select(BaseFingerprint.base_id, BaseFingerprint.algorithm, BaseFingerprint.value)
            .where(col(BaseFingerprint.base_id).in_(base_ids))
            .order_by(col(BaseFingerprint.id))
        )
        for base_id, algorithm, value in rows:
            out[base_id][algorithm].append(value)
    return {i: dict(sorted(v.items())) for i, v in out.items()}


def matching_base(session: Session, *, digests: list[Digest]) -> ReferenceBase | None:
    """The reference base that has one of these strong hashes, if any."""
    for d in digests:
        if d.algorithm not in STRONG_ALGORITHMS:
            continue
        base_id = session.exec(
            select(BaseFingerprint.base_id).where(
                BaseFingerprint.algorithm == d.algorithm, BaseFingerprint.value == d.hex
            )
        ).first()
        if base_id is not None:
            return session.get(ReferenceBase, base_id)
    return None
