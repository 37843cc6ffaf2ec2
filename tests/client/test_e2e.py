"""End to end: the CLI and the SDK against the real registry, started by the tests."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from modelhash import AsyncRegistryClient, RegistryClient, Retry
from modelhash.fingerprint import fingerprint_file
from modelhash.wire import MAX_CHECK_ITEMS
from tests.client.conftest import MODELHASH, LiveRegistry, clean_env, free_port
from tests.fixtures.torch_pickles import call, glob, pickled, text, torch_zip, tup

MakeModel = Callable[..., Path]


def evil_pickle(path: Path) -> Path:
    """A zip checkpoint whose pickle would run a shell command; unique bytes each time."""
    body = call(glob("os", "system"), tup(text("echo pwned " + secrets.token_hex(8))))
    return torch_zip(path, pickled(body), {})


def one_line_errors(stderr: str) -> list[str]:
    lines = stderr.strip().splitlines()
    assert all(line.startswith("modelhash: ") for line in lines), lines
    assert "Traceback" not in stderr
    return lines


def test_check_flag_lookup_dispute_revoke(
    live_registry: LiveRegistry, make_model: MakeModel, tmp_path: Path
) -> None:
    reader = live_registry.cli(live_registry.reader)
    submitter = live_registry.cli(live_registry.submitter)
    admin = live_registry.cli(live_registry.admin)
    a, b = make_model(), make_model()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b.read_bytes()[:-5])
    missing = tmp_path / "missing.safetensors"

    out = reader("check", "--json", a, broken, b, missing)
    assert out.exit_code == 2, out.stderr
    assert len(one_line_errors(out.stderr)) == 2
    results = json.loads(out.stdout)["results"]
    assert [r["path"] for r in results] == [str(a), str(broken), str(b), str(missing)]
    assert [r["verdict"] for r in results] == ["clean", "error", "clean", "error"]
    error = results[1]["error"]
    assert error["kind"] == "malformed" and "broken.safetensors" in error["message"]
    assert error["path"] == str(broken)
    assert results[1]["fingerprint"]["sha256"]
    assert results[3]["fingerprint"] == {}
    assert set(results[0]) == {"path", "verdict", "fingerprint", "matches", "error", "layers"}
    assert results[0]["layers"] == "all"

    out = submitter("flag", a, "--category", "csam", "--severity", "critical", "--json")
    assert out.exit_code == 0, out.stderr
    flag = json.loads(out.stdout)
    assert flag["status"] == "active" and flag["category"] == "csam"
    flag_id = flag["id"]

    out = reader("check", "--json", a, broken, b)
    assert out.exit_code == 1, out.stderr
    results = json.loads(out.stdout)["results"]
    assert [r["verdict"] for r in results] == ["match", "error", "clean"]
    (m,) = results[0]["matches"]
    assert m["flag_id"] == flag_id and m["status"] == "active" and m["score"] == 1.0
    assert m["match"] in ("exact", "content") and m["evidence"]["layer"] in ("file", "content")

    sha = fingerprint_file(a).files[0].sha256
    out = reader("lookup", sha.upper())
    assert out.exit_code == 1, out.stderr  # flagged, as check exits
    assert "FLAGGED" in out.stdout and flag_id in out.stdout
    out = reader("lookup", f"autov2:{sha[:10]}", "--json")
    assert out.exit_code == 0  # a weak hit may be a chance collision
    weak = json.loads(out.stdout)
    assert weak["results"][0]["strength"] == "weak" and weak["results"][0]["ambiguous"]
    unflagged = secrets.token_hex(32)
    out = reader("lookup", "--json", "-", input=f"{unflagged}\n# comment\n\nsha256:{sha}\n")
    assert out.exit_code == 1, out.stderr
    both = json.loads(out.stdout)
    assert both["flagged"] is True
    assert [x["hash"] for x in both["lookups"]] == [unflagged, f"sha256:{sha}"]
    assert [x["flagged"] for x in both["lookups"]] == [False, True]
    out = reader("lookup", unflagged, secrets.token_hex(32))
    assert out.exit_code == 0 and "FLAGGED" not in out.stdout
    out = reader("lookup", "not-a-hash")
    assert out.exit_code == 2 and len(one_line_errors(out.stderr)) == 1

    out = submitter("dispute", flag_id, "--reason", "looks like the base model", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "disputed"
    assert reader("check", a).exit_code == 1  # a disputed flag still matches

    out = submitter("revoke", flag_id, "--reason", "no")
    assert out.exit_code == 3 and "403" in out.stderr
    out = admin("revoke", flag_id, "--reason", "confirmed false positive")
    assert out.exit_code == 0 and "revoked" in out.stdout
    out = reader("check", "--json", a)
    assert out.exit_code == 0
    (r,) = json.loads(out.stdout)["results"]
    assert r["verdict"] == "clean" and r["matches"][0]["status"] == "revoked"
    out = admin("revoke", flag_id, "--reason", "again")
    assert out.exit_code == 3 and "409" in out.stderr


def test_hostile_file_is_an_error_yet_still_matches_by_its_bytes(
    live_registry: LiveRegistry, tmp_path: Path
) -> None:
    evil = evil_pickle(tmp_path / "evil.pt")
    out = live_registry.cli(live_registry.submitter)("flag", evil, "--category", "other")
    assert out.exit_code == 0, out.stderr
    assert "unsafe pickle" in out.stderr and "exact file hashes only" in out.stderr
    out = live_registry.cli(live_registry.reader)("check", "--json", evil)
    assert out.exit_code == 1
    (r,) = json.loads(out.stdout)["results"]
    assert r["verdict"] == "match" and "os.system" in r["error"]["message"]
    assert r["error"]["kind"] == "unsafe" and r["error"]["globals"] == ["os.system"]


def test_bad_key_and_unreachable_registry_exit_three(
    live_registry: LiveRegistry, make_model: MakeModel
) -> None:
    model = make_model()
    out = live_registry.cli("mh_not_a_key")("check", "--json", model)
    assert out.exit_code == 3
    # With --json the one error shape is on stdout too, and no results.
    error = json.loads(out.stdout)["error"]
    assert error["kind"] == "unauthorized" and error["status"] == 401
    (line,) = one_line_errors(out.stderr)
    assert "401" in line and "mh_not_a_key" not in line and "MODELHASH_API_KEY" in line
    out = live_registry.cli()("check", model)
    assert out.exit_code == 3 and "missing API key" in out.stderr and out.stdout == ""
    down = f"http://127.0.0.1:{free_port()}"
    out = live_registry.cli(live_registry.reader)("check", model, "--registry", down)
    assert out.exit_code == 3
    (line,) = one_line_errors(out.stderr)
    assert "unreachable" in line


def test_sync_and_offline_check(
    live_registry: LiveRegistry, make_model: MakeModel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    reader = live_registry.cli(live_registry.reader)
    submitter = live_registry.cli(live_registry.submitter)
    first, second, clean = make_model(), make_model(), make_model()
    assert submitter("flag", first, "--category", "ncii").exit_code == 0

    out = reader("check", "--offline", "--cache", cache, first)
    assert out.exit_code == 3 and "modelhash sync" in out.stderr

    out = reader("sync", "--cache", cache, "--json")
    assert out.exit_code == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["pinned_now"] and report["full"] and report["flags"] >= 1
    assert "pinned" in out.stderr and report["key_id"] in out.stderr

    out = reader("check", "--offline", "--cache", cache, "--json", first, clean)
    assert out.exit_code == 1, out.stderr
    answer = json.loads(out.stdout)
    assert [r["verdict"] for r in answer["results"]] == ["match", "clean"]
    # Offline says plainly that only exact layers were matched.
    assert answer["layers"] == "exact" and "exact layers only" in answer["note"]
    assert {r["layers"] for r in answer["results"]} == {"exact"}
    out = reader("check", "--offline", "--cache", cache, clean)
    assert out.exit_code == 0, out.stderr
    assert f"clean  {clean} (exact layers only)" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("note: offline: matched exact layers")

    assert submitter("flag", second, "--category", "csam").exit_code == 0
    assert reader("check", "--offline", "--cache", cache, second).exit_code == 0
    out = reader("sync", "--cache", cache, "--json")
    assert out.exit_code == 0 and not json.loads(out.stdout)["full"]
    assert json.loads(out.stdout)["changes"] >= 1
    assert reader("check", "--offline", "--cache", cache, second).exit_code == 1

    # The same verdicts online and offline, offline with no registry at all.
    online = json.loads(reader("check", "--json", first, second, clean).stdout)
    offline = json.loads(
        live_registry.cli()("check", "--offline", "--cache", cache, "--json",
                            first, second, clean, "--registry", "http://127.0.0.1:1").stdout
    )
    assert [r["verdict"] for r in online["results"]] == [r["verdict"] for r in offline["results"]]
    assert online["layers"] == "all" and "note" not in online


def test_tampered_or_foreign_exports_are_refused(
    live_registry: LiveRegistry, make_model: MakeModel, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    cache = tmp_path / "cache"
    reader = live_registry.cli(live_registry.reader)
    flagged = make_model()
    assert live_registry.cli(live_registry.submitter)(
        "flag", flagged, "--category", "csam"
    ).exit_code == 0
    assert reader("sync", "--cache", cache).exit_code == 0
    assert reader("check", "--offline", "--cache", cache, flagged).exit_code == 1

    # Edit the stored export: revoke the flag in the signed payload.
    mirror = cache / "mirror.json"
    state = json.loads(mirror.read_text())
    state["export"]["payload"] = state["export"]["payload"].replace('"active"', '"revoked"')
    mirror.write_text(json.dumps(state))
    out = reader("check", "--offline", "--cache", cache, flagged)
    assert out.exit_code == 3
    (line,) = one_line_errors(out.stderr)
    assert "fails verification" in line

    # A key the registry did not sign with: refused, and the cache is left alone.
    other = tmp_path / "other.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    before = mirror.read_bytes()
    out = reader("sync", "--cache", cache, "--full", "--public-key", other)
    assert out.exit_code == 3 and "refused the export" in out.stderr
    assert mirror.read_bytes() == before

    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    out = reader("sync", "--cache", tmp_path / "fresh", "--public-key", junk)
    assert out.exit_code == 2 and "--public-key" in out.stderr


def test_sdk_checks_in_batches_in_order(live_registry: LiveRegistry, make_model: MakeModel) -> None:
    flagged = fingerprint_file(make_model())
    with RegistryClient(live_registry.url, api_key=live_registry.submitter) as client:
        flag = client.flag(flagged, category="csam", note="sdk test")
        again = client.flag(flagged, category="csam")
        assert again.id == flag.id
        items = [{"sha256": secrets.token_hex(32)} for _ in range(MAX_CHECK_ITEMS * 2 + 5)]
        at = MAX_CHECK_ITEMS + 7
        items[at] = flagged.summary()
        results = client.check(items)
        assert [r.index for r in results] == list(range(len(items)))
        assert [i for i, r in enumerate(results) if r.verdict == "match"] == [at]
        decisions = client.screen([flagged, {"sha256": "0" * 64}])
        assert [d.allow for d in decisions] == [False, True]
        assert client.get_flag(flag.id).note == "sdk test"

    async def run() -> list[str]:
        async with AsyncRegistryClient(live_registry.url, api_key=live_registry.reader) as aclient:
            got = await aclient.check([flagged, {"blake3": "1" * 64}])
            found = await aclient.lookup_hash(flagged.files[0].sha256)
            assert found[0].flagged
            return [r.verdict for r in got]

    assert asyncio.run(run()) == ["match", "clean"]

    down = RegistryClient(f"http://127.0.0.1:{free_port()}", api_key="x",
                          retry=Retry(attempts=2, backoff=0.01))
    with down:
        (d,) = down.screen([flagged], unreachable="fail-open")
        assert d.verdict == "unchecked" and d.allow and d.recheck
        (d,) = down.screen([flagged])
        assert d.verdict == "unchecked" and not d.allow


def test_real_command_line(live_registry: LiveRegistry, make_model: MakeModel, tmp_path: Path) -> None:
    """The installed script, in its own process: exit codes and one line per error."""
    model = make_model()
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    env = clean_env(MODELHASH_REGISTRY=live_registry.url, MODELHASH_API_KEY=live_registry.reader)
    out = subprocess.run([*MODELHASH, "check", "--json", str(model), str(bad)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert len(one_line_errors(out.stderr)) == 1
    assert [r["verdict"] for r in json.loads(out.stdout)["results"]] == ["clean", "error"]


@pytest.mark.parametrize("workers", ["1", "3"])
def test_recursive_scan_keeps_a_deterministic_order(
    live_registry: LiveRegistry, make_model: MakeModel, tmp_path: Path, workers: str
) -> None:
    root = tmp_path / "uploads"
    paths = [
        make_model(f"uploads/{name}") for name in (
            "b.safetensors", "a.safetensors", "sub/z.safetensors", "sub/deeper/c.safetensors",
        )
    ]
    (root / "sub" / "readme.txt").write_text("not a model")
    (root / "sub" / "broken.pt").write_bytes(b"PK\x03\x04 broken")
    flagged = paths[2]
    assert live_registry.cli(live_registry.submitter)(
        "flag", flagged, "--category", "other"
    ).exit_code == 0
    out = live_registry.cli(live_registry.reader)(
        "check", "--json", "--recursive", "--workers", workers, root
    )
    assert out.exit_code == 1, out.stderr
    results = json.loads(out.stdout)["results"]
    assert [Path(r["path"]).relative_to(root).as_posix() for r in results] == [
        "a.safetensors", "b.safetensors", "sub/broken.pt", "sub/z.safetensors",
        "sub/deeper/c.safetensors",
    ]
    assert [r["verdict"] for r in results] == ["clean", "clean", "error", "match", "clean"]
