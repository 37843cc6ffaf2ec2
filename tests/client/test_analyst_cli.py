"""The analyst commands against the real registry: confirm, reinstate, flags list/show,
audit, report, import and export, with their exit codes."""

from __future__ import annotations

import csv
import io
import json
import secrets


def test_the_review_workflow_from_the_terminal(live_registry):
    submitter = live_registry.cli(live_registry.submitter)
    admin = live_registry.cli(live_registry.admin)
    reader = live_registry.cli(live_registry.reader)
    value = secrets.token_hex(32)
    (tmp := live_registry.log.parent / f"{value[:8]}.txt").write_text(value + "\n")
    out = submitter("import", tmp, "--category", "ncii", "--json")
    assert out.exit_code == 0, out.output
    fid = json.loads(out.stdout)["rows"][0]["flag_id"]

    listed = submitter("flags", "list", "--q", value)
    assert listed.exit_code == 0 and fid in listed.stdout and "1 flag(s) match" in listed.stdout
    page = json.loads(submitter("flags", "list", "--category", "ncii", "--json").stdout)
    assert page["total"] >= 1 and "flags" in page
    shown = submitter("flags", "show", fid)
    assert shown.exit_code == 0 and value in shown.stdout

    assert submitter("dispute", fid, "--reason", "wrong list").exit_code == 0
    assert admin("revoke", fid, "--reason", "dispute holds").exit_code == 0
    refused = submitter("reinstate", fid, "--reason", "no")
    assert refused.exit_code == 3
    back = admin("reinstate", fid, "--reason", "new evidence", "--json")
    assert back.exit_code == 0 and json.loads(back.stdout)["status"] == "active"
    assert admin("confirm", fid, "--reason", "seen again").exit_code == 0

    trail = submitter("audit", fid)  # the flag's own submitter may read it
    assert trail.exit_code == 0
    for action in ("flag.created", "flag.disputed", "flag.revoked", "flag.reinstated",
                   "flag.confirmed"):
        assert action in trail.stdout
    assert reader("audit", fid).exit_code == 3

    rep = reader("report", fid, "--kind", "false-positive", "--note", "harmless")
    assert rep.exit_code == 0 and "reported false-positive" in rep.stdout
    assert reader("flags", "show", fid).stdout.count("redacted") == 1


def test_import_reports_bad_rows_and_export_reads_back(live_registry, tmp_path):
    submitter = live_registry.cli(live_registry.submitter)
    values = [secrets.token_hex(32) for _ in range(3)]
    listing = tmp_path / "hotline.csv"
    listing.write_text("sha256,category,severity,note\n"
                       f"{values[0]},csam,critical,a\n"
                       "xyz,csam,critical,bad\n"
                       f"{values[1]},ncii,,b\n"
                       f"{values[2]},ncii,,c\n")
    out = submitter("import", listing, "--batch", "2")
    assert out.exit_code == 2
    assert "3 created, 0 already flagged, 1 failed" in out.stdout
    assert "row 3:" in out.stderr
    exported = tmp_path / "out.csv"
    done = submitter("export", "--q", values[1], "-o", exported)
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader(io.StringIO(exported.read_text())))
    assert [(r["sha256"], r["category"], r["severity"]) for r in rows] == [
        (values[1], "ncii", "high")]
    again = submitter("import", exported)
    assert again.exit_code == 0 and "1 already flagged" in again.stdout
    piped = submitter("export", "--category", "csam", "--since", "2020-01-01")
    assert piped.exit_code == 0 and values[0] in piped.stdout
    assert submitter("export", "--since", "yesterday").exit_code == 2
    assert submitter("import", tmp_path / "missing.csv").exit_code == 2
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00")
    assert submitter("import", tmp_path / "bin.csv").exit_code == 2
    assert live_registry.cli(live_registry.reader)("export").exit_code == 3
