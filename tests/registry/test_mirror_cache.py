"""The offline mirror refuses rollbacks, unsigned or forged feed pages, and edited caches.

Each test drives ``OfflineCache`` against the real app (in process), through an
HTTP transport that can replay or alter what the registry answered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelhash._cache import OfflineCache
from modelhash._client import RegistryClient
from modelhash.errors import MirrorError
from tests.utils.registry import auth, flag_body, random_fingerprint

Rewrite = Callable[[str, bytes], bytes | None]


def registry_client(client, key: str, rewrite: Rewrite | None = None) -> RegistryClient:
    """A RegistryClient whose requests the in-process app answers, optionally rewritten."""

    def handle(request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode("ascii")
        r = client.request(request.method, path, headers=dict(request.headers),
                           content=request.content)
        body = r.content
        if rewrite is not None:
            body = rewrite(request.url.path, body) or body
        return httpx.Response(r.status_code, headers={"content-type": "application/json"},
                              content=body)

    return RegistryClient("http://registry.test", api_key=key,
                          transport=httpx.MockTransport(handle))


def flag(client, keys) -> dict[str, Any]:
    fp = random_fingerprint()
    r = client.post("/v1/flags", json=flag_body(fp), headers=auth(keys["submitter"]))
    assert r.status_code == 201
    return {**fp, "id": r.json()["id"]}


def status_of(cache: OfflineCache, sha: str) -> str | None:
    (result,) = cache.load().check([{"sha256": sha}])
    return result.matches[0].status if result.matches else None


def test_a_replayed_older_export_is_refused(client, keys, tmp_path: Path):
    first = flag(client, keys)
    old_export = client.get("/v1/export", headers=auth(keys["reader"])).content
    cache = OfflineCache(tmp_path / "mirror")
    with registry_client(client, keys["reader"]) as rc:
        cache.sync(rc, full=True)
    client.post(f"/v1/flags/{first['id']}/revoke", json={"reason": "r"},
                headers=auth(keys["admin"]))
    second = flag(client, keys)
    with registry_client(client, keys["reader"]) as rc:
        cache.sync(rc)
    assert status_of(cache, first["sha256"]) == "revoked"
    assert status_of(cache, second["sha256"]) == "active"

    def replay(path: str, body: bytes) -> bytes | None:
        return old_export if path == "/v1/export" else None

    with registry_client(client, keys["reader"], replay) as rc, pytest.raises(
        MirrorError, match="older"
    ):
        cache.sync(rc, full=True)
    # The cache is left as it was.
    assert status_of(cache, first["sha256"]) == "revoked"
    assert status_of(cache, second["sha256"]) == "active"


def _page(body: bytes) -> dict[str, Any]:
    return json.loads(body)


def test_forged_or_unsigned_feed_entries_are_never_applied(client, keys, tmp_path: Path):
    target = flag(client, keys)
    cache = OfflineCache(tmp_path / "mirror")
    with registry_client(client, keys["reader"]) as rc:
        cache.sync(rc, full=True)
    real_cursor = json.loads(cache.path.read_text())["cursor"]
    huge = {"cursor": 2**31 - 1, "at": "2030-01-01T00:00:00Z", "kind": "flag.status",
            "flag_id": target["id"], "data": {"status": "revoked"}}

    def inject_unsigned(path: str, body: bytes) -> bytes | None:
        if path != "/v1/changes":
            return None
        page = _page(body)
        page["changes"].append(huge)
        page["next_cursor"] = huge["cursor"]
        return json.dumps(page).encode()

    with registry_client(client, keys["reader"], inject_unsigned) as rc:
        cache.sync(rc)
    # Only the signed payload is applied: no fake revocation, no poisoned cursor.
    assert status_of(cache, target["sha256"]) == "active"
    assert json.loads(cache.path.read_text())["cursor"] == real_cursor

    def forge_signed(path: str, body: bytes) -> bytes | None:
        if path != "/v1/changes":
            return None
        page = _page(body)
        payload = json.loads(page["signed"]["payload"])
        payload["changes"].append(huge)
        payload["next_cursor"] = huge["cursor"]
        page["signed"]["payload"] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return json.dumps(page).encode()

    with registry_client(client, keys["reader"], forge_signed) as rc, pytest.raises(
        MirrorError, match="change-feed page"
    ):
        cache.sync(rc)

    def unsigned(path: str, body: bytes) -> bytes | None:
        if path != "/v1/changes":
            return None
        page = _page(body)
        page["signed"] = None
        return json.dumps(page).encode()

    with registry_client(client, keys["reader"], unsigned) as rc, pytest.raises(
        MirrorError, match="unsigned"
    ):
        cache.sync(rc)
    assert status_of(cache, target["sha256"]) == "active"


def _synced(client, keys, tmp_path: Path) -> tuple[OfflineCache, dict[str, Any]]:
    target = flag(client, keys)
    cache = OfflineCache(tmp_path / "mirror")
    with registry_client(client, keys["reader"]) as rc:
        cache.sync(rc, full=True)
    flag(client, keys)  # so that the cache holds a page with a change
    with registry_client(client, keys["reader"]) as rc:
        cache.sync(rc)
    assert status_of(cache, target["sha256"]) == "active"
    return cache, target


def _edit(cache: OfflineCache, change: Callable[[dict[str, Any]], None]) -> None:
    state = json.loads(cache.path.read_text())
    change(state)
    cache.path.write_text(json.dumps(state))


def _fake_revocation(target: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        page = state["pages"][-1]
        payload = json.loads(page["payload"])
        payload["changes"].append({"cursor": payload["next_cursor"] + 1, "at": "2030-01-01",
                                   "kind": "flag.status", "flag_id": target["id"],
                                   "data": {"status": "revoked"}})
        payload["next_cursor"] += 1
        page["payload"] = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        state["cursor"] = payload["next_cursor"]
    return edit


def _fake_page(state: dict[str, Any]) -> None:
    state["pages"].append(dict(state["pages"][0]))


def _later(state: dict[str, Any]) -> None:
    state["synced_at"] = "2099-01-01T00:00:00+00:00"


def _cursor(state: dict[str, Any]) -> None:
    state["cursor"] += 1000


def _drop_pages(state: dict[str, Any]) -> None:
    state["pages"] = []


@pytest.mark.parametrize("edit", ["revocation", "page", "synced_at", "cursor", "dropped"])
def test_any_edit_of_the_cache_is_refused_on_load(client, keys, tmp_path: Path, edit: str):
    cache, target = _synced(client, keys, tmp_path)
    change = {
        "revocation": _fake_revocation(target),
        "page": _fake_page,
        "synced_at": _later,
        "cursor": _cursor,
        "dropped": _drop_pages,
    }[edit]
    _edit(cache, change)
    with pytest.raises(MirrorError):
        cache.load()


def test_freshness_is_the_registrys_signed_time(client, keys, tmp_path: Path):
    cache, _ = _synced(client, keys, tmp_path)
    cache.load(max_age=timedelta(minutes=5))
    time.sleep(1.1)
    with pytest.raises(MirrorError, match="signed time"):
        cache.load(max_age=timedelta(seconds=1))


def test_mirrors_follow_an_endorsed_key_rotation_only(db_url, keys, tmp_path: Path):
    from fastapi.testclient import TestClient

    from modelhash.registry._settings import Settings
    from modelhash.registry._signing import write_key_file
    from modelhash.registry.app import create_app

    old, new, rogue = (tmp_path / f"{n}.pem" for n in ("old", "new", "rogue"))
    for path in (old, new, rogue):
        write_key_file(path)
    before = TestClient(create_app(Settings(database_url=db_url, signing_key_file=old)))
    target = flag(before, keys)
    cache = OfflineCache(tmp_path / "mirror")
    with registry_client(before, keys["reader"]) as rc:
        first = cache.sync(rc, full=True)
    rotating = TestClient(create_app(Settings(
        database_url=db_url, signing_key_file=new, previous_signing_key_file=old)))
    with registry_client(rotating, keys["reader"]) as rc:
        report = cache.sync(rc)
    assert report.key_id != first.key_id and report.full
    assert status_of(cache, target["sha256"]) == "active"
    rogue_app = TestClient(create_app(Settings(database_url=db_url, signing_key_file=rogue)))
    with registry_client(rogue_app, keys["reader"]) as rc, pytest.raises(
        MirrorError, match="signed by key"
    ):
        cache.sync(rc)
    assert cache.load().flags  # still the verified list under the new key


@pytest.mark.parametrize("edit", ["revocation", "synced_at"])
def test_the_cli_exits_3_on_an_edited_cache(client, keys, tmp_path: Path, edit: str):
    import numpy as np
    from click.testing import CliRunner
    from safetensors.numpy import save_file

    from modelhash._cli import cli as app

    cache, target = _synced(client, keys, tmp_path)
    model = tmp_path / "model.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(model))
    args = ["check", "--offline", "--cache", str(cache.directory), str(model)]
    assert CliRunner().invoke(app, args).exit_code == 0
    _edit(cache, _fake_revocation(target) if edit == "revocation" else _later)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output


def test_a_cache_of_an_older_format_is_replaced_by_a_full_sync(client, keys, tmp_path: Path):
    cache, target = _synced(client, keys, tmp_path)
    _edit(cache, lambda state: state.update(format="modelhash-mirror-v1"))
    with pytest.raises(MirrorError, match="sync --full"):
        cache.load()
    with registry_client(client, keys["reader"]) as rc, pytest.raises(MirrorError):
        cache.sync(rc)
    with registry_client(client, keys["reader"]) as rc:
        assert cache.sync(rc, full=True).full
    assert status_of(cache, target["sha256"]) == "active"
