"""Requests for analyst work: flag search with a total, audit trails, platform reports,
bulk import in batches and CSV export. Shared by the sync and async clients."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import httpx
from pydantic import TypeAdapter, ValidationError

from modelhash._calls import Call, _list, _model, _seg
from modelhash.errors import InputError
from modelhash.wire import (
    MAX_IMPORT_ROWS,
    AuditRecord,
    FlagDetail,
    FlagPage,
    ImportRequest,
    ImportResult,
    ReportCreate,
    ReportPublic,
)

__all__ = [
    "IMPORT_BATCH",
    "audit",
    "export_csv",
    "import_batches",
    "import_call",
    "import_request",
    "merge_results",
    "report",
    "reports",
    "search_flags",
]

IMPORT_BATCH = 1000
"""Rows per import request: well under the registry's body limit and its row cap."""
assert IMPORT_BATCH <= MAX_IMPORT_ROWS

_FLAGS = TypeAdapter(list[FlagDetail])


def _filters(filters: Mapping[str, Any]) -> dict[str, str | int]:
    out: dict[str, str | int] = {}
    for name, value in filters.items():
        if value is None or value is False:
            continue
        if isinstance(value, datetime):
            out[name] = value.isoformat()
        elif value is True:
            out[name] = "true"
        else:
            out[name] = value if isinstance(value, int) else str(value)
    return out


def search_flags(filters: Mapping[str, Any], limit: int, offset: int) -> Call[FlagPage]:
    """``GET /v1/flags`` with filters; the page and the total from ``X-Total-Count``."""

    def parse(response: httpx.Response) -> FlagPage:
        flags = _FLAGS.validate_python(response.json())
        total = int(response.headers.get("X-Total-Count", len(flags)))
        return FlagPage(total=total, limit=limit, offset=offset, flags=flags)

    params = {**_filters(filters), "limit": limit, "offset": offset}
    return Call("GET", "/v1/flags", parse, params=params, raw=True)


def export_csv(filters: Mapping[str, Any]) -> Call[str]:
    """``GET /v1/flags.csv``: the matching flags as CSV text."""

    def parse(response: httpx.Response) -> str:
        if not response.headers.get("content-type", "").startswith("text/csv"):
            raise ValueError("the answer is not CSV")
        return response.text

    return Call("GET", "/v1/flags.csv", parse, params=_filters(filters), raw=True)


def audit(flag_id: str) -> Call[list[AuditRecord]]:
    return Call("GET", f"/v1/flags/{_seg(flag_id)}/audit", _list(AuditRecord))


def report(flag_id: str, kind: str, note: str | None) -> Call[ReportPublic]:
    body = ReportCreate.model_validate({"kind": kind, "note": note}).model_dump()
    # A repeated report answers with the first one, so a retry is safe.
    return Call("POST", f"/v1/flags/{_seg(flag_id)}/reports", _model(ReportPublic), body=body)


def reports(flag_id: str | None) -> Call[list[ReportPublic]]:
    path = f"/v1/flags/{_seg(flag_id)}/reports" if flag_id else "/v1/reports"
    return Call("GET", path, _list(ReportPublic))


def import_call(request: ImportRequest) -> Call[ImportResult]:
    # Rows already flagged answer "exists", so a retried batch changes nothing.
    return Call("POST", "/v1/flags/import", _model(ImportResult),
                body=request.model_dump(mode="json", exclude_none=True))


def import_batches(text: str, fmt: str, size: int = IMPORT_BATCH) -> Iterator[tuple[str, int]]:
    """``text`` cut into requests of at most ``size`` rows: (text, number of its first row).

    CSV batches repeat the header and number rows as the file does (the header is row
    1); plain lists keep their line numbers.
    """
    if fmt == "list":
        lines = text.splitlines()
        for start in range(0, len(lines), size):
            yield "\n".join(lines[start : start + size]) + "\n", start + 1
        return
    records = list(csv.reader(io.StringIO(text, newline="")))
    if not records:
        yield text, 2
        return
    header, rows = records[0], records[1:]
    for start in range(0, max(len(rows), 1), size):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows[start : start + size])
        yield buf.getvalue(), start + 2


def import_request(
    text: str, fmt: str, category: str | None, severity: str | None, first_row: int
) -> ImportRequest:
    """A validated import request; a bad format, category or severity is InputError."""
    try:
        return ImportRequest.model_validate({
            "format": fmt, "text": text, "category": category, "severity": severity,
            "first_row": first_row,
        })
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InputError(f"import {where}: {first.get('msg')}") from None


def merge_results(parts: list[ImportResult]) -> ImportResult:
    """One result for a whole file imported in batches."""
    return ImportResult(
        created=sum(p.created for p in parts),
        existing=sum(p.existing for p in parts),
        failed=sum(p.failed for p in parts),
        rows=[r for p in parts for r in p.rows],
    )
