"""``modelhash confirm``, ``reinstate``, ``flags list/show``, ``audit``, ``report``,
``import`` and ``export``: an analyst's work from the terminal, as in the web UI."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from modelhash._cli._app import fail, guarded
from modelhash._cli._common import client_for, echo, json_option, print_json, registry_options
from modelhash._cli._exit import Exit
from modelhash._cli._flags import _show_flag, _status_change, flag_id_argument, reason_option
from modelhash.wire import CATEGORIES, SEVERITIES

__all__ = ["audit", "confirm", "export", "flags", "import_", "reinstate", "report"]

_STATUSES = ("active", "disputed", "revoked")


@click.command()
@flag_id_argument
@reason_option
@json_option
@registry_options
def confirm(flag_id: str, reason: str, as_json: bool, registry: str | None,
            api_key: str | None) -> None:
    """Record that you agree with flag FLAG_ID (needs a submitter key); the status stays."""
    _status_change("confirm", flag_id, reason, as_json, registry, api_key)


@click.command()
@flag_id_argument
@reason_option
@json_option
@registry_options
def reinstate(flag_id: str, reason: str, as_json: bool, registry: str | None,
              api_key: str | None) -> None:
    """Make a disputed or revoked flag FLAG_ID active again (needs an admin key)."""
    _status_change("reinstate", flag_id, reason, as_json, registry, api_key)


def _day(value: str | None, name: str, end: bool = False) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--{name}: {value!r} is not a date (YYYY-MM-DD) or an ISO time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and len(value) == 10:  # a whole day: up to its end
        when = when.replace(hour=23, minute=59, second=59, microsecond=999999)
    return when


def filter_options(f: Any) -> Any:
    """The search filters ``flags list`` and ``export`` share (the web UI's and REST's)."""
    for option in reversed([
        click.option("--q", "q", help="Any hash form, a flag id, or text in notes."),
        click.option("--status", type=click.Choice(_STATUSES)),
        click.option("--category", type=click.Choice(CATEGORIES)),
        click.option("--severity", type=click.Choice(SEVERITIES)),
        click.option("--submitter", help="Part of the submitting key's label."),
        click.option("--since", help="Created on or after (YYYY-MM-DD, UTC, or ISO time)."),
        click.option("--until", help="Created up to and including (YYYY-MM-DD, or ISO time)."),
        click.option("--reported", is_flag=True, help="Only flags platforms reported on."),
    ]):
        f = option(f)
    return f


def _filters(q: str | None, status: str | None, category: str | None, severity: str | None,
             submitter: str | None, since: str | None, until: str | None,
             reported: bool) -> dict[str, Any]:
    return {"q": q, "status": status, "category": category, "severity": severity,
            "submitter": submitter, "since": _day(since, "since"),
            "until": _day(until, "until", end=True), "reported": reported}


@click.group()
def flags() -> None:
    """Search and read flags (needs a submitter key)."""


@flags.command("list")
@filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 500))
@click.option("--offset", default=0, show_default=True, type=click.IntRange(0, 10_000_000))
@json_option
@registry_options
def list_flags(q: str | None, status: str | None, category: str | None, severity: str | None,
               submitter: str | None, since: str | None, until: str | None, reported: bool,
               limit: int, offset: int, as_json: bool, registry: str | None,
               api_key: str | None) -> None:
    """List flags, newest first, with filters; says how many match in all."""
    filters = _filters(q, status, category, severity, submitter, since, until, reported)
    with client_for(registry, api_key) as client:
        page = guarded(lambda: client.search_flags(limit=limit, offset=offset, **filters))
    if as_json:
        print_json(page.model_dump(mode="json"))
        return
    for f in page.flags:
        sha = (f.fingerprints.get("sha256") or [""])[0][:16]
        echo(f"{f.id}  {f.status:8}  {f.category:20}  {f.severity:8}  "
             f"{f.created_at:%Y-%m-%d}  {sha}")
    shown = f"{offset + 1}-{offset + len(page.flags)}" if page.flags else "none"
    echo(f"{page.total} flag(s) match; showing {shown}")


@flags.command("show")
@flag_id_argument
@json_option
@registry_options
def show_flag(flag_id: str, as_json: bool, registry: str | None, api_key: str | None) -> None:
    """One flag: fingerprints, and (for submitters) note, evidence and opinions."""
    with client_for(registry, api_key) as client:
        detail = guarded(lambda: client.get_flag(flag_id))
    _show_flag(detail, as_json)
    if as_json:
        return
    for label, value in (("note", detail.note), ("evidence", detail.evidence),
                         ("submitter", detail.created_by), ("reason", detail.status_reason)):
        if value:
            echo(f"  {label:18} {value}")
    for o in detail.opinions or []:
        echo(f"  {o.kind:18} {o.by} {o.at:%Y-%m-%d %H:%M} {o.reason or ''}")
    if detail.redacted:
        echo("  (redacted: notes and opinions need a submitter key)")


@click.command()
@flag_id_argument
@json_option
@registry_options
def audit(flag_id: str, as_json: bool, registry: str | None, api_key: str | None) -> None:
    """The audit trail of FLAG_ID, oldest first (admins, and the flag's own submitter)."""
    with client_for(registry, api_key) as client:
        trail = guarded(lambda: client.audit(flag_id))
    if as_json:
        print_json([e.model_dump(mode="json") for e in trail])
        return
    for e in trail:
        echo(f"{e.at:%Y-%m-%d %H:%M:%S}  {e.actor:24}  {e.action:18}  {e.reason or ''}")


@click.command()
@flag_id_argument
@click.option("--kind", required=True, type=click.Choice(["false-positive", "confirmed-hit"]),
              help="What your review of the matched upload found.")
@click.option("--note", help="What you found; shown to the registry's analysts.")
@json_option
@registry_options
def report(flag_id: str, kind: str, note: str | None, as_json: bool, registry: str | None,
           api_key: str | None) -> None:
    """Tell the registry's analysts about a match on FLAG_ID (any key, readers included).

    The report is stored and attributed to your key; it does not change the flag.
    """
    with client_for(registry, api_key) as client:
        out = guarded(lambda: client.report(flag_id, kind=kind, note=note))
    if as_json:
        print_json(out.model_dump(mode="json"))
    else:
        echo(f"reported {out.kind} on flag {out.flag_id} (report {out.id})")


def _read(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        fail(f"{path}: cannot be read ({exc.strerror or exc})")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        fail(f"{path}: not UTF-8 text")


@click.command("import")
@click.argument("file", metavar="FILE")
@click.option("--format", "fmt", type=click.Choice(["csv", "list"]),
              help="csv (a header row naming columns) or list (one hash a line). "
              "[default: csv for *.csv files, else list]")
@click.option("--category", type=click.Choice(CATEGORIES), help="For rows that name none.")
@click.option("--severity", type=click.Choice(SEVERITIES), help="For rows that name none.")
@click.option("--batch", default=1000, show_default=True, type=click.IntRange(1, 5000),
              help="Rows per request.")
@json_option
@registry_options
def import_(file: str, fmt: str | None, category: str | None, severity: str | None,
            batch: int, as_json: bool, registry: str | None, api_key: str | None) -> None:
    """Flag every hash in FILE ('-' reads stdin): a CSV or a plain list (submitters).

    CSV columns: sha256, blake3, content (one at least), category, severity, note,
    evidence; the columns 'modelhash export' writes are read back. A bad row is
    reported with its row number and the others go on; rows already flagged are
    left alone. Exit 0 when every row was imported or already flagged, 2 when some
    rows failed (the rest are in), 3 if the registry failed.
    """
    text = _read(file)
    fmt = fmt or ("csv" if file.lower().endswith(".csv") else "list")
    start = time.perf_counter()
    with client_for(registry, api_key) as client:
        out = guarded(lambda: client.import_flags(
            text, format=fmt, category=category, severity=severity, batch=batch))
    elapsed = time.perf_counter() - start
    if as_json:
        print_json(out.model_dump(mode="json"))
    else:
        rows = len(out.rows)
        echo(f"{rows} row(s) in {elapsed:.1f} s ({rows / max(elapsed, 1e-9):.0f} rows/s): "
             f"{out.created} created, {out.existing} already flagged, {out.failed} failed")
    for r in out.rows:
        if r.status == "error":
            sys.stderr.write(f"modelhash: {file}: row {r.row}: {r.error}\n")
    if out.failed:
        raise SystemExit(int(Exit.BAD_INPUT))


@click.command()
@filter_options
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the CSV here instead of stdout.")
@registry_options
def export(q: str | None, status: str | None, category: str | None, severity: str | None,
           submitter: str | None, since: str | None, until: str | None, reported: bool,
           output: Path | None, registry: str | None, api_key: str | None) -> None:
    """Write the flags matching the filters as CSV (submitters): dates, submitter,
    status, category, severity, fingerprints and notes; 'modelhash import' reads it."""
    filters = _filters(q, status, category, severity, submitter, since, until, reported)
    with client_for(registry, api_key) as client:
        text = guarded(lambda: client.export_csv(**filters))
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"{output}: cannot be written ({exc.strerror or exc})")
    echo(f"{max(text.count(chr(10)) - 1, 0)} line(s) written to {output}")
