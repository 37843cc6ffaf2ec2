"""The invariant layer of raw model flags in a table of its own.

The index of raw flags' spectra used to read every raw model flag's whole sketch
blob and inflate it for the small invariant section at its end (about 4.4 ms per
200-tensor blob, so some 40 s for 10,000 raw flags on a process's first check).
``sketch_spectra`` keeps that section alone, per sketch row. It is immutable like
``sketch``. This revision backfills it from the stored blobs: every raw model flag
row (owner ``flag``, kind ``model``, no base) whose blob carries the layer gets its
section; a blob that cannot be read is logged and skipped (it is skipped at check
time too). Downgrading drops the table: the blobs still hold every section.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = "sketch_spectra"
_BATCH = 32
_log = logging.getLogger("modelhash.registry")


def upgrade() -> None:
    op.create_table(
        _TABLE,
        sa.Column("sketch_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("algorithm", sa.String(length=64), nullable=False),
        sa.Column("section", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["sketch_id"], ["sketch.id"], name=op.f("fk_sketch_spectra_sketch_id_sketch")
        ),
        sa.PrimaryKeyConstraint("sketch_id", name=op.f("pk_sketch_spectra")),
    )
    _triggers(create=True)
    _backfill()


def downgrade() -> None:
    _triggers(create=False)
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
    from datetime import UTC, datetime

    from modelhash.fingerprint._sketch import blob_spectra
    from modelhash.registry.crud.sketches import raw_model_flag, spectra_fields

    conn = op.get_bind()
    sketch = sa.table("sketch", sa.column("id", sa.Integer()), sa.column("owner_id"),
                      sa.column("owner_type"), sa.column("kind"), sa.column("base_id"),
                      sa.column("blob", sa.LargeBinary()))
    spectra = sa.table(_TABLE, sa.column("sketch_id", sa.Integer()), sa.column("algorithm"),
                       sa.column("section", sa.LargeBinary()),
                       sa.column("created_at", sa.DateTime(timezone=True)))
    ids = [int(i) for (i,) in conn.execute(
        sa.select(sketch.c.id).where(*raw_model_flag(sketch.c)).order_by(sketch.c.id)
    )]
    now = datetime.now(UTC)
    done = skipped = 0
    # Blobs in small batches, as the index reads them: never many in memory at once.
    for start in range(0, len(ids), _BATCH):
        rows = conn.execute(
            sa.select(sketch.c.id, sketch.c.owner_id, sketch.c.blob)
            .where(sketch.c.id.in_(ids[start : start + _BATCH])).order_by(sketch.c.id)
        ).all()
        batch = []
        for sid, owner, blob in rows:
            try:
                layer = blob_spectra(bytes(blob))
                fields = spectra_fields(layer) if layer is not None else None
            except Exception:  # the index skipped an unreadable blob too
                _log.warning("sketch %s of flag %s has an unreadable blob; its spectra are "
                             "not copied", sid, owner)
                skipped += 1
                continue
            if fields is not None:
                batch.append({"sketch_id": int(sid), **fields, "created_at": now})
        if batch:
            conn.execute(sa.insert(spectra), batch)
            done += len(batch)
    if ids:
        _log.info("sketch_spectra: %d raw flag sections copied, %d unreadable blobs skipped",
                  done, skipped)
