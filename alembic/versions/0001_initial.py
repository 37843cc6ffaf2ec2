"""Initial schema: flags, fingerprints, bases, opinions, keys, audit log, change feed.

The audit log and the change feed are append-only in the database itself: triggers
refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL), whoever connects.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_api_key_secret_hash")),
    )
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("actor_key_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_audit_event_target_type_target_id"),
        "audit_event",
        ["target_type", "target_id"],
        unique=False,
    )
    op.create_table(
        "change_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("flag_id", sa.String(length=36), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_event")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "reference_base",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("model", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reference_base")),
        sa.UniqueConstraint("name", name=op.f("uq_reference_base_name")),
    )
    op.create_table(
        "server_state",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_server_state")),
    )
    op.create_table(
        "base_fingerprint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("base_id", sa.String(length=36), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_id"],
            ["reference_base.id"],
            name=op.f("fk_base_fingerprint_base_id_reference_base"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_fingerprint")),
        sa.UniqueConstraint("algorithm", "value", name=op.f("uq_base_fingerprint_algorithm_value")),
    )
    op.create_index(
        op.f("ix_base_fingerprint_base_id"), "base_fingerprint", ["base_id"], unique=False
    )
    op.create_table(
        "flag",
        sa.Column("category", sa.String(length=32), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("evidence", sa.Text(), nullable=True),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("model", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_by_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("status_changed_by", sa.String(length=64), nullable=True),
        sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by_key_id"], ["api_key.id"], name=op.f("fk_flag_created_by_key_id_api_key")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flag")),
    )
    op.create_index(op.f("ix_flag_status"), "flag", ["status"], unique=False)
    op.create_table(
        "fingerprint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("flag_id", sa.String(length=36), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["flag_id"], ["flag.id"], name=op.f("fk_fingerprint_flag_id_flag")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fingerprint")),
        sa.UniqueConstraint("algorithm", "value", name=op.f("uq_fingerprint_algorithm_value")),
    )
    op.create_index(op.f("ix_fingerprint_flag_id"), "fingerprint", ["flag_id"], unique=False)
    op.create_table(
        "opinion",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("flag_id", sa.String(length=36), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["flag_id"], ["flag.id"], name=op.f("fk_opinion_flag_id_flag")),
        sa.ForeignKeyConstraint(["key_id"], ["api_key.id"], name=op.f("fk_opinion_key_id_api_key")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_opinion")),
        sa.UniqueConstraint(
            "flag_id", "key_id", "kind", name=op.f("uq_opinion_flag_id_key_id_kind")
        ),
    )
    op.create_index(op.f("ix_opinion_flag_id"), "opinion", ["flag_id"], unique=False)
    op.create_table(
        "weak_hash",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("flag_id", sa.String(length=36), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["flag_id"], ["flag.id"], name=op.f("fk_weak_hash_flag_id_flag")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_weak_hash")),
        sa.UniqueConstraint(
            "flag_id", "algorithm", "value", name=op.f("uq_weak_hash_flag_id_algorithm_value")
        ),
    )
    op.create_index(
        op.f("ix_weak_hash_algorithm_value"), "weak_hash", ["algorithm", "value"], unique=False
    )
    _create_append_only_triggers()


def downgrade() -> None:
    _drop_append_only_triggers()
    op.drop_index(op.f("ix_weak_hash_algorithm_value"), table_name="weak_hash")
    op.drop_table("weak_hash")
    op.drop_index(op.f("ix_opinion_flag_id"), table_name="opinion")
    op.drop_table("opinion")
    op.drop_index(op.f("ix_fingerprint_flag_id"), table_name="fingerprint")
    op.drop_table("fingerprint")
    op.drop_index(op.f("ix_flag_status"), table_name="flag")
    op.drop_table("flag")
    op.drop_index(op.f("ix_base_fingerprint_base_id"), table_name="base_fingerprint")
    op.drop_table("base_fingerprint")
    op.drop_table("server_state")
    op.drop_table("reference_base")
    op.drop_table("change_event")
    op.drop_index(op.f("ix_audit_event_target_type_target_id"), table_name="audit_event")
    op.drop_table("audit_event")
    op.drop_table("api_key")


_APPEND_ONLY = ("audit_event", "change_event")


def _create_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION modelhash_append_only() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only', TG_TABLE_NAME
                    USING ERRCODE = 'insufficient_privilege';
            END
            $$
            """
        )
        for table in _APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION modelhash_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION modelhash_append_only()"
            )
        return
    for table in _APPEND_ONLY:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )


def _drop_append_only_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS modelhash_append_only()")
        return
    for table in _APPEND_ONLY:
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{verb}")
