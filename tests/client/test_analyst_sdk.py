"""The SDK's analyst methods against the real registry: search with a total, batched
import with the file's row numbers, export, reports and audit trails, sync and async."""

from __future__ import annotations

import asyncio
import csv
import io
import secrets

import pytest

from modelhash import AsyncRegistryClient, RegistryClient
from modelhash.errors import InputError, RegistryHTTPError


def test_import_in_batches_keeps_the_files_row_numbers(live_registry):
    values = [secrets.token_hex(32) for _ in range(5)]
    text = "sha256,category,note\n" + "\n".join(
        [f"{values[0]},ncii,a", "zz,ncii,bad", f"{values[1]},ncii,b", f"{values[2]},,c",
         f'{values[3]},csam,"two\nlines"', f"{values[4]},csam,e"]) + "\n"
    with RegistryClient(live_registry.url, api_key=live_registry.submitter) as c:
        out = c.import_flags(text, batch=2, category="other")
        assert [(r.row, r.status) for r in out.rows] == [
            (2, "created"), (3, "error"), (4, "created"), (5, "created"), (6, "created"),
            (7, "created")]
        assert out.created == 5 and out.failed == 1
        page = c.search_flags(q=values[2])
        assert page.total == 1 and page.flags[0].category == "other"
        again = c.import_flags("\n".join(values), format="list", category="csam", batch=3)
        assert again.existing == 5 and [r.row for r in again.rows] == [1, 2, 3, 4, 5]
        exported = c.export_csv(q="two")
        rows = list(csv.DictReader(io.StringIO(exported)))
        assert [r["sha256"] for r in rows] == [values[3]] and rows[0]["note"] == "two\nlines"
        with pytest.raises(InputError):
            c.import_flags("x", format="xml")
        with pytest.raises(RegistryHTTPError):
            c.search_flags(colour="red")


def test_search_total_reports_and_audit(live_registry):
    tag = secrets.token_hex(5)
    with RegistryClient(live_registry.url, api_key=live_registry.submitter) as c:
        made = [c.flag({"sha256": secrets.token_hex(32)}, category="ncii", note=tag)
                for _ in range(3)]
        page = c.search_flags(q=tag, limit=2)
        assert page.total == 3 and len(page.flags) == 2
        assert [e.action for e in c.audit(made[0].id)] == ["flag.created"]
    with RegistryClient(live_registry.url, api_key=live_registry.reader) as reader:
        rep = reader.report(made[0].id, kind="false-positive", note="harmless")
        assert rep.kind == "false-positive"
        assert reader.get_flag(made[0].id).status == "active"
    with RegistryClient(live_registry.url, api_key=live_registry.admin) as admin:
        assert [r.id for r in admin.reports(made[0].id)] == [rep.id]
        assert rep.id in [r.id for r in admin.reports()]


def test_the_async_client_has_the_same_methods(live_registry):
    async def run() -> None:
        async with AsyncRegistryClient(live_registry.url, api_key=live_registry.submitter) as c:
            value = secrets.token_hex(32)
            out = await c.import_flags(value, format="list", category="csam")
            assert out.created == 1
            page = await c.search_flags(q=value)
            assert page.total == 1
            fid = page.flags[0].id
            assert (await c.audit(fid))[0].action == "flag.created"
            assert (await c.report(fid, kind="confirmed-hit")).kind == "confirmed-hit"
            assert value in await c.export_csv(q=value)

    asyncio.run(run())
