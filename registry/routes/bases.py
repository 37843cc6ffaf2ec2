"""Reference bases: public models that are never flagged."""

from __future__ import annotations

from fastapi import APIRouter

from modelhash.registry.crud.bases import (
    base_fingerprints,
    base_sketch_kinds,
    create_base,
    list_bases,
)
from modelhash.registry.deps import AdminDep, ReaderDep, SessionDep
from modelhash.registry.routes._common import errors
from modelhash.wire import BaseCreate, BasePublic

__all__ = ["router"]

router = APIRouter(prefix="/v1/bases", tags=["bases"], responses=errors(401, 403, 503))


@router.post("", status_code=201, responses=errors(409, 413, 422))
def add_base(body: BaseCreate, session: SessionDep, principal: AdminDep) -> BasePublic:
    """Register a reference base (admins). Only its strong hashes are kept."""
    base = create_base(session, data=body, actor=principal)
    hashes = base_fingerprints(session, base_ids=[base.id])
    kinds = base_sketch_kinds(session, base_ids=[base.id])
    return BasePublic(
        id=base.id,
        name=base.name,
        description=base.description,
        fingerprints=hashes[base.id],
        created_at=base.created_at,
        sketch_kind=kinds.get(base.id),
    )


@router.get("")
def all_bases(session: SessionDep, _: ReaderDep) -> list[BasePublic]:
    """Every reference base, by name."""
    bases = list_bases(session)
    hashes = base_fingerprints(session, base_ids=[b.id for b in bases])
    kinds = base_sketch_kinds(session, base_ids=[b.id for b in bases])
    return [
        BasePublic(
            id=b.id,
            name=b.name,
            description=b.description,
            fingerprints=hashes[b.id],
            created_at=b.created_at,
            sketch_kind=kinds.get(b.id),
        )
        for b in bases
    ]
