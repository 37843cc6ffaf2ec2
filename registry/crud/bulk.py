"""Bulk import of an existing hash list, and the CSV export of flags.

An import is CSV (a header row naming the columns) or a plain list of hashes, one
per line. Each row gets its own result, so a malformed row or one that is a
reference base fails alone and the rest go on. Rows are written in batches: one
writer-locked transaction and one round of lookups per :data:`BATCH` rows, instead
of one transaction per flag, which is what makes thousands of rows per second.

The export writes the same columns the import reads (plus dates, submitter and
status), so a list exported from one registry imports into another. Cells that a
spreadsheet would run as a formula are prefixed with a quote.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, get_args

from sqlalchemy import and_, insert, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from modelhash.errors import InvalidHashError
from modelhash.fingerprint import Digest, parse_hash, parse_hash_as
from modelhash.registry._db import begin_write
from modelhash.registry.crud.keys import Principal
from modelhash.registry.errors import BadRequestError
from modelhash.registry.models import BaseFingerprint, Fingerprint, Flag, new_id, utcnow
from modelhash.wire import (
    CATEGORIES,
    MAX_IMPORT_ROWS,
    SEVERITIES,
    STRONG_ALGORITHMS,
    WIRE_KEYS,
    Category,
    ImportRequest,
    ImportRow,
)

__all__ = ["BATCH", "EXPORT_COLUMNS", "ParsedRow", "export_csv", "import_rows", "parse_import"]

BATCH = 500
"""Rows per write transaction."""

_FIELDS = ("category", "severity", "note", "evidence")
#: Export columns that the import accepts and ignores (they are not submission fields).
_IGNORED = ("id", "status", "created_at", "updated_at", "submitter", "status_reason")
_HASH_COLUMNS: dict[str, str] = {**WIRE_KEYS, "content_hash": WIRE_KEYS["content"]}
EXPORT_COLUMNS: tuple[str, ...] = (
    "id", "created_at", "updated_at", "submitter", "status", "category", "severity",
    "sha256", "blake3", "content", "crc32", "autov1", "autov2", "autov3",
    "note", "evidence", "status_reason",
)
_MAX_CELL = 4000
assert set(get_args(Category)) == set(CATEGORIES)


@dataclass
class ParsedRow:
    """One import row: its number and either what to flag or why it cannot be."""

    row: int
    digests: list[Digest] = field(default_factory=list)
    category: str | None = None
    severity: str = ""
    note: str | None = None
    evidence: str | None = None
    error: str | None = None


def parse_import(request: ImportRequest) -> list[ParsedRow]:
    """Every row of an import, each parsed on its own (a bad row carries its error)."""
    rows = _parse_list(request) if request.format == "list" else _parse_csv(request)
    if len(rows) > MAX_IMPORT_ROWS:
        raise BadRequestError(
            f"{len(rows)} rows in one request; send at most {MAX_IMPORT_ROWS} per request"
        )
    for row in rows:
        if row.error is None:
            _finish(row, request)
    return rows


def _parse_list(request: ImportRequest) -> list[ParsedRow]:
    out: list[ParsedRow] = []
    for number, line in enumerate(request.text.splitlines(), start=request.first_row or 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        row = ParsedRow(number)
        try:
            # Bare 64-digit hex is read as SHA-256, the form hash lists use; write
            # blake3:HEX or content:HEX for the others.
            row.digests = [parse_hash(text)[0]]
        except InvalidHashError as exc:
            row.error = str(exc)
        out.append(row)
    return out


def _parse_csv(request: ImportRequest) -> list[ParsedRow]:
    reader = csv.reader(io.StringIO(request.text, newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise BadRequestError("the CSV is empty: it needs a header row") from None
    except csv.Error as exc:
        raise BadRequestError(f"the CSV header cannot be read: {exc}") from None
    unknown = [h for h in header if h not in _HASH_COLUMNS and h not in _FIELDS + _IGNORED]
    if unknown:
        known = ", ".join(sorted({*_HASH_COLUMNS, *_FIELDS}))
        raise BadRequestError(f"unknown CSV column(s) {', '.join(unknown)} (known: {known})")
    if not any(h in _HASH_COLUMNS for h in header):
        raise BadRequestError("the CSV has no hash column (sha256, blake3 or content)")
    if len(set(header)) != len(header):
        raise BadRequestError("the CSV header names a column twice")
    out: list[ParsedRow] = []
    number = request.first_row or 2
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            out.append(ParsedRow(number, error=f"unreadable CSV line: {exc}"))
            number += 1
            continue
        if not any(c.strip() for c in cells):
            number += 1
            continue
        out.append(_csv_row(number, header, cells))
        number += 1
    return out


def _csv_row(number: int, header: list[str], cells: list[str]) -> ParsedRow:
    row = ParsedRow(number)
    if len(cells) != len(header):
        row.error = f"{len(cells)} cells where the header has {len(header)}"
        return row
    values: dict[str, str] = {}
    for name, cell in zip(header, cells, strict=True):
        cell = cell.strip()
        if len(cell) > _MAX_CELL:
            row.error = f"{name}: longer than {_MAX_CELL} characters"
            return row
        if cell:
            values[name] = cell
    try:
        # A flag of a sharded model has several hashes per algorithm: the export
        # writes them space-separated in one cell.
        row.digests = [
            parse_hash_as(_HASH_COLUMNS[n], one)
            for n, v in values.items()
            if n in _HASH_COLUMNS
            for one in v.split()
        ]
    except InvalidHashError as exc:
        row.error = str(exc)
        return row
    row.category = values.get("category")
    row.severity = values.get("severity") or ""
    row.note = values.get("note")
    row.evidence = values.get("evidence")
    return row


def _finish(row: ParsedRow, request: ImportRequest) -> None:
    """Fill defaults and validate what the row would flag."""
    row.category = row.category or request.category
    row.severity = row.severity or request.severity or "high"
    row.note = row.note or request.note
    row.evidence = row.evidence or request.evidence
    if "\x00" in f"{row.note}{row.evidence}{row.category}":
        row.error = "a cell contains a NUL character"
    elif row.category is None:
        row.error = "no category (give a category column, or a default for the import)"
    elif row.category not in CATEGORIES:
        row.error = f"unknown category {row.category!r} (known: {', '.join(CATEGORIES)})"
    elif row.severity not in SEVERITIES:
        row.error = f"unknown severity {row.severity!r} (known: {', '.join(SEVERITIES)})"
    elif not any(d.algorithm in STRONG_ALGORITHMS for d in row.digests):
        row.error = "no full hash (sha256, blake3 or content): a truncated hash cannot be flagged"


def import_rows(session: Session, rows: list[ParsedRow], *, actor: Principal) -> list[ImportRow]:
    """Flag every valid row, in batches; one result per row, in order."""
    results: dict[int, ImportRow] = {}
    for row in rows:
        if row.error is not None:
            results[id(row)] = ImportRow(row=row.row, status="error", error=row.error)
    todo = [r for r in rows if r.error is None]
    for start in range(0, len(todo), BATCH):
        for row, result in _import_batch(session, todo[start : start + BATCH], actor=actor):
            results[id(row)] = result
    return [results[id(r)] for r in rows]


def _import_batch(
    session: Session, rows: list[ParsedRow], *, actor: Principal
) -> list[tuple[ParsedRow, ImportRow]]:
    try:
        out = _write_batch(session, rows, actor=actor)
        session.commit()
        return out
    except IntegrityError:
        # Another writer took a hash between our lookups and the insert; retry the
        # rows one by one so only the clashing row reports it.
        session.rollback()
        if len(rows) == 1:
            return [(rows[0], ImportRow(row=rows[0].row, status="error",
                                        error="conflicts with a concurrent write; retry"))]
        return [pair for row in rows for pair in _import_batch(session, [row], actor=actor)]


def _owners(
    session: Session, table: Any, owner: Any, digests: Iterable[Digest]
) -> dict[Digest, str]:
    wanted: dict[str, set[str]] = defaultdict(set)
    for d in digests:
        wanted[d.algorithm].add(d.hex)
    if not wanted:
        return {}
    clauses = [
        and_(col(table.algorithm) == a, col(table.value).in_(sorted(v))) for a, v in wanted.items()
    ]
    rows = session.exec(select(table.algorithm, table.value, owner).where(or_(*clauses)))
    return {Digest(a, v): str(o) for a, v, o in rows}


def _write_batch(
    session: Session, rows: list[ParsedRow], *, actor: Principal
) -> list[tuple[ParsedRow, ImportRow]]:
    """Flag the new rows of one batch with one multi-row INSERT per table.

    Plain dictionaries, not model objects: building a SQLModel instance costs about
    a millisecond (pydantic defaults), which capped imports at a few hundred rows a
    second. The rows carry what :func:`create_flag` and :func:`record` would write.
    """
    begin_write(session)
    strong = [d for r in rows for d in r.digests if d.algorithm in STRONG_ALGORITHMS]
    flagged = _owners(session, Fingerprint, Fingerprint.flag_id, strong)
    bases = _owners(session, BaseFingerprint, BaseFingerprint.base_id, strong)
    out: list[tuple[ParsedRow, ImportRow]] = []
    tables: dict[str, list[dict[str, Any]]] = defaultdict(list)
    now = utcnow()
    for row in rows:
        mine = [d for d in row.digests if d.algorithm in STRONG_ALGORITHMS]
        owner = next((flagged[d] for d in mine if d in flagged), None)
        if owner is not None:
            out.append((row, ImportRow(row=row.row, status="exists", flag_id=owner)))
            continue
        base = next((bases[d] for d in mine if d in bases), None)
        if base is not None:
            out.append((row, ImportRow(
                row=row.row, status="error", error=f"{mine[0]} is reference base {base}"
            )))
            continue
        flag_id = new_id()
        tables["flag"].append({
            "id": flag_id, "category": row.category, "severity": row.severity,
            "note": row.note, "evidence": row.evidence, "status": "active", "files": [],
            "model": None, "created_by": actor.label, "created_by_key_id": actor.key_id,
            "created_at": now, "updated_at": now,
        })
        for d in dict.fromkeys(row.digests):
            table = "fingerprint" if d.algorithm in STRONG_ALGORITHMS else "weak_hash"
            if d.algorithm in STRONG_ALGORITHMS:
                flagged[d] = flag_id
            tables[table].append({"flag_id": flag_id, "algorithm": d.algorithm,
                                  "value": d.hex, "created_at": now})
        tables["opinion"].append({"flag_id": flag_id, "key_id": actor.key_id,
                                  "by": actor.label, "kind": "confirm", "reason": None,
                                  "created_at": now})
        fingerprints = {d.algorithm: d.hex for d in row.digests}
        tables["audit_event"].append({
            "at": now, "actor": actor.label, "actor_key_id": actor.key_id,
            "action": "flag.created", "target_type": "flag", "target_id": flag_id,
            "reason": row.note, "detail": {"fingerprint": fingerprints, "import_row": row.row},
        })
        tables["change_event"].append({
            "at": now, "kind": "flag.created", "flag_id": flag_id, "data": {
                "category": row.category, "severity": row.severity, "status": "active",
                "fingerprints": {a: [v] for a, v in sorted(fingerprints.items())},
            },
        })
        out.append((row, ImportRow(row=row.row, status="created", flag_id=flag_id)))
    # Flags first: the hashes, opinions and events refer to them.
    for name in ("flag", "fingerprint", "weak_hash", "opinion", "audit_event", "change_event"):
        if tables[name]:
            session.execute(insert(SQLModel.metadata.tables[name]), tables[name])
    return out


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def export_csv(flags: Iterable[Flag], hashes: dict[str, dict[str, list[str]]]) -> Iterator[str]:
    """CSV lines for ``flags``: the header, then one line per flag."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    yield buf.getvalue()
    reverse = {v: k for k, v in WIRE_KEYS.items()}
    for flag in flags:
        buf.seek(0)
        buf.truncate()
        by_column = {reverse.get(a, a): " ".join(v) for a, v in hashes.get(flag.id, {}).items()}
        values = {
            "id": flag.id, "created_at": flag.created_at.isoformat(),
            "updated_at": flag.updated_at.isoformat(), "submitter": flag.created_by,
            "status": flag.status, "category": flag.category, "severity": flag.severity,
            "note": flag.note, "evidence": flag.evidence, "status_reason": flag.status_reason,
            **by_column,
        }
        writer.writerow([_cell(values.get(c)) for c in EXPORT_COLUMNS])
        yield buf.getvalue()
