"""Sketches: the similarity layer of flags and reference bases, their retrieval
signatures and their LSH bands.

All three tables are immutable once written: triggers refuse UPDATE and DELETE (and
TRUNCATE on PostgreSQL), as for the audit log, so a stored delta cannot be swapped
for another after the fact.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_IMMUTABLE = ("sketch", "sketch_signature", "sketch_band")


def upgrade() -> None:
    op.create_table(
        "sketch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_type", sa.String(length=8), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("algorithm", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("base_id", sa.String(length=36), nullable=True),
        sa.Column("tensors", sa.Integer(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_id"], ["reference_base.id"], name=op.f("fk_sketch_base_id_reference_base")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sketch")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_sketch_owner_type_owner_id"), "sketch", ["owner_type", "owner_id"], unique=False
    )
    op.create_index(op.f("ix_sketch_base_id"), "sketch", ["base_id"], unique=False)
    op.create_table(
        "sketch_signature",
        sa.Column("sketch_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("base_id", sa.String(length=36), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_id"],
            ["reference_base.id"],
            name=op.f("fk_sketch_signature_base_id_reference_base"),
        ),
        sa.ForeignKeyConstraint(
            ["sketch_id"], ["sketch.id"], name=op.f("fk_sketch_signature_sketch_id_sketch")
        ),
        sa.PrimaryKeyConstraint("sketch_id", name=op.f("pk_sketch_signature")),
    )
    op.create_index(
        op.f("ix_sketch_signature_base_id"), "sketch_signature", ["base_id"], unique=False
    )
    op.create_table(
        "sketch_band",
        sa.Column("band", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("sketch_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.ForeignKeyConstraint(
            ["sketch_id"], ["sketch.id"], name=op.f("fk_sketch_band_sketch_id_sketch")
        ),
        sa.PrimaryKeyConstraint("band", "sketch_id", name=op.f("pk_sketch_band")),
    )
    op.create_index(
        op.f("ix_sketch_band_sketch_id"), "sketch_band", ["sketch_id"], unique=False
    )
    _create_immutable_triggers()


def downgrade() -> None:
    _drop_immutable_triggers()
    op.drop_index(op.f("ix_sketch_band_sketch_id"), table_name="sketch_band")
    op.drop_table("sketch_band")
    op.drop_index(op.f("ix_sketch_signature_base_id"), table_name="sketch_signature")
    op.drop_table("sketch_signature")
    op.drop_index(op.f("ix_sketch_base_id"), table_name="sketch")
    op.drop_index(op.f("ix_sketch_owner_type_owner_id"), table_name="sketch")
    op.drop_table("sketch")


def _create_immutable_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # modelhash_append_only() comes from revision 0001.
        for table in _IMMUTABLE:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION modelhash_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION modelhash_append_only()"
            )
        return
    for table in _IMMUTABLE:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )


def _drop_immutable_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _IMMUTABLE:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        return
    for table in _IMMUTABLE:
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{verb}")
