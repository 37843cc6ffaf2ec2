"""Retrieval signatures v2: 4096 SimHash bits and a norm per flag sketch, and the
adapter's module set.

The v1 signature (256 floats) had a standard error of about 0.06 in cosine, so
with 100k flags on one base a 30/70 merge (cosine about 0.4) could be outranked by
unrelated flags and a carrier of a whole flagged delta (cosine 0.1-0.2) usually
was. Signatures are derived data: this revision recreates the table and computes
every v2 signature from the stored sketch blobs and their bases' sketches, so no
flag loses its similarity match. Downgrading recreates the v1 table empty (v1
signatures are not recomputed).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = "sketch_signature"


def _create(*, v2: bool) -> None:
    extra = [
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("modules", sa.String(length=32), nullable=True),
    ] if v2 else []
    op.create_table(
        _TABLE,
        sa.Column("sketch_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("base_id", sa.String(length=36), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        *extra,
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
    op.create_index(op.f("ix_sketch_signature_base_id"), _TABLE, ["base_id"], unique=False)
    _triggers(create=True)


def _drop() -> None:
    _triggers(create=False)
    op.drop_index(op.f("ix_sketch_signature_base_id"), table_name=_TABLE)
    op.drop_table(_TABLE)


def _triggers(*, create: bool) -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    if pg and create:
        # modelhash_append_only() comes from revision 0001.
        op.execute(f"CREATE TRIGGER {_TABLE}_append_only BEFORE UPDATE OR DELETE ON {_TABLE} "
                   "FOR EACH ROW EXECUTE FUNCTION modelhash_append_only()")
        op.execute(f"CREATE TRIGGER {_TABLE}_no_truncate BEFORE TRUNCATE ON {_TABLE} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION modelhash_append_only()")
    elif pg:
        op.execute(f"DROP TRIGGER IF EXISTS {_TABLE}_append_only ON {_TABLE}")
        op.execute(f"DROP TRIGGER IF EXISTS {_TABLE}_no_truncate ON {_TABLE}")
    else:
        for verb in ("UPDATE", "DELETE"):
            name = f"{_TABLE}_no_{verb.lower()}"
            op.execute(
                f"CREATE TRIGGER {name} BEFORE {verb} ON {_TABLE} "
                f"BEGIN SELECT RAISE(ABORT, '{_TABLE} is append-only'); END"
                if create else f"DROP TRIGGER IF EXISTS {name}"
            )


def _backfill() -> None:
    from modelhash.fingerprint._sketch import Sketch

    conn = op.get_bind()
    bases: dict[str, object] = {}
    for owner, blob in conn.execute(sa.text(
        "SELECT owner_id, blob FROM sketch WHERE owner_type = 'base' ORDER BY id"
    )):
        try:
            bases[owner] = Sketch.from_bytes(blob)
        except Exception:  # noqa: S112 - an unreadable base: its flags get no signature
            continue
    ids = [int(i) for (i,) in conn.execute(sa.text(
        "SELECT id FROM sketch WHERE owner_type = 'flag' "
        "AND base_id IS NOT NULL AND kind IN ('delta', 'lora') ORDER BY id"
    ))]
    insert = sa.text(
        "INSERT INTO sketch_signature (sketch_id, base_id, signature, norm, modules) "
        "VALUES (:sid, :base, :sig, :norm, :modules)"
    )
    for start in range(0, len(ids), 200):
        chunk = ids[start : start + 200]
        rows = conn.execute(
            sa.text("SELECT id, kind, base_id, blob FROM sketch WHERE id IN :ids")
            .bindparams(sa.bindparam("ids", expanding=True)),
            {"ids": chunk},
        ).all()
        batch = [r for r in (_row(*row, bases) for row in rows) if r is not None]
        if batch:
            conn.execute(insert, batch)


def _row(sid: int, kind: str, base_id: str, blob: bytes,
         bases: dict[str, object]) -> dict[str, object] | None:
    from modelhash.fingerprint._sketch import Sketch
    from modelhash.registry.crud.sketches import keys_digest, lora_keys, signature

    base = bases.get(base_id)
    if not isinstance(base, Sketch):
        return None
    try:
        sketch = Sketch.from_bytes(blob)
    except Exception:  # an unreadable blob is skipped at check time too
        return None
    keys = lora_keys(sketch, base) if kind == "lora" else None
    sig = signature(sketch, base, keys)
    if sig is None:
        return None
    return {"sid": sid, "base": base_id, "sig": sig.bits, "norm": sig.norm,
            "modules": keys_digest(keys) if keys is not None else None}


def upgrade() -> None:
    _drop()
    _create(v2=True)
    _backfill()


def downgrade() -> None:
    _drop()
    _create(v2=False)
