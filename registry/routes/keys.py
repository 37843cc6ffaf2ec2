"""API key management (admins). A new key is shown once; only its hash is stored."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from modelhash.registry.crud.keys import create_key, list_keys, revoke_key
from modelhash.registry.deps import AdminDep, SessionDep
from modelhash.registry.routes._common import errors
from modelhash.wire import KeyCreate, KeyCreated, KeyPublic

__all__ = ["router"]

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=errors(401, 403, 503))


@router.post("", status_code=201, responses=errors(422))
def new_key(body: KeyCreate, session: SessionDep, principal: AdminDep) -> KeyCreated:
    """Make a key with a role; the answer's ``key`` is the only time it is shown."""
    row, key = create_key(session, role=body.role, name=body.name, actor=principal)
    return KeyCreated(**KeyPublic.model_validate(row, from_attributes=True).model_dump(), key=key)


@router.get("")
def all_keys(session: SessionDep, _: AdminDep) -> list[KeyPublic]:
    """Every key, revoked ones included; never the secrets."""
    return [KeyPublic.model_validate(k, from_attributes=True) for k in list_keys(session)]


@router.delete("/{key_id}", responses=errors(404, 409, 422))
def delete_key(
    key_id: Annotated[int, Path(ge=1, le=2**31 - 1)],
    session: SessionDep,
    principal: AdminDep,
) -> KeyPublic:
    """Revoke a key. It stops working at once, on every worker and replica (keys are
    checked against the database on each request); it stays listed with ``revoked_at``."""
    row = revoke_key(session, key_id=key_id, actor=principal)
    return KeyPublic.model_validate(row, from_attributes=True)
