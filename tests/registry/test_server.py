"""The real thing: ``modelhash serve`` in a subprocess, spoken to over loopback HTTP."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.utils.registry import auth, flag_body, random_fingerprint, stop, wait_ready

_SCRIPT = Path(sys.executable).with_name("modelhash")
MODELHASH = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "from modelhash._cli import main; main()"]
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELHASH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODELHASH, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )


class Server:
    def __init__(self, proc: subprocess.Popen[str], base: str, log: Path) -> None:
        self.proc, self.base, self.log = proc, base, log

    def logs(self) -> str:
        return self.log.read_text()


@contextmanager
def serve(cwd: Path, *db: str, name: str = "server") -> Iterator[Server]:
    port = free_port()
    log = cwd / f"{name}-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*MODELHASH, "serve", "--host", "127.0.0.1", "--port", str(port), *db],
            cwd=cwd,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        # /healthz: some tests start a server whose schema is not ready on purpose.
        wait_ready(server.base, proc, log, path="/healthz")
        yield server
    finally:
        stop(proc)


def test_one_command_serves_a_fresh_sqlite_registry(tmp_path):
    with serve(tmp_path) as server, httpx.Client(base_url=server.base, timeout=10) as http:
        assert http.get("/readyz").status_code == 200
        assert (tmp_path / "modelhash.db").exists()
        # A second process writes to the same SQLite file while the server runs.
        made = run_cli("keys", "create", "--role", "admin", "--name", "ops", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        admin = made.stdout.strip().splitlines()[-1]
        assert admin.startswith("mh_")
        reader = http.post("/v1/keys", json={"role": "reader"}, headers=auth(admin)).json()["key"]
        fp = random_fingerprint()
        flag = http.post("/v1/flags", json=flag_body(fp), headers=auth(admin))
        assert flag.status_code == 201
        unmatched = secrets.token_hex(32)
        r = http.post(
            "/v1/check",
            json={"items": [{"sha256": fp["sha256"]}, {"sha256": unmatched}]},
            headers=auth(reader),
        )
        assert [x["verdict"] for x in r.json()["results"]] == ["match", "clean"]
        assert (
            http.get(f"/v1/hashes/sha256/{unmatched}", headers=auth(reader)).json()["flags"] == []
        )
        assert http.get("/v1/hashes/sha256/nothex", headers=auth(reader)).status_code == 400
        assert "modelhash_http_requests_total" in http.get("/metrics").text
    logs = server.logs()
    access = [json.loads(line) for line in logs.splitlines() if '"modelhash.access"' in line]
    assert any(a["route"] == "/v1/check" and a.get("matched") is True for a in access)
    for secret in (unmatched, reader, admin):
        assert secret not in logs


def test_cli_errors_are_one_line_with_the_documented_exit_code(tmp_path):
    bad = run_cli(
        "db", "upgrade", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/none", cwd=tmp_path
    )
    assert bad.returncode == 3, bad.stderr
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    wrong = run_cli("db", "upgrade", "--db", "mysql://x@y/z", cwd=tmp_path)
    assert wrong.returncode == 2 and "unsupported database" in wrong.stderr


def _writer(base: str, key: str, acked: list[tuple[str, str]], stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=5) as http:
        while not stop.is_set():
            fp = random_fingerprint()
            try:
                r = http.post("/v1/flags", json=flag_body(fp), headers=auth(key))
            except httpx.TransportError:
                return
            if r.status_code == 201:
                acked.append((r.json()["id"], fp["sha256"]))


def test_killing_the_server_mid_write_loses_no_committed_flag(backend, fresh_url, tmp_path):
    db = ["--db", fresh_url]
    if backend == "postgresql":
        # PostgreSQL is never migrated by serve: not ready until `db upgrade`.
        with serve(tmp_path, *db, name="unmigrated") as server:
            r = httpx.get(server.base + "/readyz", timeout=5)
            assert r.status_code == 503 and "db upgrade" in r.json()["detail"]
            done = run_cli("db", "upgrade", *db, cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            assert httpx.get(server.base + "/readyz", timeout=5).status_code == 200
    made = run_cli("keys", "create", "--role", "submitter", *db, "--create", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]

    acked: list[tuple[str, str]] = []
    stop = threading.Event()
    with serve(tmp_path, *db, name="victim") as server:
        writers = [
            threading.Thread(target=_writer, args=(server.base, key, acked, stop), daemon=True)
            for _ in range(4)
        ]
        for w in writers:
            w.start()
        try:
            deadline = time.monotonic() + 60
            while len(acked) < 40 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
        finally:
            stop.set()
            for w in writers:
                w.join(timeout=30)
    assert len(acked) >= 40

    with (
        serve(tmp_path, *db, name="restarted") as server,
        httpx.Client(base_url=server.base, timeout=30) as http,
    ):
        assert http.get("/readyz").status_code == 200
        for start in range(0, len(acked), 1000):
            chunk = acked[start : start + 1000]
            r = http.post(
                "/v1/check",
                json={"items": [{"sha256": sha} for _, sha in chunk]},
                headers=auth(key),
            )
            results = r.json()["results"]
            assert all(x["verdict"] == "match" for x in results)
            assert [x["matches"][0]["flag_id"] for x in results] == [i for i, _ in chunk]
    if backend == "sqlite":
        import sqlite3

        path = fresh_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
