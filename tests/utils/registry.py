"""Factories for registry tests: random fingerprints, flag bodies, auth headers, databases."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def random_fingerprint(**overrides: str) -> dict[str, str]:
    """A flat fingerprint map like ``ModelFingerprint.summary()``, with fresh random values."""
    sha = secrets.token_hex(32)
    out = {
        "content": secrets.token_hex(32),
        "sha256": sha,
        "autov2": sha[:10],
        "blake3": secrets.token_hex(32),
        "crc32": secrets.token_hex(4),
        "autov1": secrets.token_hex(4),
        "autov3": secrets.token_hex(6),
    }
    out.update(overrides)
    return out


def flag_body(fingerprint: dict[str, str] | None = None, **fields: Any) -> dict[str, Any]:
    """A valid ``POST /v1/flags`` body."""
    body: dict[str, Any] = {
        "category": "csam",
        "severity": "critical",
        "note": "seen on two sites",
        "evidence": "case-1234",
        "fingerprint": random_fingerprint() if fingerprint is None else fingerprint,
    }
    body.update(fields)
    return body


def auth(key: str) -> dict[str, str]:
    """The Authorization header for ``key``."""
    return {"Authorization": f"Bearer {key}"}


def pg_base_url() -> str:
    """The PostgreSQL server the tests may use."""
    return os.environ.get("MODELHASH_TEST_POSTGRES_URL", PG_DEFAULT)


def pg_problem() -> str | None:
    """Why PostgreSQL cannot be used, or None when it answers."""
    try:
        engine = create_engine(pg_base_url(), connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
    return None


def pg_schema_url(schema: str) -> str:
    """The test server's URL with ``search_path`` set to ``schema``."""
    url = make_url(pg_base_url()).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def new_pg_schema() -> tuple[str, str]:
    """Create an empty schema with a unique name; returns (schema, url using it)."""
    schema = f"mh_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(pg_base_url())
    try:
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    finally:
        engine.dispose()
    return schema, pg_schema_url(schema)


def drop_pg_schema(schema: str) -> None:
    """Drop a schema made by :func:`new_pg_schema`, with everything in it."""
    engine = create_engine(pg_base_url())
    try:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        engine.dispose()


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a server process: SIGTERM, then SIGKILL if it has not exited in 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, seconds: float = 60,
               path: str = "/readyz") -> None:
    """Wait until the registry at ``url`` answers ``path`` (/readyz: migrated and
    serving; /healthz: the process is up); fail with its log if it dies."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(f"registry exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"registry did not start:\n{log.read_text()}")
        time.sleep(0.1)
