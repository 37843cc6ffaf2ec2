"""API keys: make them, check them, list and revoke them.

A key is ``mh_`` plus 32 random bytes (URL-safe base64). Only its SHA-256 is stored:
the secret has 256 bits of entropy, so a fast hash is enough, and lookups go by the
hash, so no comparison can leak timing. A short prefix of the key is kept in clear
so a human can tell keys apart in listings and the audit log.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlmodel import Session, select

from modelhash.registry._db import begin_write
from modelhash.registry.crud.audit import record
from modelhash.registry.errors import AuthenticationError, ConflictError, NotFoundError
from modelhash.registry.models import ApiKey, utcnow

__all__ = [
    "CLI",
    "KEY_PREFIX",
    "ROLE_RANK",
    "Principal",
    "authenticate",
    "create_key",
    "generate_key",
    "hash_key",
    "list_keys",
    "revoke_key",
]

KEY_PREFIX = "mh_"
_SHOWN = len(KEY_PREFIX) + 8
ROLE_RANK: dict[str, int] = {"reader": 0, "submitter": 1, "admin": 2}


@dataclass(frozen=True)
class Principal:
    """Who is acting: an API key's id and role, or the local command line."""

    key_id: int | None
    role: str
    label: str

    def allows(self, role: str) -> bool:
        """True if this principal's role includes ``role`` (roles nest)."""
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


#: The local command line (``modelhash keys create``): acts as an admin.
CLI = Principal(key_id=None, role="admin", label="cli")


def _label(key: ApiKey) -> str:
    name = f" {key.name}" if key.name else ""
    return f"key:{key.id}{name}"[:64]


def hash_key(key: str) -> str:
    """The stored form of a key: hex SHA-256 of its text."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(
    session: Session, *, role: str, name: str | None, actor: Principal
) -> tuple[ApiKey, str]:
    """Store a new key with ``role``; returns the row and the key text (shown once)."""
    if role not in ROLE_RANK:
        raise ValueError(f"unknown role {role!r}")
    key = generate_key()
    begin_write(session)
    _still_valid(session, actor)
    row = ApiKey(
        name=name, role=role, prefix=key[:_SHOWN], secret_hash=hash_key(key), created_by=actor.label
    )
    session.add(row)
    session.flush()
    record(
        session,
        actor=actor,
        action="key.created",
        target_type="api_key",
        target_id=str(row.id),
        detail={"role": role, "name": name, "prefix": row.prefix},
    )
    session.commit()
    return row, key


def authenticate(session: Session, *, key: str) -> Principal | None:
    """The principal a key stands for, or None if it is unknown or revoked."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = session.exec(select(ApiKey).where(ApiKey.secret_hash == hash_key(key))).first()
    if row is None or row.revoked_at is not None or row.id is None:
        return None
    return Principal(key_id=row.id, role=row.role, label=_label(row))


def _still_valid(session: Session, actor: Principal) -> None:
    """Refuse an actor whose key was revoked after its request was authenticated.

    Called under the writer lock, so a key revoked by a concurrent request can
    mint or revoke nothing once that revocation has committed.
    """
    if actor.key_id is None:
        return
    revoked = session.exec(select(ApiKey.revoked_at).where(ApiKey.id == actor.key_id)).first()
    if revoked is not None:
        raise AuthenticationError("unknown or revoked API key")


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked ones included, oldest first."""
    return list(session.exec(select(ApiKey).order_by(ApiKey.id)))  # type: ignore[arg-type]


def revoke_key(session: Session, *, key_id: int, actor: Principal) -> ApiKey:
    """Revoke a key at once; it stays listed, with ``revoked_at`` set."""
    begin_write(session)
    _still_valid(session, actor)
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFoundError(f"no API key {key_id}")
    if row.revoked_at is not None:
        raise ConflictError(f"API key {key_id} is already revoked")
    row.revoked_at = utcnow()
    session.add(row)
    record(
        session,
        actor=actor,
        action="key.revoked",
        target_type="api_key",
        target_id=str(key_id),
        detail={"prefix": row.prefix},
    )
    session.commit()
    return row
