"""The web UI over HTTP, on both databases: sign-in, cookies, CSRF, roles, redaction.

The browser tests in tests/ui drive the same pages in Chromium; these check the
contract at the HTTP level, where every header and status can be seen.
"""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.utils.registry import auth, flag_body


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def signed_in(app: FastAPI, key: str) -> tuple[TestClient, str]:
    """A fresh browser-like client signed in with ``key``, and its session's CSRF token."""
    c = TestClient(app, follow_redirects=False)
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"api_key": key, "csrf_token": _csrf(page.text)})
    assert r.status_code == 303, r.text
    home = c.get("/ui/")
    assert home.status_code == 200
    return c, _csrf(home.text)


@pytest.fixture
def flag(client, keys) -> dict:
    r = client.post("/v1/flags", json=flag_body(note="secret note"), headers=auth(keys["submitter"]))
    assert r.status_code == 201
    return r.json()


def status_of(client, keys, flag_id: str) -> str:
    return client.get(f"/v1/flags/{flag_id}", headers=auth(keys["admin"])).json()["status"]


def test_the_ui_redirects_to_sign_in(app):
    c = TestClient(app, follow_redirects=False)
    r = c.get("/ui/")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    assert c.get("/").headers["location"] == "/ui/"
    r = c.get("/ui/flags?q=abc")
    assert r.status_code == 303 and "next=%2Fui%2Fflags%3Fq%3Dabc" in r.headers["location"]


def test_sign_in_sets_a_strict_httponly_cookie_and_logout_ends_it(app, keys):
    c = TestClient(app, follow_redirects=False)
    page = c.get("/ui/login")
    assert 'name="api_key"' in page.text
    r = c.post("/ui/login", data={"api_key": keys["admin"], "csrf_token": _csrf(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = next(v for k, v in r.headers.multi_items()
                  if k == "set-cookie" and v.startswith("mh_session="))
    low = cookie.lower()
    assert "httponly" in low and "samesite=strict" in low and "max-age=28800" in low
    assert "secure" not in low  # plain HTTP here; see the TLS test
    assert keys["admin"] not in cookie
    token = c.cookies.get("mh_session")
    home = c.get("/ui/")
    assert home.status_code == 200 and "admin" in home.text
    assert home.headers["x-frame-options"] == "DENY"
    assert home.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in home.headers["content-security-policy"]
    out = c.post("/ui/logout", data={"csrf_token": _csrf(home.text)})
    assert out.status_code == 303
    # The old cookie is worthless now, even if a copy was kept.
    stale = TestClient(app, follow_redirects=False, cookies={"mh_session": token})
    assert stale.get("/ui/").status_code == 303


def test_the_cookie_is_secure_behind_tls(app, keys):
    c = TestClient(app, base_url="https://testserver", follow_redirects=False)
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"api_key": keys["reader"], "csrf_token": _csrf(page.text)})
    cookie = next(v for k, v in r.headers.multi_items()
                  if k == "set-cookie" and v.startswith("mh_session="))
    assert "secure" in cookie.lower()


def test_a_bad_key_or_a_forged_sign_in_is_refused(app, keys):
    c = TestClient(app, follow_redirects=False)
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"api_key": "mh_nope", "csrf_token": _csrf(page.text)})
    assert r.status_code == 401 and "Unknown or revoked" in r.text
    assert "mh_session" not in c.cookies
    other = TestClient(app, follow_redirects=False)
    r = other.post("/ui/login", data={"api_key": keys["admin"], "csrf_token": "forged"})
    assert r.status_code == 403 and "mh_session" not in other.cookies


def test_open_redirects_are_not_followed(app, keys):
    c = TestClient(app, follow_redirects=False)
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"api_key": keys["reader"], "csrf_token": _csrf(page.text),
                                  "next": "//evil.example/"})
    assert r.headers["location"] == "/ui/"


@pytest.mark.parametrize("action", ["dispute", "confirm", "revoke", "reinstate"])
def test_every_action_needs_the_csrf_token(app, client, keys, flag, action):
    c, token = signed_in(app, keys["admin"])
    if action == "reinstate":
        client.post(f"/v1/flags/{flag['id']}/dispute", json={"reason": "r"},
                    headers=auth(keys["submitter2"]))
    before = status_of(client, keys, flag["id"])
    trail = len(client.get(f"/v1/flags/{flag['id']}/audit", headers=auth(keys["admin"])).json())
    for data in ({"reason": "x"}, {"reason": "x", "csrf_token": "wrong"}):
        r = c.post(f"/ui/flags/{flag['id']}/{action}", data=data)
        assert r.status_code == 403, r.text
        assert "CSRF" in r.text
    assert status_of(client, keys, flag["id"]) == before
    after = client.get(f"/v1/flags/{flag['id']}/audit", headers=auth(keys["admin"])).json()
    assert len(after) == trail
    r = c.post(f"/ui/flags/{flag['id']}/{action}", data={"reason": "checked", "csrf_token": token})
    assert r.status_code == 303, r.text
    expected = {"dispute": "disputed", "confirm": before, "revoke": "revoked",
                "reinstate": "active"}[action]
    assert status_of(client, keys, flag["id"]) == expected
    last = client.get(f"/v1/flags/{flag['id']}/audit", headers=auth(keys["admin"])).json()[-1]
    assert last["reason"] == "checked" and last["actor"].endswith("test-admin")


def test_another_sessions_token_does_not_work(app, keys, flag):
    c, _ = signed_in(app, keys["admin"])
    _, other_token = signed_in(app, keys["admin"])
    r = c.post(f"/ui/flags/{flag['id']}/revoke", data={"reason": "x", "csrf_token": other_token})
    assert r.status_code == 403


def test_roles_are_enforced_as_in_rest(app, client, keys, flag):
    reader, token = signed_in(app, keys["reader"])
    page = reader.get(f"/ui/flags/{flag['id']}")
    assert page.status_code == 200
    assert "secret note" not in page.text and "Redacted view" in page.text
    assert 'action="/ui/flags/' + flag["id"] + '/revoke"' not in page.text
    for action in ("dispute", "revoke"):
        r = reader.post(f"/ui/flags/{flag['id']}/{action}",
                        data={"reason": "x", "csrf_token": token})
        assert r.status_code == 403
    assert status_of(client, keys, flag["id"]) == "active"
    assert reader.get("/ui/keys").status_code == 403
    assert reader.get("/ui/audit").status_code == 403
    assert reader.get("/ui/import").status_code == 403
    assert reader.get("/ui/export.csv").status_code == 403
    listing = reader.get("/ui/flags")
    assert "needs a submitter key" in listing.text
    found = reader.get("/ui/flags", params={"q": flag["fingerprints"]["sha256"][0]})
    assert flag["id"] in found.text and "secret note" not in found.text
    sub, sub_token = signed_in(app, keys["submitter2"])
    r = sub.post(f"/ui/flags/{flag['id']}/revoke", data={"reason": "x", "csrf_token": sub_token})
    assert r.status_code == 403
    assert "secret note" in sub.get(f"/ui/flags/{flag['id']}").text
    assert sub.get("/ui/keys").status_code == 403


def test_a_reader_reports_from_the_flag_page(app, client, keys, flag):
    reader, token = signed_in(app, keys["reader"])
    r = reader.post(f"/ui/flags/{flag['id']}/false-positive",
                    data={"reason": "harmless upload", "csrf_token": token})
    assert r.status_code == 303
    assert status_of(client, keys, flag["id"]) == "active"
    reports = client.get(f"/v1/flags/{flag['id']}/reports", headers=auth(keys["admin"])).json()
    assert [x["note"] for x in reports] == ["harmless upload"]
    admin, _ = signed_in(app, keys["admin"])
    assert "harmless upload" in admin.get("/ui/review").text


def test_a_revoked_key_ends_its_sessions(app, client, keys):
    r = client.post("/v1/keys", json={"role": "submitter", "name": "leaver"},
                    headers=auth(keys["admin"]))
    created = r.json()
    c, _ = signed_in(app, created["key"])
    admin, token = signed_in(app, keys["admin"])
    assert admin.post(f"/ui/keys/{created['id']}/revoke", data={}).status_code == 403
    assert c.get("/ui/").status_code == 200
    r = admin.post(f"/ui/keys/{created['id']}/revoke", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/ui/keys"
    assert c.get("/ui/").status_code == 303
    assert admin.post("/ui/keys/0/revoke", data={"csrf_token": token}).status_code == 422


def test_hostile_input_gets_a_page_not_a_traceback(app, keys):
    c, token = signed_in(app, keys["admin"])
    assert c.get("/ui/flags/" + "x" * 300).status_code == 404
    assert c.get("/ui/flags", params={"since": "yesterday"}).status_code == 400
    assert c.get("/ui/flags", params={"status": "<script>"}).status_code == 400
    assert "<script>" not in c.get("/ui/flags", params={"q": "<script>"}).text
    assert c.get("/ui/flags", params={"page": "0"}).status_code == 422
    r = c.post("/ui/test", data={"hashes": "not a hash", "csrf_token": token})
    assert r.status_code == 400 and "not a hash" in r.text
    r = c.post("/ui/test", files={"file": ("x.safetensors", b"\x00" * 64)},
               data={"csrf_token": token})
    assert r.status_code == 400
    r = c.post("/ui/test", files={"file": ("x.exe", b"MZ")}, data={"csrf_token": token})
    assert r.status_code == 400
    r = c.post("/ui/flags/abc/explode", data={"reason": "x", "csrf_token": token})
    assert r.status_code == 400


def test_api_docs_are_served_locally(app):
    c = TestClient(app)
    for path in ("/docs", "/redoc"):
        html = c.get(path).text
        assert "cdn" not in html.lower() and "googleapis" not in html
    assert c.get("/ui/static/vendor/swagger-ui-bundle.js").status_code == 200
    assert c.get("/ui/static/vendor/redoc.standalone.js").status_code == 200
    assert c.get("/ui/static/vendor/htmx.min.js").status_code == 200
