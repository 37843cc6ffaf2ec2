"""The REST under the analyst UI: search filters with a total, reports, audit access,
bulk import, CSV export."""

from __future__ import annotations

import csv
import io
import secrets
import time

from fastapi.testclient import TestClient

from tests.utils.registry import auth, flag_body, random_fingerprint


def submit(client: TestClient, key: str, **fields) -> dict:
    r = client.post("/v1/flags", json=flag_body(**fields), headers=auth(key))
    assert r.status_code == 201, r.text
    return r.json()


def test_search_by_every_hash_form_with_a_total(client, keys):
    fp = random_fingerprint()
    flag = submit(client, keys["submitter"], fingerprint=fp)
    for q in (fp["sha256"], fp["sha256"].upper(), f"blake3:{fp['blake3']}", fp["content"],
              f"content:{fp['content']}", fp["autov2"], fp["crc32"], flag["id"]):
        r = client.get("/v1/flags", params={"q": q}, headers=auth(keys["submitter"]))
        assert r.status_code == 200, r.text
        assert [f["id"] for f in r.json()] == [flag["id"]], q
        assert r.headers["X-Total-Count"] == "1"


def test_filters_combine_and_the_total_counts_all_pages(client, keys):
    tag = secrets.token_hex(6)
    for severity in ("low", "low", "low", "critical"):
        submit(client, keys["submitter2"], category="ncii", severity=severity, note=f"batch {tag}")
    r = client.get("/v1/flags", params={"q": tag, "severity": "low", "category": "ncii",
                                        "limit": 2}, headers=auth(keys["submitter"]))
    assert r.status_code == 200
    assert len(r.json()) == 2 and r.headers["X-Total-Count"] == "3"
    r = client.get("/v1/flags", params={"q": tag, "submitter": "submitter2", "limit": 500},
                   headers=auth(keys["submitter"]))
    assert r.headers["X-Total-Count"] == "4"
    r = client.get("/v1/flags", params={"q": tag, "category": "csam"},
                   headers=auth(keys["submitter"]))
    assert r.json() == [] and r.headers["X-Total-Count"] == "0"


def test_date_range_filters(client, keys):
    tag = secrets.token_hex(6)
    submit(client, keys["submitter"], note=tag)
    future = "2999-01-01T00:00:00Z"
    r = client.get("/v1/flags", params={"q": tag, "since": future}, headers=auth(keys["admin"]))
    assert r.headers["X-Total-Count"] == "0"
    r = client.get("/v1/flags", params={"q": tag, "until": future}, headers=auth(keys["admin"]))
    assert r.headers["X-Total-Count"] == "1"
    r = client.get("/v1/flags", params={"q": tag, "since": "2020-01-01T00:00:00"},
                   headers=auth(keys["admin"]))
    assert r.status_code == 400 and "time zone" in r.json()["detail"]


def test_unknown_or_invalid_filters_are_refused_not_ignored(client, keys):
    r = client.get("/v1/flags", params={"categroy": "ncii"}, headers=auth(keys["submitter"]))
    assert r.status_code == 400 and "categroy" in r.json()["detail"]
    r = client.get("/v1/flags", params={"category": "nope"}, headers=auth(keys["submitter"]))
    assert r.status_code == 422
    r = client.get("/v1/flags", params={"q": "x" * 201}, headers=auth(keys["submitter"]))
    assert r.status_code == 422


def test_like_wildcards_in_text_search_are_literal(client, keys):
    r = client.get("/v1/flags", params={"q": "%"}, headers=auth(keys["submitter"]))
    assert r.status_code == 200
    assert all("%" in (f["note"] or "") + (f["evidence"] or "") for f in r.json())


def test_the_submitter_reads_the_audit_of_their_own_flags_only(client, keys):
    flag = submit(client, keys["submitter"])
    path = f"/v1/flags/{flag['id']}/audit"
    assert client.get(path, headers=auth(keys["submitter"])).status_code == 200
    assert client.get(path, headers=auth(keys["admin"])).status_code == 200
    assert client.get(path, headers=auth(keys["submitter2"])).status_code == 403
    assert client.get(path, headers=auth(keys["reader"])).status_code == 403


def test_a_reader_reports_and_the_status_does_not_change(client, keys):
    flag = submit(client, keys["submitter"])
    path = f"/v1/flags/{flag['id']}/reports"
    body = {"kind": "false-positive", "note": "our reviewers found it harmless"}
    r = client.post(path, json=body, headers=auth(keys["reader"]))
    assert r.status_code == 201, r.text
    report = r.json()
    assert report["kind"] == "false-positive" and report["by"].startswith("key:")
    again = client.post(path, json=body, headers=auth(keys["reader"]))
    assert again.status_code == 200 and again.json()["id"] == report["id"]
    got = client.get(f"/v1/flags/{flag['id']}", headers=auth(keys["admin"])).json()
    assert got["status"] == "active"
    listed = client.get(path, headers=auth(keys["submitter"])).json()
    assert [x["id"] for x in listed] == [report["id"]]
    assert client.get(path, headers=auth(keys["reader"])).status_code == 403
    queue = client.get("/v1/reports", headers=auth(keys["submitter"])).json()
    assert report["id"] in [x["id"] for x in queue]
    trail = client.get(f"/v1/flags/{flag['id']}/audit", headers=auth(keys["admin"])).json()
    assert "flag.reported" in [e["action"] for e in trail]
    r = client.get("/v1/flags", params={"reported": "true", "q": flag["id"]},
                   headers=auth(keys["submitter"]))
    assert r.headers["X-Total-Count"] == "1"


def test_bad_reports_are_refused(client, keys):
    flag = submit(client, keys["submitter"])
    path = f"/v1/flags/{flag['id']}/reports"
    assert client.post(path, json={"kind": "meh"}, headers=auth(keys["reader"])).status_code == 422
    assert client.post(path, json={"kind": "confirmed-hit", "x": 1},
                       headers=auth(keys["reader"])).status_code == 422
    assert client.post("/v1/flags/nope/reports", json={"kind": "confirmed-hit"},
                       headers=auth(keys["reader"])).status_code == 404
    assert client.post(path, json={"kind": "confirmed-hit"}).status_code == 401


def _csv(rows: list[dict[str, str]], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def test_import_gives_a_result_per_row_and_a_bad_row_fails_alone(client, keys):
    existing = submit(client, keys["submitter"])
    good = random_fingerprint()
    rows = [
        {"sha256": good["sha256"], "blake3": good["blake3"], "category": "ncii",
         "severity": "high", "note": "from the old list"},
        {"sha256": "not-hex", "category": "ncii", "severity": "", "note": ""},
        {"sha256": existing["fingerprints"]["sha256"][0], "category": "csam", "severity": "",
         "note": ""},
        {"sha256": secrets.token_hex(32), "category": "", "severity": "", "note": ""},
        {"sha256": good["sha256"], "category": "ncii", "severity": "", "note": "twice"},
        {"sha256": secrets.token_hex(32), "category": "bogus", "severity": "", "note": ""},
    ]
    text = _csv(rows, ["sha256", "blake3", "category", "severity", "note"])
    r = client.post("/v1/flags/import", json={"format": "csv", "text": text},
                    headers=auth(keys["submitter"]))
    assert r.status_code == 200, r.text
    out = r.json()
    statuses = [(x["row"], x["status"]) for x in out["rows"]]
    assert statuses == [(2, "created"), (3, "error"), (4, "exists"), (5, "error"),
                        (6, "exists"), (7, "error")]
    assert out["created"] == 1 and out["existing"] == 2 and out["failed"] == 3
    assert out["rows"][2]["flag_id"] == existing["id"]
    assert out["rows"][4]["flag_id"] == out["rows"][0]["flag_id"]
    assert "category" in out["rows"][3]["error"]
    made = client.get(f"/v1/flags/{out['rows'][0]['flag_id']}", headers=auth(keys["admin"]))
    assert made.json()["note"] == "from the old list"
    assert made.json()["fingerprints"]["blake3"] == [good["blake3"]]
    check = client.post("/v1/check", json={"items": [{"sha256": good["sha256"]}]},
                        headers=auth(keys["reader"]))
    assert check.json()["results"][0]["verdict"] == "match"


def test_import_a_plain_list_with_a_default_category(client, keys):
    values = [secrets.token_hex(32) for _ in range(3)]
    text = "# hotline list\n" + "\n".join([values[0], f"blake3:{values[1]}", "", values[2],
                                            "zzzz"]) + "\n"
    r = client.post("/v1/flags/import", json={"format": "list", "text": text,
                                              "category": "csam", "severity": "critical"},
                    headers=auth(keys["submitter"]))
    out = r.json()
    assert [(x["row"], x["status"]) for x in out["rows"]] == [
        (2, "created"), (3, "created"), (5, "created"), (6, "error")]
    first = client.get(f"/v1/flags/{out['rows'][1]['flag_id']}", headers=auth(keys["admin"]))
    assert first.json()["fingerprints"] == {"blake3": [values[1]]}
    assert first.json()["category"] == "csam" and first.json()["severity"] == "critical"


def test_import_refuses_bad_requests_whole(client, keys):
    h = auth(keys["submitter"])
    r = client.post("/v1/flags/import", json={"text": "sha256,colour\nab,red\n"}, headers=h)
    assert r.status_code == 400 and "colour" in r.json()["detail"]
    r = client.post("/v1/flags/import", json={"text": "category\nncii\n"}, headers=h)
    assert r.status_code == 400 and "hash column" in r.json()["detail"]
    r = client.post("/v1/flags/import", json={"text": ""}, headers=h)
    assert r.status_code == 422
    r = client.post("/v1/flags/import", json={"format": "list", "text": "a\x00b"}, headers=h)
    assert r.status_code == 422
    r = client.post("/v1/flags/import", json={"format": "csv", "text": "x"},
                    headers=auth(keys["reader"]))
    assert r.status_code == 403


def test_import_is_fast_in_batches(client, keys):
    n = 2000
    text = "\n".join(secrets.token_hex(32) for _ in range(n))
    start = time.perf_counter()
    r = client.post("/v1/flags/import", json={"format": "list", "text": text, "category": "other"},
                    headers=auth(keys["submitter"]))
    elapsed = time.perf_counter() - start
    assert r.status_code == 200 and r.json()["created"] == n
    assert n / elapsed > 300, f"{n / elapsed:.0f} rows/s"


def test_export_round_trips_through_import(client, keys):
    tag = secrets.token_hex(6)
    flags = [submit(client, keys["submitter"], note=f"{tag} =cmd|' /C calc'!A0") for _ in range(3)]
    r = client.get("/v1/flags.csv", params={"q": tag}, headers=auth(keys["submitter"]))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["id"] for row in rows} == {f["id"] for f in flags}
    row = rows[0]
    assert row["status"] == "active" and row["submitter"].startswith("key:")
    assert row["created_at"] and row["sha256"] and row["content"]
    assert row["note"].startswith(tag)  # a note never starts a formula
    assert client.get("/v1/flags.csv", params={"bogus": 1},
                      headers=auth(keys["submitter"])).status_code == 400
    assert client.get("/v1/flags.csv", headers=auth(keys["reader"])).status_code == 403
    again = client.post("/v1/flags/import", json={"text": r.text},
                        headers=auth(keys["submitter"])).json()
    assert again["existing"] == 3 and again["failed"] == 0


def test_audit_search_for_admins(client, keys):
    flag = submit(client, keys["submitter"])
    r = client.get("/v1/audit", params={"target": flag["id"]}, headers=auth(keys["admin"]))
    assert r.status_code == 200 and r.headers["X-Total-Count"] == "1"
    assert r.json()[0]["action"] == "flag.created"
    assert client.get("/v1/audit", headers=auth(keys["submitter"])).status_code == 403
