"""Test a file, bulk import and CSV export: the UI's work pages.

*Test a file* takes an upload (fingerprinted here, in a temporary file, by the same
safe readers the client uses; the request body limit applies) or pasted hashes or
``modelhash fingerprint --json`` output, runs the same check as ``POST /v1/check``
and shows each match with its evidence, per-block figures drawn as an SVG strip.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import ValidationError
from sqlmodel import Session

from modelhash.errors import InvalidHashError, ModelhashError
from modelhash.fingerprint import fingerprint_path, parse_hash
from modelhash.registry._metrics import Metrics
from modelhash.registry.crud.bulk import import_rows, parse_import
from modelhash.registry.crud.lookup import check
from modelhash.registry.crud.search import FlagQuery
from modelhash.registry.deps import SessionDep
from modelhash.registry.errors import BadRequestError
from modelhash.registry.routes.bulk import stream_export
from modelhash.registry.ui._deps import CsrfForm, UserDep, render, require_role
from modelhash.registry.ui.evidence import evidence_svg, top_blocks
from modelhash.registry.ui.pages import _day
from modelhash.wire import (
    CATEGORIES,
    SEVERITIES,
    WIRE_KEYS,
    CheckItem,
    ImportRequest,
    encode_sketch,
)

__all__ = ["router"]

router = APIRouter(prefix="/ui", include_in_schema=False)

_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")


@router.get("/test", response_class=HTMLResponse)
def test_form(request: Request, user: UserDep) -> HTMLResponse:
    """Upload a file or paste hashes to check them."""
    return render(request, "test.html", user, results=None, error=None, pasted="")


def _items_from_paste(text: str) -> list[CheckItem]:
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequestError(f"the pasted JSON cannot be read: {exc.msg}") from None
        if not isinstance(data, dict):
            raise BadRequestError("paste a JSON object")
        results = data.get("results")
        if isinstance(results, list):  # modelhash fingerprint --json
            return [_from_fingerprint_json(r) for r in results if isinstance(r, dict)]
        return [_validated(data)]
    items = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            digests = parse_hash(line)
        except InvalidHashError as exc:
            raise BadRequestError(f"{line[:80]!r}: {exc}") from None
        # Bare hex is ambiguous: check it under every algorithm it could be.
        reverse = {v: k for k, v in WIRE_KEYS.items()}
        items.append(_validated({reverse[d.algorithm]: d.hex for d in digests}))
    if not items:
        raise BadRequestError("paste at least one hash")
    return items


def _from_fingerprint_json(result: dict[str, Any]) -> CheckItem:
    data = dict(result.get("fingerprint") or {})
    sketch = result.get("sketch")
    if isinstance(sketch, dict) and isinstance(sketch.get("blob"), str):
        data["sketch"] = sketch["blob"]
    return _validated(data)


def _validated(data: dict[str, Any]) -> CheckItem:
    try:
        return CheckItem.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadRequestError(f"{where}: {first.get('msg')}") from None


def _items_from_upload(upload: UploadFile) -> tuple[list[CheckItem], list[str]]:
    name = Path(upload.filename or "upload").name[:200]
    suffix = Path(name).suffix.lower()
    if suffix not in _SUFFIXES:
        raise BadRequestError(f"{name}: upload a {', '.join(_SUFFIXES)} file")
    with tempfile.TemporaryDirectory(prefix="modelhash-ui-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        with path.open("wb") as out:
            while chunk := upload.file.read(1 << 20):
                out.write(chunk)
        outcomes = fingerprint_path(path)
    items: list[CheckItem] = []
    notes: list[str] = []
    for outcome in outcomes:
        if outcome.error is not None or outcome.fingerprint is None:
            raise BadRequestError(f"{name}: {outcome.error}")
        fp = outcome.fingerprint
        data: dict[str, Any] = dict(fp.summary())
        if fp.sketch is not None and fp.sketch.kind in ("model", "lora") and len(fp.sketch):
            data["sketch"] = encode_sketch(fp.sketch)
        else:
            notes.append(f"{name}: no sketch layer, so only exact and content hashes are checked")
        items.append(_validated(data))
    return items, notes


def _present(request: Request, session: Session, items: list[CheckItem]) -> list[dict[str, Any]]:
    results = check(session, items=items)
    metrics: Metrics = request.app.state.metrics
    for result in results:
        metrics.checked.labels(result.verdict).inc()
    out = []
    for item, result in zip(items, results, strict=True):
        matches = []
        for m in result.matches:
            evidence = m.evidence.model_dump()
            blocks = [b for b in evidence.get("blocks") or [] if isinstance(b, dict)]
            title = f"Where the upload carries flagged delta {m.flag_id[:8]} ({m.match})"
            matches.append({
                "match": m, "evidence": evidence,
                "svg": evidence_svg(blocks, title=title) if blocks else "",
                "top": top_blocks(blocks),
            })
        out.append({"fingerprint": item.model_dump(exclude_none=True, exclude={"sketch"}),
                    "sketch": item.sketch is not None, "verdict": result.verdict,
                    "matches": matches})
    return out


@router.post("/test", response_class=HTMLResponse)
def test_run(
    request: Request,
    session: SessionDep,
    user: CsrfForm,
    file: Annotated[UploadFile | None, File()] = None,
    hashes: Annotated[str, Form(max_length=4_000_000)] = "",
) -> HTMLResponse:
    """Check an uploaded file or pasted hashes, as ``POST /v1/check`` would."""
    notes: list[str] = []
    try:
        if file is not None and file.filename:
            items, notes = _items_from_upload(file)
        elif hashes.strip():
            items = _items_from_paste(hashes)
        else:
            raise BadRequestError("choose a file or paste hashes")
    except (BadRequestError, ModelhashError) as exc:
        return render(request, "test.html", user, status_code=400, results=None,
                      error=str(exc), pasted=hashes[:20000])
    return render(request, "test.html", user, results=_present(request, session, items), error=None,
                  notes=notes, pasted=hashes[:20000])


@router.get("/import", response_class=HTMLResponse)
def import_form(request: Request, user: UserDep) -> HTMLResponse:
    """The bulk import form (submitters and admins)."""
    require_role(user, "submitter")
    return render(request, "import.html", user, result=None, error=None,
                  categories=CATEGORIES, severities=SEVERITIES)


@router.post("/import", response_class=HTMLResponse)
def import_run(
    request: Request,
    session: SessionDep,
    user: CsrfForm,
    file: Annotated[UploadFile | None, File()] = None,
    text: Annotated[str, Form(max_length=2_000_000)] = "",
    format: Annotated[str, Form(max_length=8)] = "csv",
    category: Annotated[str, Form(max_length=32)] = "",
    severity: Annotated[str, Form(max_length=16)] = "",
) -> HTMLResponse:
    """Import a CSV or a plain hash list; one result per row."""
    require_role(user, "submitter")
    body = text
    if file is not None and file.filename:
        raw = file.file.read(2_000_001)
        if len(raw) > 2_000_000:
            raise BadRequestError(
                "the file is larger than 2 MB: import it in parts, or use the CLI"
            )
        try:
            body = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadRequestError("the file is not UTF-8 text") from None
    try:
        req = ImportRequest.model_validate({
            "format": format, "text": body, "category": category or None,
            "severity": severity or None,
        })
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return render(request, "import.html", user, status_code=400, result=None,
                      error=f"{where}: {first.get('msg')}", categories=CATEGORIES,
                      severities=SEVERITIES)
    rows = import_rows(session, parse_import(req), actor=user.principal)
    summary = {s: sum(r.status == s for r in rows) for s in ("created", "exists", "error")}
    return render(request, "import.html", user, result=rows, summary=summary, error=None,
                  categories=CATEGORIES, severities=SEVERITIES)


@router.get("/export.csv")
def export(
    request: Request, user: UserDep, q: str = "", status: str = "", category: str = "",
    severity: str = "", submitter: str = "", since: str = "", until: str = "",
    reported: str = "",
) -> StreamingResponse:
    """The flags matching the list's filters, as CSV (submitters and admins)."""
    require_role(user, "submitter")
    try:
        since_at, until_at = _day(since[:10], "from"), _day(until[:10], "to", end=True)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    query = FlagQuery(
        q=q[:200] or None, status=status[:16] or None, category=category[:32] or None,
        severity=severity[:16] or None, submitter=submitter[:64] or None, since=since_at,
        until=until_at, reported=bool(reported), text=True,
    )
    return StreamingResponse(
        stream_export(request.app.state.engine, query), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="flags.csv"'},
    )
