"""The analyst workflow in a real browser: headless system Chromium through Playwright.

Sign-in, search, the flag page, every action with and without its CSRF token, role
enforcement, the evidence picture, import and export. Set MODELHASH_UI_SCREENSHOTS
to a folder to also save a screenshot of every page (docs/ui uses them).
"""

from __future__ import annotations

import csv
import io
import os
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ui.conftest import UiServer, sign_in

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

SHOTS = os.environ.get("MODELHASH_UI_SCREENSHOTS")


def shot(page: Any, name: str, *, full: bool = True) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=full)


def rest(server: UiServer, role: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, timeout=30,
                         headers={"Authorization": f"Bearer {server.keys[role]}"}, **kw)


def status(server: UiServer, flag_id: str) -> str:
    return str(rest(server, "admin", "GET", f"/v1/flags/{flag_id}").json()["status"])


def test_sign_in_and_out(page, ui_server):
    page.goto(ui_server.url + "/ui/flags")
    assert "/ui/login" in page.url
    shot(page, "login")
    page.get_by_label("API key").fill("mh_wrong")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text().startswith("Unknown or revoked")
    page.get_by_label("API key").fill(ui_server.keys["submitter"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(ui_server.url + "/ui/flags")
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["mh_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert page.evaluate("document.cookie").find("mh_session") == -1  # not readable by scripts
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/ui/login")
    page.goto(ui_server.url + "/ui/")
    assert "/ui/login" in page.url


def test_dashboard_and_search(page, ui_server):
    sign_in(page, ui_server, "admin")
    assert page.get_by_role("heading", name="Dashboard").is_visible()
    shot(page, "dashboard")
    flag = rest(ui_server, "admin", "GET", f"/v1/flags/{ui_server.demo.flags[5]}").json()
    page.goto(ui_server.url + "/ui/flags")
    shot(page, "flags", full=False)
    page.get_by_label("Search").fill(flag["fingerprints"]["sha256"][0].upper())
    page.get_by_label("Search").press("Enter")
    page.wait_for_url("**q=*")
    assert page.locator("#count").inner_text().startswith("1 flag")
    page.get_by_role("link", name=flag["id"][:8]).click()
    page.wait_for_url(f"**/ui/flags/{flag['id']}")
    page.goto(ui_server.url + "/ui/flags?status=disputed")
    assert page.locator("#count").inner_text().startswith("1 flag")
    page.get_by_label("Category").select_option("ncii")
    page.get_by_role("button", name="Search").click()
    page.wait_for_url("**category=ncii*")
    assert page.get_by_label("Status").input_value() == "disputed"


def test_keyboard_reaches_search_and_sign_out(page, ui_server):
    sign_in(page, ui_server, "admin")
    page.goto(ui_server.url + "/ui/flags")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    focused = set()
    for _ in range(40):
        page.keyboard.press("Tab")
        focused.add(page.evaluate("document.activeElement.id || document.activeElement.textContent"))
    assert {"q", "status", "Sign out"} <= focused


def test_the_flag_page_and_the_whole_review_workflow(page, ui_server):
    fp = {"sha256": secrets.token_hex(32), "content": secrets.token_hex(32)}
    flag = rest(ui_server, "submitter", "POST", "/v1/flags", json={
        "category": "csam", "severity": "critical", "note": "workflow test",
        "fingerprint": fp}).json()
    fid = flag["id"]
    # A second submitter disputes it in the browser.
    sign_in(page, ui_server, "submitter2")
    page.goto(f"{ui_server.url}/ui/flags/{fid}")
    assert page.get_by_text("workflow test").is_visible()
    assert page.get_by_role("button", name="Revoke").count() == 0  # not a submitter's action
    page.get_by_label("Dispute —").fill("licensed training data")
    page.get_by_role("button", name="Dispute").click()
    page.wait_for_url("**done=dispute")
    assert status(ui_server, fid) == "disputed"
    page.get_by_role("button", name="Sign out").click()
    # An admin sees it in the review queue, revokes it, then reinstates it.
    sign_in(page, ui_server, "admin")
    page.goto(ui_server.url + "/ui/review")
    shot(page, "review")
    page.get_by_role("link", name=fid[:8]).click()
    shot(page, "flag")
    page.get_by_label("Revoke —").fill("the dispute holds")
    page.get_by_role("button", name="Revoke").click()
    page.wait_for_url("**done=revoke")
    assert status(ui_server, fid) == "revoked"
    page.get_by_label("Reinstate —").fill("new evidence")
    page.get_by_role("button", name="Reinstate").click()
    page.wait_for_url("**done=reinstate")
    assert status(ui_server, fid) == "active"
    page.get_by_label("Confirm —").fill("seen again")
    page.get_by_role("button", name="Confirm").click()
    page.wait_for_url("**done=confirm")
    trail = page.locator("#trail + table").inner_text()
    for action in ("flag.created", "flag.disputed", "flag.revoked", "flag.reinstated",
                   "flag.confirmed"):
        assert action in trail


@pytest.mark.parametrize("action", ["dispute", "confirm", "revoke", "reinstate"])
def test_an_action_without_the_csrf_token_is_refused(page, ui_server, action):
    fid = ui_server.demo.disputed if action == "reinstate" else ui_server.demo.flags[6 + len(action)]
    sign_in(page, ui_server, "admin")
    page.goto(f"{ui_server.url}/ui/flags/{fid}")
    before = status(ui_server, fid)
    form = page.locator(f'form[action="/ui/flags/{fid}/{action}"]')
    form.locator('input[name="csrf_token"]').evaluate("e => e.remove()")
    form.locator("textarea").fill("forged")
    with page.expect_navigation() as nav:
        form.get_by_role("button").click()
    assert nav.value.status == 403
    assert "CSRF" in page.get_by_role("alert").inner_text()
    assert status(ui_server, fid) == before


def test_a_reader_sees_the_redacted_view_and_cannot_act(page, ui_server):
    sign_in(page, ui_server, "reader")
    assert page.get_by_role("link", name="Keys").count() == 0
    page.goto(f"{ui_server.url}/ui/flags/{ui_server.demo.lora_flag}")
    assert page.get_by_text("Redacted view").is_visible()
    assert page.get_by_role("button", name="Dispute").count() == 0
    token = page.locator('input[name="csrf_token"]').first.input_value()
    # Even a well-formed POST with a valid token is refused for the role.
    r = page.request.post(f"{ui_server.url}/ui/flags/{ui_server.demo.lora_flag}/revoke",
                          form={"reason": "x", "csrf_token": token}, max_redirects=0)
    assert r.status == 403
    assert status(ui_server, ui_server.demo.lora_flag) == "active"
    page.goto(ui_server.url + "/ui/keys")
    assert page.get_by_role("heading", name="Not allowed (403)").is_visible()


def test_the_evidence_picture(page, ui_server):
    sign_in(page, ui_server, "reader")
    page.goto(ui_server.url + "/ui/test")
    page.get_by_label("Model file").set_input_files(str(ui_server.demo.upload))
    page.get_by_role("button", name="Check").click()
    page.wait_for_selector("svg.evidence")
    shot(page, "test")
    assert "lora-baked" in page.locator("main").inner_text()
    svg = page.locator("svg.evidence")
    assert svg.get_attribute("role") == "img"
    titles = svg.locator("g > title").all_text_contents()
    flagged = [t for t in titles if "cosine" in t]
    # The flagged LoRA sits in the attention of up blocks 1 and 2, and only there.
    assert sorted(t.split(":")[0] for t in flagged) == [
        "unet up_blocks_1 attention", "unet up_blocks_2 attention"]
    assert all(float(t.split("cosine ")[1].split(",")[0]) > 0.9 for t in flagged)
    box = svg.bounding_box()
    assert box and box["width"] > 600 and box["height"] > 150
    # The matching API returns the same per-block figures.
    from modelhash.fingerprint import fingerprint_path
    from modelhash.wire import encode_sketch

    (outcome,) = fingerprint_path(ui_server.demo.upload)
    fp = outcome.fingerprint
    item = {**fp.summary(), "sketch": encode_sketch(fp.sketch)}
    result = rest(ui_server, "reader", "POST", "/v1/check", json={"items": [item]}).json()
    (match,) = result["results"][0]["matches"]
    blocks = {(b["block"], b["part"]): b for b in match["evidence"]["blocks"]}
    assert blocks[("up_blocks_1", "attention")]["cosine"] > 0.9
    assert blocks[("down_blocks_0", "attention")]["cosine"] is None
    assert abs(sum(b["share"] for b in blocks.values()) - 1) < 0.01


def test_pasted_hashes(page, ui_server):
    flag = rest(ui_server, "admin", "GET", f"/v1/flags/{ui_server.demo.flags[4]}").json()
    sign_in(page, ui_server, "reader")
    page.goto(ui_server.url + "/ui/test")
    page.get_by_label("paste hashes").fill(flag["fingerprints"]["sha256"][0] + "\n" +
                                           secrets.token_hex(32))
    page.get_by_role("button", name="Check").click()
    page.wait_for_selector("h2#res2")
    assert page.locator("#res1").inner_text().endswith("match")
    assert page.locator("#res2").inner_text().endswith("clean")


def test_import_and_export(page, ui_server, tmp_path):
    sign_in(page, ui_server, "submitter")
    page.goto(ui_server.url + "/ui/import")
    values = [secrets.token_hex(32) for _ in range(3)]
    listing = tmp_path / "list.csv"
    listing.write_text("sha256,category,severity,note\n"
                       f"{values[0]},ncii,high,first\n"
                       "nothex,ncii,high,bad row\n"
                       f"{values[1]},,low,no category\n"
                       f"{values[2]},csam,critical,third\n")
    page.get_by_label("File (UTF-8").set_input_files(str(listing))
    page.get_by_label("Default category").select_option("other")
    page.get_by_role("button", name="Import").click()
    page.wait_for_selector("#res")
    shot(page, "import")
    assert page.locator("#res").inner_text().startswith("Result: 3 created, 0 already flagged, 1 failed")
    page.goto(ui_server.url + f"/ui/flags?q={values[1]}")
    assert page.locator("#count").inner_text().startswith("1 flag")
    with page.expect_download() as dl:
        page.get_by_role("link", name="Export these as CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    assert [(r["sha256"], r["category"], r["severity"]) for r in rows] == [
        (values[1], "other", "low")]


def test_admin_pages(page, ui_server):
    sign_in(page, ui_server, "admin")
    page.goto(ui_server.url + "/ui/bases")
    assert page.get_by_text("demo-diffusion-base").is_visible()
    shot(page, "bases")
    page.goto(ui_server.url + "/ui/keys")
    page.get_by_label("Role").select_option("reader")
    page.get_by_label("Name").fill("platform-x")
    page.get_by_role("button", name="Create key").click()
    key = page.locator("code.secret").inner_text()
    assert key.startswith("mh_")
    shot(page, "keys")
    assert rest(ui_server, "admin", "GET", "/v1/keys").json()[-1]["name"] == "platform-x"
    page.goto(ui_server.url + "/ui/audit?action=flag.revoked")
    assert "flag.revoked" in page.locator("table").inner_text()
    shot(page, "audit")
    page.goto(ui_server.url + "/ui/")
    shot(page, "dashboard")  # again, now that checks have run


def test_api_docs_render_offline(page, ui_server):
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(
        ui_server.url) else route.continue_())
    page.goto(ui_server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info", timeout=20000)
    shot(page, "docs", full=False)
    page.goto(ui_server.url + "/redoc")
    page.wait_for_selector("h1", timeout=20000)
