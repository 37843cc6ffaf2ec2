"""Web UI sessions and platform reports on flags.

``report`` keeps what platforms say about a flag (a suspected false positive or a
confirmed hit), attributed to the reporting key; it never changes the flag.
``ui_session`` keeps signed-in web UI sessions by the hash of their cookie token.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("flag_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["flag_id"], ["flag.id"], name=op.f("fk_report_flag_id_flag")),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_key.id"], name=op.f("fk_report_key_id_api_key")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_report")),
    )
    op.create_index(op.f("ix_report_flag_id"), "report", ["flag_id"], unique=False)
    op.create_table(
        "ui_session",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_key.id"], name=op.f("fk_ui_session_key_id_api_key")
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_ui_session")),
    )
    op.create_index(op.f("ix_ui_session_expires_at"), "ui_session", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_ui_session_expires_at"), table_name="ui_session")
    op.drop_table("ui_session")
    op.drop_index(op.f("ix_report_flag_id"), table_name="report")
    op.drop_table("report")
