"""Benchmark of sketch matching in the registry: check latency with 10k and 100k flags.

For each size it makes a fresh database with one reference base (a synthetic
200-tensor raw sketch), flags a few real fine-tunes of it through the normal flag
path (so their deltas and signatures are computed as in production), then bulk
inserts the rest of the flagged sketches straight into the tables. It starts
``modelhash serve`` as a subprocess and checks from this process over 127.0.0.1,
each request one item with a sha256 nobody flagged and a sketch, of three kinds:

- ``near-dup``: a flagged fine-tune plus noise (a re-save or cast): must match;
- ``merge``: a 50/50 merge of a flagged fine-tune with a new one: must match;
- ``merge35``: a 35/65 merge (coefficient 0.35, just above the floor of 0.3,
  delta cosine 0.47): must match;
- ``carried``: all of a flagged delta plus an unrelated change five times its size
  (another LoRA baked on top, pruning): delta cosine about 0.2, must match;
- ``sibling``: a new, innocent fine-tune of the same base: must be clean, and is
  the worst case (its full top-k is verified and rejected).

Latency is measured with one client at a time (no queueing), throughput with
``--threads`` clients sending the three kinds in turn. The server is one process.

Filler flags: ``--distinct`` different 200-tensor delta blobs are generated and
reused round-robin as their stored blobs (every row stores its own copy, so the
stored size is real), and each gets random signature bits, which is what the
signature of an unrelated delta looks like, with the norm of a real one. This keeps
seeding to seconds.

Usage::

    python benchmarks/bench_sketch_registry.py                      # 10k and 100k, SQLite
    python benchmarks/bench_sketch_registry.py --sizes 10000 --backends sqlite,postgresql
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_registry import PG_DEFAULT, drive, pg_schema, server
from sqlalchemy import func, insert, select, text

from modelhash.fingerprint import Sketch, TensorSketch, delta_sketch
from modelhash.fingerprint._project import K
from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.bases import create_base
from modelhash.registry.crud.flags import create_flag
from modelhash.registry.crud.keys import CLI, create_key
from modelhash.registry.crud.sketches import SIG_BYTES, signature
from modelhash.registry.models import Fingerprint, Flag, SketchRow, SketchSignature
from modelhash.wire import BaseCreate, FlagCreate, encode_sketch

SHAPES = [(640, 640), (640, 2048), (2048, 640), (320, 320), (1280, 1280), (1280, 5120)]


def model_sketch(rng: np.random.Generator, tensors: int) -> Sketch:
    return Sketch("model", {
        f"unet:block_{i}_proj": TensorSketch(
            f"unet:block_{i}_proj", SHAPES[i % len(SHAPES)], rng.standard_normal((K, K))
        )
        for i in range(tensors)
    })


def moved(base: Sketch, *parts: tuple[float, np.random.Generator | dict[str, Any]],
          size: float = 0.02) -> Sketch:
    """``base`` plus weighted random deltas (a generator makes a fresh one)."""
    out = {}
    for k, t in base.tensors.items():
        v = t.values.copy()
        for w, d in parts:
            step = d.standard_normal((K, K)) if isinstance(d, np.random.Generator) else d[k]
            v = v + w * size * step
        out[k] = TensorSketch(k, t.shape, v)
    return Sketch("model", out)


def fixed_delta(rng: np.random.Generator, base: Sketch) -> dict[str, Any]:
    return {k: rng.standard_normal((K, K)) for k in base.tensors}


def fingerprint() -> dict[str, str]:
    return {"sha256": os.urandom(32).hex(), "content": os.urandom(32).hex()}


def seed(url: str, n: int, args: argparse.Namespace) -> tuple[str, Sketch, list[dict[str, Any]]]:
    """Make the database; returns a reader key, the base sketch and the targets' deltas."""
    upgrade(url)
    engine = make_engine(url)
    rng = np.random.default_rng(0)
    base = model_sketch(rng, args.tensors)
    targets: list[dict[str, Any]] = []
    try:
        with session_scope(engine) as session:
            _, key = create_key(session, role="reader", name="bench", actor=CLI)
            create_base(session, data=BaseCreate(
                name="bench-base", fingerprint=fingerprint(), sketch=encode_sketch(base)
            ), actor=CLI)
            for _ in range(args.targets):
                d = fixed_delta(rng, base)
                targets.append(d)
                body = FlagCreate(category="other", fingerprint=fingerprint(),
                                  sketch=encode_sketch(moved(base, (1.0, d))))
                create_flag(session, data=body, actor=CLI)
        t0 = time.perf_counter()
        deltas = [delta_sketch(moved(base, (1.0, rng)), base)[0]
                  for _ in range(min(args.distinct, n))]
        pool = [d.to_bytes() for d in deltas]
        norms = [sig.norm for d in deltas if (sig := signature(d, base)) is not None]
        print(f"  {len(pool)} distinct filler blobs in {time.perf_counter() - t0:.1f}s",
              flush=True)
        with session_scope(engine) as session:
            base_id = session.execute(
                select(SketchRow.base_id).where(SketchRow.owner_type == "flag")  # type: ignore[arg-type]
            ).scalars().first()
            next_id = 1 + session.execute(
                select(func.max(SketchRow.id))  # type: ignore[arg-type]
            ).scalar_one()
        now = datetime.now(UTC)
        batch = 5000
        filler = n - args.targets
        t0 = time.perf_counter()
        for start in range(0, filler, batch):
            m = min(batch, filler - start)
            sigs = rng.integers(0, 256, (m, SIG_BYTES), dtype=np.uint8)
            flags, hashes, sketches, signatures = [], [], [], []
            for i in range(m):
                fid = str(uuid.uuid4())
                flags.append({"id": fid, "category": "other", "severity": "high",
                              "status": "active", "files": [], "created_by": "bench",
                              "created_at": now, "updated_at": now})
                hashes.append({"flag_id": fid, "algorithm": "sha256",
                               "value": os.urandom(32).hex(), "created_at": now})
                sketches.append({"id": next_id + i, "owner_type": "flag", "owner_id": fid,
                                 "algorithm": base.algorithm, "kind": "delta",
                                 "base_id": base_id, "tensors": args.tensors,
                                 "blob": pool[(start + i) % len(pool)],
                                 "created_at": now})
                signatures.append({"sketch_id": next_id + i, "base_id": base_id,
                                   "signature": sigs[i].tobytes(),
                                   "norm": norms[(start + i) % len(norms)],
                                   "modules": None})
            next_id += m
            with engine.begin() as conn:
                conn.execute(insert(Flag.__table__), flags)  # type: ignore[attr-defined]
                conn.execute(insert(Fingerprint.__table__), hashes)  # type: ignore[attr-defined]
                conn.execute(insert(SketchRow.__table__), sketches)  # type: ignore[attr-defined]
                conn.execute(insert(SketchSignature.__table__), signatures)  # type: ignore[attr-defined]
        print(f"  {filler:,} filler flags inserted in {time.perf_counter() - t0:.1f}s",
              flush=True)
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        with engine.connect() as conn:
            blob_avg = conn.execute(select(func.avg(func.length(SketchRow.blob)))).scalar_one()
            print(f"  stored sketch: {float(blob_avg):,.0f} B blob + {SIG_BYTES + 8} B "
                  f"signature per flag (avg over {n:,})", flush=True)
    finally:
        engine.dispose()
    return key, base, targets


def run(label: str, url: str, n: int, args: argparse.Namespace,
        size_of: Any = None) -> list[tuple[str, int, Any]]:
    print(f"[{label}] {n:,} flagged sketches, {args.tensors} tensors each", flush=True)
    t0 = time.perf_counter()
    key, base, targets = seed(url, n, args)
    print(f"  seeded in {time.perf_counter() - t0:.1f}s", flush=True)
    if size_of is not None:
        print(f"  database size: {size_of() / n:,.0f} B per flag (all tables)", flush=True)
    headers = {"Authorization": f"Bearer {key}"}
    rng = np.random.default_rng(1)
    queries: dict[str, list[str]] = {
        "near-dup": [], "merge": [], "merge35": [], "carried": [], "sibling": []
    }
    for i in range(args.queries):
        t = targets[i % len(targets)]
        queries["near-dup"].append(encode_sketch(moved(base, (1.0, t), (0.05, rng))))
        queries["merge"].append(encode_sketch(moved(base, (0.5, t), (0.5, rng))))
        queries["merge35"].append(encode_sketch(moved(base, (0.35, t), (0.65, rng))))
        queries["carried"].append(encode_sketch(moved(base, (1.0, t), (5.0, rng))))
        queries["sibling"].append(encode_sketch(moved(base, (1.0, rng))))
    payload = len(queries["sibling"][0])
    print(f"  request sketch: {payload:,} base64 chars", flush=True)
    out = []
    with server(url) as root:
        with httpx.Client(base_url=root, timeout=300) as http:
            t0 = time.perf_counter()
            r = http.post("/v1/check", headers=headers, json={"items": [
                {"sha256": os.urandom(32).hex(), "sketch": queries["sibling"][0]}]})
            r.raise_for_status()
            print(f"  first check (loads the signature bank): "
                  f"{time.perf_counter() - t0:.2f}s", flush=True)
            for kind, sketches in queries.items():
                hits = 0
                for s in sketches:
                    r = http.post("/v1/check", headers=headers, json={"items": [
                        {"sha256": os.urandom(32).hex(), "sketch": s}]})
                    r.raise_for_status()
                    hits += r.json()["results"][0]["verdict"] == "match"
                print(f"  {kind:9} matched {hits}/{len(sketches)}", flush=True)
        mixed = [s for trio in zip(*queries.values(), strict=True) for s in trio]
        plan = [(kind, sketches, 1) for kind, sketches in queries.items()]
        plan.append(("mixed", mixed, args.threads))
        for kind, sketches, threads in plan:
            counter = iter(range(10**9))

            def make(http: httpx.Client, sketches: list[str] = sketches,
                     counter: Any = counter) -> httpx.Response:
                s = sketches[next(counter) % len(sketches)]
                return http.post("/v1/check", headers=headers, json={"items": [
                    {"sha256": os.urandom(32).hex(), "sketch": s}]})

            out.append((kind, threads, drive(root, kind, make, requests=args.requests,
                                             seconds=args.seconds, threads=threads,
                                             per_request=1)))
    print(f"\n{label}, {n:,} flags: check with one sketch per request")
    print(f"{'query':<10} {'threads':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, threads, r in out:
        print(f"{kind:<10} {threads:>7} {r.requests:>8} {r.rps:>7.1f} {r.pct(0.5):>8.1f} "
              f"{r.pct(0.99):>8.1f}")
    print(flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--backends", default="sqlite")
    parser.add_argument("--tensors", type=int, default=200, help="tensors per sketch")
    parser.add_argument("--targets", type=int, default=10, help="real flagged fine-tunes")
    parser.add_argument("--distinct", type=int, default=500, help="distinct filler blobs")
    parser.add_argument("--queries", type=int, default=20, help="recall queries per kind")
    parser.add_argument("--requests", type=int, default=150, help="per query kind")
    parser.add_argument("--seconds", type=float, default=20.0, help="time limit per kind")
    parser.add_argument("--threads", type=int, default=2, help="client threads")
    parser.add_argument("--pg-url", default=os.environ.get("MODELHASH_TEST_POSTGRES_URL",
                                                           PG_DEFAULT))
    args = parser.parse_args()
    print(f"modelhash sketch-matching benchmark: python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs", flush=True)
    for backend in args.backends.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            if backend == "sqlite":
                tmp = Path(tempfile.mkdtemp(prefix="modelhash-sketch-bench-"))
                db = tmp / "bench.db"
                try:
                    run("SQLite", f"sqlite:///{db}", n, args, size_of=lambda db=db: db.stat().st_size)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            elif backend == "postgresql":
                with pg_schema(args.pg_url, "modelhash_sketch_bench") as (url, size):
                    run("PostgreSQL", url, n, args, size_of=size)
            else:
                raise SystemExit(f"unknown backend {backend!r}")


if __name__ == "__main__":
    main()
