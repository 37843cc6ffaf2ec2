"""The documented multi-worker deployment: ``uvicorn --factory ... --workers N``.

Logging and metrics are set up inside ``create_app``, so this way of running the app
logs JSON lines and never a looked-up hash (uvicorn's own access log once wrote every
path, hashes included), and ``/metrics`` adds up every worker's counts when
``PROMETHEUS_MULTIPROC_DIR`` is set.
"""

from __future__ import annotations

import json
import re
import secrets

import httpx

from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._migrations import upgrade
from modelhash.registry.crud.keys import CLI, create_key
from tests.registry._uvicorn import uvicorn
from tests.utils.registry import auth, flag_body

_WORKERS = 2
_REQUESTS = 30


def _counter(metrics: str, route: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("modelhash_http_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_workers_log_no_hash_and_metrics_add_up(fresh_url, tmp_path):
    upgrade(fresh_url)
    engine = make_engine(fresh_url)
    with session_scope(engine) as session:
        _, key = create_key(session, role="submitter", name="w", actor=CLI)
    engine.dispose()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    looked_up = [secrets.token_hex(32) for _ in range(_REQUESTS)]
    with uvicorn(fresh_url, tmp_path, workers=_WORKERS, env=env) as served:
        r = httpx.post(served.base + "/v1/flags", json=flag_body(), headers=auth(key))
        assert r.status_code == 201
        for value in looked_up:
            # A new connection each time, so the requests spread over the workers.
            r = httpx.get(f"{served.base}/v1/hashes/sha256/{value}", headers=auth(key))
            assert r.status_code == 200 and r.json()["flags"] == []
            r = httpx.post(served.base + "/v1/check", json={"items": [{"sha256": value}]},
                           headers=auth(key))
            assert r.status_code == 200
        scrapes = [httpx.get(served.base + "/metrics").text for _ in range(6)]
        output = served.output()
    pids = set(re.findall(r"Started server process \[(\d+)\]", output))
    assert len(pids) >= _WORKERS, output[-2000:]
    for value in looked_up:
        assert value not in output and value[:20] not in output
    access = [
        json.loads(line) for line in output.splitlines()
        if line.startswith("{") and '"logger":"modelhash.access"' in line
    ]
    assert len(access) >= 2 * _REQUESTS
    assert not [line for line in output.splitlines() if '" 200' in line or "GET /v1" in line]
    for text in scrapes:
        assert _counter(text, "/v1/hashes/{algorithm}/{value}") == _REQUESTS
        assert _counter(text, "/v1/check") == _REQUESTS
        assert 'modelhash_flags{status="active"} 1.0' in text
        assert "modelhash_build_info{" in text and "modelhash_database_up 1.0" in text
        assert "modelhash_db_pool_connections{" in text
        assert "modelhash_sketch_bank_rows{" in text
