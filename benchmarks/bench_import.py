"""Bulk import throughput: rows per second through ``modelhash import``'s SDK path.

For each database it starts ``modelhash serve`` on a fresh database, then imports
N new rows of CSV (sha256, blake3, content, category, severity, note) with
``RegistryClient.import_flags`` in batches, as ``modelhash import`` does; then the
same file again (every row answers ``exists``); then, for comparison, a loop of
one ``RegistryClient.flag`` call per row over a smaller sample, which is what a
script had to do before bulk import existed.

Usage::

    python benchmarks/bench_import.py                      # both databases, 20k rows
    python benchmarks/bench_import.py --backends sqlite --rows 5000
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_registry import PG_DEFAULT, pg_schema, server  # type: ignore[import-not-found]

from modelhash import RegistryClient
from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.keys import CLI, create_key

_CATEGORIES = ("csam", "ncii", "real-person-likeness", "other")


def csv_rows(n: int) -> str:
    lines = ["sha256,blake3,content,category,severity,note"]
    for i in range(n):
        lines.append(f"{secrets.token_hex(32)},{secrets.token_hex(32)},{secrets.token_hex(32)},"
                     f"{_CATEGORIES[i % 4]},high,imported row {i}")
    return "\n".join(lines) + "\n"


def submitter_key(url: str) -> str:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            _, key = create_key(session, role="submitter", name="bench", actor=CLI)
        return key
    finally:
        engine.dispose()


def run(label: str, url: str, args: argparse.Namespace) -> None:
    upgrade(url)
    key = submitter_key(url)
    text = csv_rows(args.rows)
    with server(url) as base, RegistryClient(base, api_key=key, timeout=120) as client:
        start = time.perf_counter()
        out = client.import_flags(text, batch=args.batch)
        new = time.perf_counter() - start
        assert out.created == args.rows, out.model_dump(exclude={"rows"})
        start = time.perf_counter()
        again = client.import_flags(text, batch=args.batch)
        seen = time.perf_counter() - start
        assert again.existing == args.rows
        start = time.perf_counter()
        for _ in range(args.loop):
            client.flag({"sha256": secrets.token_hex(32), "content": secrets.token_hex(32)},
                        category="other", note="one call per row")
        loop = time.perf_counter() - start
    print(f"{label:11} import {args.rows:>6} new rows: {args.rows / new:8.0f} rows/s "
          f"({new:.1f} s) | again, all existing: {args.rows / seen:8.0f} rows/s | "
          f"one flag() call per row: {args.loop / loop:6.0f} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--loop", type=int, default=300, help="rows for the one-call-a-row loop")
    parser.add_argument("--pg-url", default=os.environ.get("MODELHASH_TEST_POSTGRES_URL",
                                                            PG_DEFAULT))
    args = parser.parse_args()
    print(f"bulk import benchmark: batches of {args.batch}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    for backend in args.backends.split(","):
        if backend == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="modelhash-bench-"))
            try:
                run("SQLite", f"sqlite:///{tmp / 'bench.db'}", args)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif backend == "postgresql":
            with pg_schema(args.pg_url, "modelhash_bench_import") as (url, _size):
                run("PostgreSQL", url, args)
        else:
            raise SystemExit(f"unknown backend {backend!r}")


if __name__ == "__main__":
    main()
