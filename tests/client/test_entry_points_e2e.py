"""Every entry point catches derivatives, against the real registry process.

One flagged fine-tune and one flagged LoRA (diffusers/PEFT form); their fp16 cast,
50/50 merge, kohya conversion and baked form must come back ``match`` through the
upload hook (streamed in small chunks of random size, as safetensors and as a
PyTorch zip), ``hub_check`` against the fake Hub, the webhook's durable queue and
the SDK's ``check_paths``; the same derivatives of an unflagged sibling must come
back clean.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from modelhash import (
    AsyncRegistryClient,
    CheckQueue,
    RegistryClient,
    WebhookReceiver,
    background_checker,
    check_paths,
    hub_check,
    scan_upload,
    scan_upload_async,
)
from tests.client.conftest import LiveRegistry
from tests.client.fakehub import FakeHub, Repo, RunningHub
from tests.fixtures.torch_pickles import dct, pickled, tensor, text, torch_zip
from tests.utils.sketch_models import MODULES, base_model, cast, plus, random_delta

StateDict = dict[str, np.ndarray]
RANK, ALPHA = 4, 8.0


def peft_lora(base: StateDict, seed: int) -> tuple[StateDict, dict[str, str], StateDict]:
    """A diffusers-style PEFT LoRA (alpha != rank, given in metadata), and its delta."""
    rng = np.random.default_rng(seed)
    sd: StateDict = {}
    delta: StateDict = {}
    for m in [m for m in MODULES if "attn1" in m]:
        out, inp = MODULES[m]
        up, down = rng.standard_normal((out, RANK)), rng.standard_normal((RANK, inp))
        eff = ALPHA / RANK * up @ down
        up *= np.linalg.norm(base[f"{m}.weight"]) * 0.03 / np.linalg.norm(eff)
        sd[f"{m}.lora_A.weight"] = down.astype(np.float32)
        sd[f"{m}.lora_B.weight"] = up.astype(np.float32)
        delta[f"{m}.weight"] = (ALPHA / RANK * up @ down).astype(np.float32)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": ALPHA})}
    return sd, meta, delta


def to_kohya(peft: StateDict) -> StateDict:
    """What kohya's converter writes: scale folded into up, alpha = rank, fp16."""
    out: StateDict = {}
    for k, v in peft.items():
        if not k.endswith(".lora_A.weight"):
            continue
        m = k.removesuffix(".lora_A.weight")
        stem = "lora_unet_" + m.removeprefix("unet.").replace(".", "_")
        up = peft[f"{m}.lora_B.weight"] * (ALPHA / RANK)
        out[f"{stem}.lora_down.weight"] = v.astype(np.float16)
        out[f"{stem}.lora_up.weight"] = up.astype(np.float16)
        out[f"{stem}.alpha"] = np.array(RANK, dtype=np.float32)
    return out


_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage"}


def torch_zip_bytes(sd: StateDict, folder: Path, name: str) -> bytes:
    """``torch.save(sd)`` as torch writes it, made without torch."""
    pairs = []
    storages: dict[str, bytes] = {}
    for i, (k, v) in enumerate(sd.items()):
        key = str(i)
        storages[key] = np.ascontiguousarray(v).tobytes()
        pairs.append((text(k), tensor(key, v.shape, storage_type=_STORAGE[v.dtype])))
    path = torch_zip(folder / f"{name}.pt", pickled(dct(*pairs)), storages)
    return path.read_bytes()


def random_chunks(data: bytes, seed: int, most: int = 5000) -> Iterator[bytes]:
    """``data`` in chunks of random sizes between 1 and ``most`` bytes."""
    rng = np.random.default_rng(seed)
    i = 0
    while i < len(data):
        n = int(rng.integers(1, most))
        yield data[i : i + n]
        i += n


@dataclass
class World:
    registry: LiveRegistry
    folder: Path
    safetensors: dict[str, bytes]
    torch: dict[str, bytes]
    flagged: dict[str, bytes]


DERIVED = ("f16", "merge", "kohya", "baked")
INNOCENT = ("g16", "merge_gh", "kohya_other", "baked_other", "base")


@pytest.fixture(scope="module")
def world(live_registry: LiveRegistry, tmp_path_factory: pytest.TempPathFactory) -> World:
    folder = tmp_path_factory.mktemp("entry-points")
    b = base_model(3000)
    df, dg, dh = (random_delta(b, s) for s in (3001, 3002, 3003))
    lora_sd, lora_meta, ldelta = peft_lora(b, 3004)
    other_sd, _, odelta = peft_lora(b, 3005)
    models: dict[str, StateDict] = {
        "f16": cast(plus(b, (1.0, df))),
        "merge": plus(b, (0.5, df), (0.5, dg)),
        "kohya": to_kohya(lora_sd),
        "baked": plus(b, (1.0, ldelta)),
        "g16": cast(plus(b, (1.0, dg))),
        "merge_gh": plus(b, (0.5, dg), (0.5, dh)),
        "kohya_other": to_kohya(other_sd),
        "baked_other": plus(b, (1.0, odelta)),
        "base": b,
    }
    flagged = {"f": save(plus(b, (1.0, df))), "lora": save(lora_sd, metadata=lora_meta)}
    admin = live_registry.cli(live_registry.admin)
    submitter = live_registry.cli(live_registry.submitter)
    base_path = folder / "base.safetensors"
    base_path.write_bytes(save(b))
    out = admin("bases", "add", base_path, "--name", f"entry-base-{uuid.uuid4().hex[:6]}")
    assert out.exit_code == 0, out.stderr
    for name, data in flagged.items():
        p = folder / f"flagged-{name}.safetensors"
        p.write_bytes(data)
        out = submitter("flag", p, "--category", "other", "--json")
        assert out.exit_code == 0, out.stderr
    return World(
        live_registry,
        folder,
        {k: save(v) for k, v in models.items()},
        {k: torch_zip_bytes(v, folder, k) for k, v in models.items()},
        flagged,
    )


def reader(world: World) -> RegistryClient:
    return RegistryClient(world.registry.url, api_key=world.registry.reader)


@pytest.mark.parametrize("container", ["safetensors", "torch"])
def test_upload_hook_catches_every_derivative(world: World, container: str) -> None:
    bodies = world.safetensors if container == "safetensors" else world.torch
    suffix = ".safetensors" if container == "safetensors" else ".pt"
    with reader(world) as client:
        for i, (name, data) in enumerate(sorted(bodies.items())):
            v = scan_upload(random_chunks(data, seed=i), name=name + suffix, checker=client)
            want = "match" if name in DERIVED else "clean"
            assert v.verdict == want, (name, v.reason, v.error)
            assert v.allow == (want == "clean") and v.layers == "all"
            assert v.fingerprint is not None and v.fingerprint.sketch is not None
            assert v.to_json()["layers"] == "all"


def test_exact_only_is_explicit_and_labelled(world: World) -> None:
    with reader(world) as client:
        v = scan_upload(random_chunks(world.safetensors["f16"], 1), name="f16.safetensors",
                        checker=client, layers="exact")
    assert (v.verdict, v.layers) == ("clean", "exact")
    assert "exact layers only" in v.reason
    assert v.fingerprint is not None and v.fingerprint.sketch is None


def test_async_upload_hook_catches_derivatives(world: World) -> None:
    async def body(data: bytes, seed: int) -> AsyncIterator[bytes]:
        for piece in random_chunks(data, seed, most=3000):
            await asyncio.sleep(0)
            yield piece

    async def run() -> dict[str, str]:
        out = {}
        with reader(world) as client:
            for i, name in enumerate(("merge", "baked", "g16", "kohya_other")):
                v = await scan_upload_async(body(world.safetensors[name], i), name=name,
                                            checker=client)
                out[name] = v.verdict
        return out

    assert asyncio.run(run()) == {
        "merge": "match", "baked": "match", "g16": "clean", "kohya_other": "clean",
    }


def test_check_paths_and_client_method_default_to_every_layer(world: World, tmp_path: Path) -> None:
    paths = []
    for name in ("f16", "kohya", "g16"):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(world.safetensors[name])
        paths.append(p)
    with reader(world) as client:
        results = check_paths(paths, client)
        assert [r.verdict for r in results] == ["match", "match", "clean"]
        assert {r.layers for r in results} == {"all"}
        assert [r.verdict for r in client.check_paths(paths)] == ["match", "match", "clean"]
        exact = client.check_paths(paths, layers="exact")
    assert [(r.verdict, r.layers) for r in exact] == [("clean", "exact")] * 3

    async def via_async() -> list[tuple[str, str]]:
        async with AsyncRegistryClient(world.registry.url, api_key=world.registry.reader) as c:
            return [(r.verdict, r.layers) for r in await c.check_paths(paths)]

    assert asyncio.run(via_async()) == [("match", "all"), ("match", "all"), ("clean", "all")]
    # check --recursive walks the folder and checks every layer by default.
    out = world.registry.cli(world.registry.reader)("check", "--recursive", "--json", tmp_path)
    assert out.exit_code == 1, out.stderr
    answer = json.loads(out.stdout)
    got = {Path(r["path"]).name: (r["verdict"], r["layers"]) for r in answer["results"]}
    assert got == {"f16.safetensors": ("match", "all"), "kohya.safetensors": ("match", "all"),
                   "g16.safetensors": ("clean", "all")}
    assert answer["layers"] == "all" and "note" not in answer


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
    for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    running_hub.hub.requests.clear()
    return running_hub.hub


def _repos(world: World, hub: FakeHub, tag: str) -> dict[str, str]:
    out = {}
    for name in (*DERIVED, *INNOCENT):
        fname = "model.safetensors" if name != "merge" else "merge.pt"
        data = world.safetensors[name] if name != "merge" else world.torch[name]
        repo_id = f"{tag}/{name.replace('_', '-')}"
        hub.add(repo_id, {fname: data, "README.md": b"a model"})
        out[name] = repo_id
    return out


def test_hub_check_downloads_and_fully_checks_after_clean_metadata(
    world: World, hub: FakeHub
) -> None:
    repos = _repos(world, hub, f"hf{uuid.uuid4().hex[:6]}")
    with reader(world) as client:
        for name, repo_id in repos.items():
            report = hub_check(repo_id, client)
            (r,) = report.results
            want = "match" if name in DERIVED else "clean"
            assert r.verdict == want, (name, r)
            assert report.step == "files" and report.layers == "all" and r.layers == "all"
            assert report.to_json()["layers"] == "all" and report.note == ""
        # A flagged file's own bytes: caught by the Hub's sha256, nothing downloaded.
        hub.requests.clear()
        hub.add("flagged/exact", {"model.safetensors": world.flagged["f"]})
        report = hub_check("flagged/exact", client)
    assert report.results[0].verdict == "match" and hub.downloads() == []
    assert report.step == "metadata" and report.layers == "exact"
    assert report.note.startswith("metadata only")
    assert report.to_json()["note"] == report.note
    # The command says the same, in both forms.
    cli = world.registry.cli(world.registry.reader)
    out = cli("hf", "check", "flagged/exact", "--json")
    assert out.exit_code == 1, out.stderr
    answer = json.loads(out.stdout)
    assert (answer["checked_by"], answer["layers"]) == ("metadata", "exact")
    assert answer["note"].startswith("metadata only")
    out = cli("hf", "check", "flagged/exact")
    assert "(checked by metadata, exact layers)" in out.stdout
    assert "note: metadata only" in out.stdout
    out = cli("hf", "check", repos["baked"], "--json")
    assert out.exit_code == 1, out.stderr
    answer = json.loads(out.stdout)
    assert (answer["checked_by"], answer["layers"]) == ("files", "all")
    assert answer["results"][0]["matches"][0]["match"] == "lora-baked"


def _post(app: WebhookReceiver, repo_id: str, sha: str) -> httpx.Response:
    body = json.dumps({"event": {"action": "update", "scope": "repo.content"},
                       "repo": {"type": "model", "name": repo_id, "headSha": sha}})

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://hook") as c:
            return await c.post("/", content=body, headers={"X-Webhook-Secret": "s3cret"})

    return asyncio.run(go())


def test_webhook_queue_checks_every_layer_survives_restart_and_retries(
    world: World, hub: FakeHub, tmp_path: Path
) -> None:
    tag = f"wh{uuid.uuid4().hex[:6]}"
    repos = _repos(world, hub, tag)
    reports: dict[str, Any] = {}
    lock = threading.Lock()

    def on_report(event: Any, report: Any) -> None:
        with lock:
            reports[event.repo_id] = report

    queue_file = tmp_path / "queue.sqlite3"
    with reader(world) as client:
        # Events arrive while no worker can run them (the process then "restarts").
        stalled = CheckQueue(queue_file, base_delay=0.2)
        app = WebhookReceiver("s3cret", background_checker(client, on_report, queue=stalled,
                                                           workers=0))
        for repo_id in repos.values():
            assert _post(app, repo_id, hub.repos[repo_id].sha).status_code == 200
        # Announced before the Hub serves it: fetching fails, and is retried with backoff.
        late = f"{tag}/late"
        late_files = {"model.safetensors": world.safetensors["baked"]}
        assert _post(app, late, Repo(late_files).sha).status_code == 200
        assert stalled.counts() == {"pending": len(repos) + 1}
        stalled.close()
        assert reports == {}

        resumed = background_checker(client, on_report, workers=2,
                                     queue=CheckQueue(queue_file, base_delay=0.2))
        try:
            assert resumed.wait_idle(120)
            assert resumed.queue.counts().get("pending") == 1  # the late repo, backing off
            assert late not in reports
            hub.add(late, late_files)
            deadline = time.monotonic() + 120
            while late not in reports and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            resumed.close()
    for name, repo_id in repos.items():
        report = reports[repo_id]
        want = "match" if name in DERIVED else "clean"
        assert report.results[0].verdict == want, (name, report)
        assert report.layers == "all"
    assert reports[late].results[0].verdict == "match"
    counts = CheckQueue(queue_file).counts()
    assert counts.get("pending", 0) == 0 and counts.get("running", 0) == 0
