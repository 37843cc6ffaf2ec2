"""The registry's tables.

Each entity has a ``XBase`` with the fields a caller supplies and the table model
``X(XBase, table=True)``. The request and response shapes (``FlagCreate``,
``FlagDetail`` and so on) live in :mod:`modelhash.wire`, because the client parses them
and must not import SQLModel.

Strong hashes (sha256, blake3, the content hash) and weak ones (crc32, AutoV1-3)
live in different tables on purpose: ``fingerprint`` is unique on
(algorithm, value) and is the only table a check reads, while ``weak_hash`` allows
the chance collisions that 32 to 48-bit values will have, and only answers lookups
and range queries. A weak hash therefore cannot produce a match, by construction.

``audit_event`` and ``change_event`` are append-only: the migration installs
triggers that refuse UPDATE and DELETE on both databases.

The schema is made by the Alembic migrations only; a test checks that these models
and the migrations agree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy import UniqueConstraint as Unique
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

__all__ = [
    "ApiKey",
    "AuditEvent",
    "BaseFingerprint",
    "ChangeEvent",
    "Fingerprint",
    "Flag",
    "FlagBase",
    "Opinion",
    "ReferenceBase",
    "Report",
    "ServerState",
    "SketchBand",
    "SketchRow",
    "SketchSignature",
    "SketchSpectra",
    "UTCDateTime",
    "UiSession",
    "WeakHash",
    "new_id",
    "utcnow",
]


# Deterministic constraint names, so migrations can name what they drop.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


def new_id() -> str:
    """A new random identifier for a flag or a base."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back as an aware UTC datetime.

    SQLite keeps no zone; PostgreSQL's ``timestamptz`` answers in the session's zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _now_column() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


class FlagBase(SQLModel):
    """What a submitter says about a flagged model."""

    category: str = Field(sa_column=Column(String(32), nullable=False))
    severity: str = Field(sa_column=Column(String(16), nullable=False))
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    evidence: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class Flag(FlagBase, table=True):
    """A flagged model. Never deleted: revocation is a status, so history stays whole.

    ``status_reason``, ``status_changed_by`` and ``status_changed_at`` describe the
    last status change (for a revoked flag: who revoked it, when and why); the audit
    log keeps every earlier one.
    """

    __tablename__ = "flag"

    id: str = Field(default_factory=new_id, sa_column=Column(String(36), primary_key=True))
    status: str = Field(default="active", sa_column=Column(String(16), nullable=False, index=True))
    files: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    model: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_by: str = Field(sa_column=Column(String(64), nullable=False))
    created_by_key_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("api_key.id"), nullable=True)
    )
    created_at: datetime = _now_column()
    updated_at: datetime = _now_column()
    status_reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    status_changed_by: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    status_changed_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime(), nullable=True)
    )


class Fingerprint(SQLModel, table=True):
    """A strong hash of a flagged model: unique, so one value belongs to one flag."""

    __tablename__ = "fingerprint"
    __table_args__ = (Unique("algorithm", "value"),)

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    flag_id: str = Field(
        sa_column=Column(String(36), ForeignKey("flag.id"), nullable=False, index=True)
    )
    algorithm: str = Field(sa_column=Column(String(32), nullable=False))
    value: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _now_column()


class WeakHash(SQLModel, table=True):
    """A truncated model-site hash of a flagged model: for lookups only, never matched."""

    __tablename__ = "weak_hash"
    __table_args__ = (
        Unique("flag_id", "algorithm", "value"),
        Index(None, "algorithm", "value"),
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    flag_id: str = Field(sa_column=Column(String(36), ForeignKey("flag.id"), nullable=False))
    algorithm: str = Field(sa_column=Column(String(32), nullable=False))
    value: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _now_column()


class ReferenceBase(SQLModel, table=True):
    """A public model that is known and never flagged; deltas are measured against it."""

    __tablename__ = "reference_base"

    id: str = Field(default_factory=new_id, sa_column=Column(String(36), primary_key=True))
    name: str = Field(sa_column=Column(String(200), nullable=False, unique=True))
    description: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    model: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_by: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _now_column()


class BaseFingerprint(SQLModel, table=True):
    """A strong hash of a reference base; flagging a model with one of these is refused."""

    __tablename__ = "base_fingerprint"
    __table_args__ = (Unique("algorithm", "value"),)

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    base_id: str = Field(
        sa_column=Column(String(36), ForeignKey("reference_base.id"), nullable=False, index=True)
    )
    algorithm: str = Field(sa_column=Column(String(32), nullable=False))
    value: str = Field(sa_column=Column(String(64), nullable=False))


class Opinion(SQLModel, table=True):
    """A submitter's confirmation or dispute of a flag, with a reason."""

    __tablename__ = "opinion"
    __table_args__ = (Unique("flag_id", "key_id", "kind"),)

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    flag_id: str = Field(
        sa_column=Column(String(36), ForeignKey("flag.id"), nullable=False, index=True)
    )
    key_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("api_key.id"), nullable=True)
    )
    by: str = Field(sa_column=Column(String(64), nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _now_column()


class ApiKey(SQLModel, table=True):
    """An API key: only the SHA-256 of the secret is kept, plus a non-secret prefix."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    name: str | None = Field(default=None, sa_column=Column(String(200), nullable=True))
    role: str = Field(sa_column=Column(String(16), nullable=False))
    prefix: str = Field(sa_column=Column(String(16), nullable=False))
    secret_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    created_by: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _now_column()
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime(), nullable=True)
    )


class AuditEvent(SQLModel, table=True):
    """One state change: who did what to which record, why and when. Append-only."""

    __tablename__ = "audit_event"
    __table_args__ = (
        Index(None, "target_type", "target_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    at: datetime = _now_column()
    actor: str = Field(sa_column=Column(String(64), nullable=False))
    actor_key_id: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    action: str = Field(sa_column=Column(String(64), nullable=False))
    target_type: str = Field(sa_column=Column(String(32), nullable=False))
    target_id: str = Field(sa_column=Column(String(64), nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class ChangeEvent(SQLModel, table=True):
    """One entry of the mirror feed; its ``id`` is the feed's cursor and only grows.

    Unlike the audit log it carries no actor and no note: it is what every reader
    may mirror. Append-only.
    """

    __tablename__ = "change_event"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    at: datetime = _now_column()
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    flag_id: str = Field(sa_column=Column(String(36), nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ServerState(SQLModel, table=True):
    """Server-generated secrets kept across restarts (signing key, range secret)."""

    __tablename__ = "server_state"

    name: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _now_column()


class SketchRow(SQLModel, table=True):
    """The sketch layer of a flag or a reference base. Immutable once written.

    ``owner_type`` is ``flag`` or ``base`` and ``owner_id`` its id. ``kind`` is the
    stored form: ``model`` (raw weights: a base, or a flag with no base near it),
    ``delta`` (the flag minus reference base ``base_id``) or ``lora`` (an adapter's
    effective delta; ``base_id`` is the base whose modules it covers, if any). A
    flag sketch with a base also has a :class:`SketchSignature`, and a raw model flag
    whose sketch carries the invariant layer a :class:`SketchSpectra`. The migration
    makes the table append-only, like the audit log.
    """

    __tablename__ = "sketch"
    __table_args__ = (
        Index(None, "owner_type", "owner_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    owner_type: str = Field(sa_column=Column(String(8), nullable=False))
    owner_id: str = Field(sa_column=Column(String(36), nullable=False))
    algorithm: str = Field(sa_column=Column(String(64), nullable=False))
    kind: str = Field(sa_column=Column(String(8), nullable=False))
    base_id: str | None = Field(
        default=None,
        sa_column=Column(String(36), ForeignKey("reference_base.id"), nullable=True, index=True),
    )
    tensors: int = Field(sa_column=Column(Integer, nullable=False))
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _now_column()


class SketchSignature(SQLModel, table=True):
    """The retrieval signature of a flag sketch relative to its base. Immutable.

    A table of its own, so loading every signature reads about 600 bytes per flag
    and never the blobs (in SQLite a column after a large blob sits at the end of
    its overflow chain). ``signature`` holds the sign bits, ``norm`` the projected
    delta's norm, ``modules`` (adapters only) a digest of the base modules the
    adapter covers: adapters covering the same modules share a bank, and an
    upload is compared with them on those modules only.
    """

    __tablename__ = "sketch_signature"

    sketch_id: int = Field(
        sa_column=Column(Integer, ForeignKey("sketch.id"), primary_key=True, autoincrement=False)
    )
    base_id: str = Field(
        sa_column=Column(String(36), ForeignKey("reference_base.id"), nullable=False, index=True)
    )
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    norm: float = Field(sa_column=Column(Float, nullable=False))
    modules: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))


class SketchSpectra(SQLModel, table=True):
    """The invariant layer of a raw model flag's sketch, apart from its blob. Immutable.

    ``section`` holds exactly the bytes that end the blob's zlib stream
    (:meth:`~modelhash.fingerprint._invariant.Spectra.to_section`), ``algorithm`` the
    invariant algorithm it was measured with. A table of its own, so the index of raw
    flags' spectra reads about 11 KB per SD-sized flag and never inflates the blobs.
    Written with the sketch row (and backfilled by the migration that made it) for
    every raw model flag row whose blob carries the layer.
    """

    __tablename__ = "sketch_spectra"

    sketch_id: int = Field(
        sa_column=Column(Integer, ForeignKey("sketch.id"), primary_key=True, autoincrement=False)
    )
    algorithm: str = Field(sa_column=Column(String(64), nullable=False))
    section: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = _now_column()


class SketchBand(SQLModel, table=True):
    """One LSH band key of a raw (``model`` or ``lora``) flag sketch. Immutable."""

    __tablename__ = "sketch_band"

    band: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    sketch_id: int = Field(
        sa_column=Column(
            Integer, ForeignKey("sketch.id"), primary_key=True, autoincrement=False, index=True
        )
    )


class Report(SQLModel, table=True):
    """A platform's feedback on a flag: a suspected false positive or a confirmed hit.

    Any key may report, readers included, since platforms hold reader keys. A report
    is stored and attributed and shown to analysts; it never changes the flag's
    status (an analyst acts on it with a dispute, revocation or reinstatement).
    """

    __tablename__ = "report"

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    flag_id: str = Field(
        sa_column=Column(String(36), ForeignKey("flag.id"), nullable=False, index=True)
    )
    kind: str = Field(sa_column=Column(String(32), nullable=False))
    note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    by: str = Field(sa_column=Column(String(64), nullable=False))
    key_id: int | None = Field(
        default=None, sa_column=Column(Integer, ForeignKey("api_key.id"), nullable=True)
    )
    created_at: datetime = _now_column()


class UiSession(SQLModel, table=True):
    """A signed-in web UI session, bound to the API key the analyst entered.

    Only the SHA-256 of the cookie's token is stored. The key itself is never kept:
    each request re-reads the key row, so a revoked key ends its sessions at once.
    ``csrf`` is the session's anti-forgery token, sent back in every form.
    """

    __tablename__ = "ui_session"

    token_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    key_id: int = Field(sa_column=Column(Integer, ForeignKey("api_key.id"), nullable=False))
    csrf: str = Field(sa_column=Column(String(64), nullable=False))
    created_at: datetime = _now_column()
    expires_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
