"""Hugging Face: repo checks against a fake Hub on loopback, and the webhook receiver."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from modelhash import MirrorIndex, RepoEvent, WebhookReceiver, background_checker, hub_check
from modelhash._scan import fingerprint_exact
from modelhash.errors import HubError, HubNotFoundError, InputError
from tests.client.conftest import LiveRegistry, free_port
from tests.client.fakehub import FakeHub, RunningHub
from tests.fingerprint.conftest import tiny_state_dict


@pytest.fixture(scope="module")
def running_hub() -> Iterator[RunningHub]:
    hub = RunningHub()
    yield hub
    hub.close()


@pytest.fixture
def hub(running_hub: RunningHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    monkeypatch.setenv("HF_ENDPOINT", running_hub.hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    running_hub.hub.requests.clear()
    return running_hub.hub


def weights(seed: int, **metadata: str) -> bytes:
    return save(tiny_state_dict(seed), metadata=metadata or None)


def flagging(**hashes: str) -> MirrorIndex:
    index = MirrorIndex(synced_at=datetime.now(UTC), registry="test")
    index.load_export({"flags": [
        {"id": f"flag-{k}", "category": "ncii", "severity": "high", "status": "active",
         "fingerprints": {k if k != "content" else "content-blake3-v1": [v]}}
        for k, v in hashes.items()
    ]})
    return index


def content_of(data: bytes, tmp_path: Path) -> str:
    p = tmp_path / f"c-{hashlib.sha256(data).hexdigest()[:8]}.safetensors"
    p.write_bytes(data)
    (o,) = fingerprint_exact(p)
    assert o.fingerprint is not None
    return o.fingerprint.content.hex


def test_flagged_file_matches_from_metadata_without_download(hub: FakeHub) -> None:
    data = weights(21)
    repo = hub.add("bad/lora", {"lora.safetensors": data, "README.md": b"hi"})
    report = hub_check("bad/lora", flagging(sha256=hashlib.sha256(data).hexdigest()))
    assert report.step == "metadata" and report.revision == repo.sha
    (r,) = report.results
    assert r.verdict == "match" and r.path == f"bad/lora@{repo.sha}/lora.safetensors"
    assert hub.downloads() == []


def test_resaved_copy_is_caught_after_download_by_content(hub: FakeHub, tmp_path: Path) -> None:
    original, resaved = weights(22), weights(22, note="re-uploaded")
    assert original != resaved
    repo = hub.add("sneaky/copy", {"model.safetensors": resaved, "config.json": b"{}"})
    report = hub_check("sneaky/copy", flagging(content=content_of(original, tmp_path)))
    assert report.step == "files" and report.downloaded == ["model.safetensors"]
    (r,) = report.results
    assert r.verdict == "match" and r.matches[0].match == "content"
    assert r.path == f"sneaky/copy@{repo.sha}/model.safetensors"
    assert all("config.json" not in p for p in hub.downloads())
    cached = tmp_path / "hf-home" / "hub" / "models--sneaky--copy"
    assert cached.is_dir()


def test_sharded_repo_is_one_model_and_revisions_pin(hub: FakeHub) -> None:
    sd = tiny_state_dict(23)
    names = sorted(sd)
    shard1 = {k: sd[k] for k in names[:2]}
    shard2 = {k: sd[k] for k in names[2:]}
    index = {"metadata": {}, "weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in shard1},
        **{k: "model-00002-of-00002.safetensors" for k in shard2},
    }}
    repo = hub.add("org/sharded", {
        "model-00001-of-00002.safetensors": save(shard1),
        "model-00002-of-00002.safetensors": save(shard2),
        "model.safetensors.index.json": json.dumps(index).encode(),
    })
    report = hub_check(f"org/sharded@{repo.sha}", flagging())
    assert [r.path for r in report.results] == [f"org/sharded@{repo.sha}"]
    assert report.results[0].verdict == "clean" and report.results[0].fingerprint["content"]
    with pytest.raises(HubNotFoundError):
        hub_check("org/sharded@" + "0" * 40, flagging())
    with pytest.raises(HubNotFoundError):
        hub_check("org/absent", flagging())
    with pytest.raises(InputError):
        hub_check("not a/repo/id", flagging())


def test_no_download_checks_metadata_only(hub: FakeHub) -> None:
    hub.add("org/clean", {"a.safetensors": weights(24), "b.gguf": b"GGUF" + b"\0" * 20})
    report = hub_check("org/clean", flagging(), download=False)
    assert [r.verdict for r in report.results] == ["clean", "clean"]
    assert hub.downloads() == []


def test_offline_mode_reads_the_cache_only(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = weights(25)
    hub.add("org/cached", {"m.safetensors": data})
    assert hub_check("org/cached", flagging()).step == "files"
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flagged = flagging(content=content_of(data, tmp_path))
    report = hub_check("org/cached", flagged)
    assert report.step.startswith("files (offline") and report.results[0].verdict == "match"
    assert hub.requests == []
    with pytest.raises(HubNotFoundError, match="HF_HUB_OFFLINE"):
        hub_check("org/never-fetched", flagged)


def test_hub_down_is_a_service_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubError):
        hub_check("org/any", flagging())


def test_cli_against_the_real_registry(hub: FakeHub, live_registry: LiveRegistry, tmp_path: Path) -> None:
    data = weights(26)
    path = tmp_path / "flag-me.safetensors"
    path.write_bytes(data)
    assert live_registry.cli(live_registry.submitter)(
        "flag", path, "--category", "csam").exit_code == 0
    repo = hub.add("bad/upload", {"w.safetensors": data})
    hub.add("good/upload", {"w.safetensors": weights(27)})
    cli = live_registry.cli(live_registry.reader)
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
    out = cli("hf", "check", "bad/upload", "--json", **env)
    assert out.exit_code == 1, out.stderr
    body = json.loads(out.stdout)
    assert body["repo"] == "bad/upload" and body["revision"] == repo.sha
    assert body["checked_by"] == "metadata" and body["results"][0]["verdict"] == "match"
    out = cli("hf", "check", "good/upload", **env)
    assert out.exit_code == 0, out.stderr
    assert "clean  good/upload@" in out.stdout
    out = cli("hf", "check", "nobody/nothing", **env)
    assert out.exit_code == 2 and "not found" in out.stderr
    out = cli("hf", "check", "good/upload", **{**env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert out.exit_code == 3 and "Hub" in out.stderr


# The webhook receiver


def post(app: Any, body: bytes | str, secret: str | None = "s3cret", method: str = "POST") -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hook") as c:
            headers = {"X-Webhook-Secret": secret} if secret is not None else {}
            return await c.request(method, "/", content=body, headers=headers)

    return asyncio.run(run())


def hub_event(action: str = "update", kind: str = "model", scope: str = "repo.content") -> str:
    return json.dumps({
        "event": {"action": action, "scope": scope},
        "repo": {"type": kind, "name": "org/model", "id": "x", "headSha": "a" * 40},
        "webhook": {"id": "w", "version": 3},
    })


def test_webhook_checks_the_secret_and_the_payload() -> None:
    events: list[RepoEvent] = []
    app = WebhookReceiver("s3cret", events.append)
    assert post(app, hub_event(), secret=None).status_code == 401
    assert post(app, hub_event(), secret="s3cres").status_code == 401
    assert post(app, hub_event(), method="GET").status_code == 405
    assert post(app, "{not json").status_code == 400
    assert post(app, json.dumps({"event": {}})).status_code == 400
    assert post(app, "x" * (2 * 1024 * 1024)).status_code == 413
    r = post(app, hub_event(kind="dataset"))
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    assert post(app, hub_event(action="delete")).json()["status"] == "ignored"
    assert post(app, hub_event(scope="discussion")).json()["status"] == "ignored"
    assert events == []
    r = post(app, hub_event(action="create"))
    assert r.status_code == 200 and r.json() == {"status": "queued", "repo": "org/model",
                                                 "revision": "a" * 40}
    assert events == [RepoEvent("org/model", "create", "repo.content", "a" * 40)]


def test_webhook_runs_hub_checks_in_the_background(hub: FakeHub) -> None:
    data = weights(28)
    repo = hub.add("late/upload", {"x.safetensors": data})
    done = threading.Event()
    reports: list[Any] = []

    def on_report(event: RepoEvent, report: Any) -> None:
        reports.append(report)
        done.set()

    app = WebhookReceiver("s3cret", background_checker(
        flagging(sha256=hashlib.sha256(data).hexdigest()), on_report))
    body = json.dumps({"event": {"action": "update", "scope": "repo.content"},
                       "repo": {"type": "model", "name": "late/upload", "headSha": repo.sha}})
    assert post(app, body).status_code == 200
    assert done.wait(30)
    (report,) = reports
    assert report.revision == repo.sha and report.results[0].verdict == "match"


def test_large_lfs_files_need_no_download_for_the_exact_check(hub: FakeHub) -> None:
    big = save({"w": np.zeros((512, 1024), np.float32)})
    hub.add("org/big", {"big.safetensors": big})
    report = hub_check("org/big", flagging(sha256=hashlib.sha256(big).hexdigest()))
    assert report.results[0].verdict == "match" and hub.downloads() == []


def test_webhook_example_is_a_receiver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    monkeypatch.setenv("WEBHOOK_SECRET", "s3cret")
    monkeypatch.setenv("HUB_CHECK_QUEUE", str(tmp_path / "queue.sqlite3"))
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "hub_webhook.py"
    spec = importlib.util.spec_from_file_location("hub_webhook_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.app, WebhookReceiver)
    assert post(module.app, hub_event(kind="space")).json()["status"] == "ignored"
    assert (tmp_path / "queue.sqlite3").is_file()  # the durable queue
    module.checker.close()
    module.registry.close()


def test_webhook_answers_503_when_the_queue_cannot_take_the_event(tmp_path: Path) -> None:
    from modelhash import CheckQueue

    queue = CheckQueue(tmp_path / "q.sqlite3")
    checker = background_checker(flagging(), lambda e, r: None, queue=queue, workers=0)
    queue.close()  # the file is gone from under it: enqueueing fails
    app = WebhookReceiver("s3cret", checker)
    r = post(app, hub_event())
    assert r.status_code == 503 and "retry" in r.json()["error"]
    with pytest.raises(InputError):
        CheckQueue(tmp_path / "not-a-folder" / "q.sqlite3", max_attempts=0)
    (tmp_path / "garbage.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(InputError):
        CheckQueue(tmp_path / "garbage.sqlite3")
