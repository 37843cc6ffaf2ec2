"""Load benchmark of the registry: check latency and throughput with 100k flags.

For each database (SQLite, PostgreSQL) it seeds N flagged models straight into a
fresh database (each with a sha256 and a content hash, plus an AutoV2), starts
``modelhash serve`` as a subprocess, and drives it from this process over
127.0.0.1 with a few client threads. Every scenario is bounded by a request count
and a time limit. It prints throughput and p50/p99 latency for:

- ``GET /healthz``: the same server doing no work, the reference;
- ``POST /v1/check`` with one fingerprint (half of them flagged);
- ``POST /v1/check`` with a batch of 100 (one in ten flagged);
- ``POST /v1/check`` with one unflagged fingerprint carrying a 400-matrix sketch;
- ``GET /v1/hashes/sha256/{value}``: an exact lookup.

The ratio columns divide by /healthz in the same run, so they show what the lookup
itself costs on top of HTTP, JSON and authentication.

Usage::

    python benchmarks/bench_registry.py                   # both databases, 100k flags
    python benchmarks/bench_registry.py --backends sqlite --flags 20000 --requests 500
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from modelhash.fingerprint._sketch import sketch_from_arrays
from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.keys import CLI, create_key
from modelhash.registry.models import Fingerprint, Flag, WeakHash
from modelhash.wire import encode_sketch

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    latencies: list[float]
    fingerprints_per_request: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


def seed(url: str, flags: int) -> list[str]:
    """Insert ``flags`` flagged models in bulk; returns their sha256 values."""
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC)
    shas: list[str] = []
    batch = 10_000
    try:
        for start in range(0, flags, batch):
            n = min(batch, flags - start)
            flag_rows, strong_rows, weak_rows = [], [], []
            for _ in range(n):
                flag_id = str(uuid.uuid4())
                sha = os.urandom(32).hex()
                shas.append(sha)
                flag_rows.append(
                    {
                        "id": flag_id,
                        "category": "csam",
                        "severity": "high",
                        "status": "active",
                        "files": [],
                        "created_by": "bench",
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                strong_rows.append(
                    {"flag_id": flag_id, "algorithm": "sha256", "value": sha, "created_at": now}
                )
                strong_rows.append(
                    {
                        "flag_id": flag_id,
                        "algorithm": "content-blake3-v1",
                        "value": os.urandom(32).hex(),
                        "created_at": now,
                    }
                )
                weak_rows.append(
                    {
                        "flag_id": flag_id,
                        "algorithm": "autov2",
                        "value": sha[:10],
                        "created_at": now,
                    }
                )
            with engine.begin() as conn:
                conn.execute(insert(Flag.__table__), flag_rows)  # type: ignore[attr-defined]
                conn.execute(insert(Fingerprint.__table__), strong_rows)  # type: ignore[attr-defined]
                conn.execute(insert(WeakHash.__table__), weak_rows)  # type: ignore[attr-defined]
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return shas


def reader_key(url: str) -> str:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            _, key = create_key(session, role="reader", name="bench", actor=CLI)
        return key
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(url: str) -> Iterator[str]:
    port = free_port()
    exe = Path(sys.executable).with_name("modelhash")
    cmd = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "from modelhash._cli import main; main()"]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELHASH_")}
    proc = subprocess.Popen(
        [*cmd, "serve", "--db", url, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drive(
    base: str,
    name: str,
    make: Callable[[httpx.Client], httpx.Response],
    *,
    requests: int,
    seconds: float,
    threads: int,
    per_request: int,
) -> Result:
    """Run ``make`` from ``threads`` clients until ``requests`` are done or time is up."""
    latencies: list[float] = []
    lock = threading.Lock()
    issued = 0
    deadline = 0.0
    errors: list[str] = []

    def worker() -> None:
        nonlocal issued
        with httpx.Client(base_url=base, timeout=30) as http:
            for _ in range(5):  # warm the connection
                make(http)
            barrier.wait()
            go.wait()
            while True:
                with lock:
                    if issued >= requests or time.monotonic() > deadline:
                        return
                    issued += 1
                t0 = time.perf_counter()
                r = make(http)
                elapsed = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                with lock:
                    latencies.append(elapsed)

    barrier = threading.Barrier(threads + 1)
    go = threading.Event()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    deadline = time.monotonic() + seconds
    start = time.perf_counter()
    go.set()
    for t in pool:
        t.join()
    took = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{name}: {len(errors)} failed requests, first: {errors[0]}")
    return Result(name, len(latencies), took, latencies, per_request)


def run_backend(label: str, url: str, args: argparse.Namespace) -> list[Result]:
    t0 = time.perf_counter()
    shas = seed(url, args.flags)
    print(
        f"[{label}] seeded {args.flags:,} flags ({2 * args.flags:,} strong hashes) in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    key = reader_key(url)
    headers = {"Authorization": f"Bearer {key}"}
    rng = secrets.SystemRandom()

    def single(http: httpx.Client) -> httpx.Response:
        sha = rng.choice(shas) if rng.random() < 0.5 else os.urandom(32).hex()
        return http.post("/v1/check", json={"items": [{"sha256": sha}]}, headers=headers)

    def batch(http: httpx.Client) -> httpx.Response:
        items = [
            {
                "sha256": rng.choice(shas) if i % 10 == 0 else os.urandom(32).hex(),
                "content": os.urandom(32).hex(),
            }
            for i in range(100)
        ]
        return http.post("/v1/check", json={"items": items}, headers=headers)

    # A sketch the size of a diffusion model's (400 matrices, random values, so it
    # compresses as real weights do); nothing is flagged by sketch, so this is the
    # cost of decoding and scanning for an upload that matches no flag by hash.
    sketch = encode_sketch(sketch_from_arrays("model", {
        f"layer.{i}.weight": ((320, 320), np.random.default_rng(i).standard_normal((16, 16)))
        for i in range(400)
    }))

    def with_sketch(http: httpx.Client) -> httpx.Response:
        item = {"sha256": os.urandom(32).hex(), "sketch": sketch}
        return http.post("/v1/check", json={"items": [item]}, headers=headers)

    def lookup(http: httpx.Client) -> httpx.Response:
        return http.get(f"/v1/hashes/sha256/{rng.choice(shas)}", headers=headers)

    def healthz(http: httpx.Client) -> httpx.Response:
        return http.get("/healthz")

    out = []
    with server(url) as base:
        with httpx.Client(base_url=base, timeout=300) as http:
            for attempt in ("first", "cached"):
                t = time.perf_counter()
                r = http.get("/v1/export", headers=headers)
                r.raise_for_status()
                print(
                    f"[{label}] GET /v1/export ({attempt}): {len(r.content) / 1e6:.1f} MB "
                    f"in {time.perf_counter() - t:.2f}s",
                    flush=True,
                )
        for name, fn, per in (
            ("GET /healthz", healthz, 0),
            ("check x1", single, 1),
            ("check x100", batch, 100),
            ("check sketch", with_sketch, 1),
            ("lookup sha256", lookup, 1),
        ):
            requests = args.requests if per != 100 else max(1, args.requests // 5)
            out.append(
                drive(
                    base,
                    name,
                    fn,
                    requests=requests,
                    seconds=args.seconds,
                    threads=args.threads,
                    per_request=per,
                )
            )
    return out


def report(label: str, results: list[Result]) -> None:
    ref = results[0]
    print(f"\n{label}: {results[0].name} is the reference (same server, same run)")
    print(
        f"{'scenario':<15} {'requests':>8} {'req/s':>8} {'fp/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/s vs healthz':>17} {'p50 vs healthz':>15}"
    )
    for r in results:
        fps = f"{r.rps * r.fingerprints_per_request:,.0f}" if r.fingerprints_per_request else "-"
        print(
            f"{r.name:<15} {r.requests:>8} {r.rps:>8.0f} {fps:>9} {r.pct(0.5):>8.2f} {r.pct(0.99):>8.2f}"
            f" {r.rps / ref.rps:>16.2f}x {r.pct(0.5) / ref.pct(0.5):>14.2f}x"
        )


@contextmanager
def pg_schema(pg_url: str, prefix: str) -> Iterator[tuple[str, Callable[[], int]]]:
    """A fresh PostgreSQL schema, dropped afterwards: its URL, and a function giving
    the bytes its tables take."""
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def size() -> int:
        with admin.connect() as conn:
            return int(conn.execute(text(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :s AND c.relkind = 'r'"
            ), {"s": schema}).scalar_one())

    url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False), size
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--flags", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=3000, help="per scenario (batch: a fifth)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit per scenario")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("MODELHASH_TEST_POSTGRES_URL", PG_DEFAULT),
        help="a PostgreSQL server to use (a throwaway schema is made in it)",
    )
    args = parser.parse_args()
    print(
        f"modelhash registry benchmark: {args.flags:,} flags, up to {args.requests} requests or "
        f"{args.seconds:.0f}s per scenario, {args.threads} client threads, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs"
    )
    for backend in args.backends.split(","):
        if backend == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="modelhash-bench-"))
            try:
                report("SQLite", run_backend("sqlite", f"sqlite:///{tmp / 'bench.db'}", args))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif backend == "postgresql":
            with pg_schema(args.pg_url, "modelhash_bench") as (url, _size):
                report("PostgreSQL", run_backend("postgresql", url, args))
        else:
            raise SystemExit(f"unknown backend {backend!r}")


if __name__ == "__main__":
    main()
