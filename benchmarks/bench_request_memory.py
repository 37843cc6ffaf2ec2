"""Peak memory (RSS) of the registry serving one worst-case request.

Starts the app under uvicorn (one process, SQLite in a temporary folder), sends one
request and reads the server's ``VmHWM`` (peak resident set) from /proc. Each
scenario gets a fresh server, so peaks never carry over:

- ``idle``: a readiness probe only, the baseline;
- ``check-budget``: ``POST /v1/check`` whose sketches sit exactly at the per-request
  budget (crafted, compressible tensors, the most a body under the size cap can
  carry);
- ``check-attack``: the reported attack, 60,000 tiny tensors per item (now 422);
- ``flag-budget``: ``POST /v1/flags`` with a sketch at the per-sketch budget;
- ``base-budget``, ``check-vs-base``, ``flag-vs-base``: the same against a
  reference base of as many tensors, so the delta path runs.

Linux only. Usage::

    python benchmarks/bench_request_memory.py
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from modelhash.fingerprint._sketch import sketch_from_arrays
from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.keys import CLI, create_key
from modelhash.wire import MAX_SKETCH_TENSORS, MAX_SKETCHED_TENSORS_PER_REQUEST, encode_sketch

_ZERO = np.zeros((16, 16))


def tiny_sketch(n: int) -> str:
    return encode_sketch(sketch_from_arrays("model", {f"t{i}": ((1, 1), _ZERO) for i in range(n)}))


def fingerprint() -> dict[str, str]:
    return {"sha256": secrets.token_hex(32), "content": secrets.token_hex(32)}


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(name: str, url: str, key: str, send: str, body: dict | None) -> None:
    port = free_port()
    env = {**os.environ, "MODELHASH_DATABASE_URL": url, "MODELHASH_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "modelhash.registry.app:create_app",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        before = status_kb(proc.pid, "VmRSS")
        start = time.perf_counter()
        status = 200
        if body is not None:
            r = httpx.post(base + send, json=body, timeout=120,
                           headers={"Authorization": f"Bearer {key}"})
            status = r.status_code
        took = time.perf_counter() - start
        peak = status_kb(proc.pid, "VmHWM")
        after = status_kb(proc.pid, "VmRSS")
        size = len(httpx.Request("POST", base, json=body).content) if body else 0
        print(f"{name:14s} status {status}  body {size / 2**20:5.2f} MiB  {took:6.2f} s  "
              f"RSS before {before / 1024:6.1f} MiB  peak {peak / 1024:6.1f} MiB  "
              f"after {after / 1024:6.1f} MiB")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/registry.db"
        upgrade(url)
        engine = make_engine(url)
        with session_scope(engine) as session:
            _, key = create_key(session, role="submitter", name="bench", actor=CLI)
        with session_scope(engine) as session:
            _, admin = create_key(session, role="admin", name="bench-admin", actor=CLI)
        engine.dispose()
        per = MAX_SKETCH_TENSORS
        n = MAX_SKETCHED_TENSORS_PER_REQUEST // per
        at_budget = tiny_sketch(per)
        attack = tiny_sketch(60_000)
        run("idle", url, key, "", None)
        run("check-budget", url, key, "/v1/check",
            {"items": [{**fingerprint(), "sketch": at_budget} for _ in range(n)]})
        run("check-attack", url, key, "/v1/check",
            {"items": [{**fingerprint(), "sketch": attack}
                       for _ in range(min(12, 3_900_000 // len(attack)))]})
        run("flag-budget", url, key, "/v1/flags",
            {"category": "other", "fingerprint": fingerprint(), "sketch": at_budget})
        # A reference base with the same tensors: checks and flags now take the
        # delta path (nearest base, delta, signature, verification).
        run("base-budget", url, admin, "/v1/bases",
            {"name": "base", "fingerprint": fingerprint(), "sketch": tiny_sketch(per)})
        run("check-vs-base", url, key, "/v1/check",
            {"items": [{**fingerprint(), "sketch": at_budget} for _ in range(n)]})
        run("flag-vs-base", url, key, "/v1/flags",
            {"category": "other", "fingerprint": fingerprint(), "sketch": at_budget,
             "force": False})


if __name__ == "__main__":
    main()
