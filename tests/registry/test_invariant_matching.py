"""The invariant layer in the registry: a flagged fine-tune whose units were permuted,
whose residual stream was permuted and whose norm scales were moved is still found;
innocent models disguised the same way are not. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select

from modelhash.fingerprint import Sketch, fingerprint_path
from modelhash.registry._db import session_scope
from modelhash.registry.models import SketchRow
from modelhash.wire import CheckResponse, encode_sketch
from tests.utils.invariant_models import disguise, llama
from tests.utils.registry import auth, flag_body
from tests.utils.sketch_models import plus, random_delta, write


def _model(folder: Path, name: str, sd: dict[str, np.ndarray]) -> dict[str, str]:
    (o,) = fingerprint_path(write(folder, name, sd), layers="all")
    assert o.fingerprint is not None and o.fingerprint.sketch is not None
    assert o.fingerprint.sketch.invariant is not None
    return {**o.fingerprint.summary(), "sketch": encode_sketch(o.fingerprint.sketch)}


def _matches(client: TestClient, keys: dict[str, str], item: dict[str, str]) -> list[Any]:
    r = client.post("/v1/check", json={"items": [item]}, headers=auth(keys["reader"]))
    assert r.status_code == 200, r.text
    (result,) = CheckResponse.model_validate(r.json()).results
    return list(result.matches)


def _base(client: TestClient, keys: dict[str, str], m: dict[str, str], prefix: str) -> None:
    fp = {k: v for k, v in m.items() if k != "sketch"}
    r = client.post("/v1/bases", json={"name": f"{prefix}-{uuid.uuid4().hex[:8]}",
                                       "fingerprint": fp, "sketch": m["sketch"]},
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("invariant-models")
    b = llama(700)
    df, dg = random_delta(b, 701), random_delta(b, 702)
    half = {k: v.astype(np.float16) for k, v in disguise(plus(b, (1, df)), 2).items()}
    sds = {
        "base": b,
        "f": plus(b, (1, df)),
        "f_disguised": disguise(plus(b, (1, df)), 1),
        "f_disguised16": half,
        "g_disguised": disguise(plus(b, (1, dg)), 1),
        "base_disguised": disguise(b, 3),
        "merge_disguised": disguise(plus(b, (0.5, df), (0.5, dg)), 4),
        "stranger_disguised": disguise(llama(799), 1),
        **{f"ref{i}": plus(b, (1, random_delta(b, 710 + i))) for i in range(5)},
    }
    return {name: _model(folder, name, sd) for name, sd in sds.items()}


def test_disguised_copies_match_on_the_invariant_layer(
    client: TestClient, keys: dict[str, str], models: dict[str, dict[str, str]],
    engine: Engine,
) -> None:
    _base(client, keys, models["base"], "tiny-llama")
    fp = {k: v for k, v in models["f"].items() if k != "sketch"}
    r = client.post("/v1/flags", json=flag_body(fp, sketch=models["f"]["sketch"]),
                    headers=auth(keys["submitter"]))
    assert r.status_code == 201, r.text
    f_id = str(r.json()["id"])
    with session_scope(engine) as s:
        (blob,) = s.exec(select(SketchRow.blob).where(SketchRow.owner_id == f_id)).all()
    stored = Sketch.from_bytes(blob)
    assert stored.kind == "delta" and stored.invariant is not None  # a version 3 blob

    def found(name: str) -> dict[str, tuple[str, dict[str, Any]]]:
        return {m.flag_id: (m.match, m.evidence.model_dump())
                for m in _matches(client, keys, models[name]) if m.flag_id == f_id}

    for name in ("f_disguised", "f_disguised16"):
        got = found(name)
        assert f_id in got, name
        kind, ev = got[f_id]
        assert kind == "near-duplicate"
        assert ev["invariant"] is True and ev["layer"] == "invariant"
        assert ev["cosine"] > 0.95 and ev["z"] >= 8
    for name in ("g_disguised", "base_disguised", "stranger_disguised", "merge_disguised"):
        assert found(name) == {}, name
    # Known-innocent public fine-tunes teach the registry what fine-tunes share: the
    # disguised merge is then reported, the disguised sibling still is not.
    for i in range(5):
        _base(client, keys, models[f"ref{i}"], "public-llama-ft")
    got = found("merge_disguised")
    assert f_id in got and got[f_id][0] == "derived" and got[f_id][1]["invariant"] is True
    assert got[f_id][1].get("shared_direction_removed") is True
    for name in ("g_disguised", "base_disguised", "stranger_disguised"):
        assert found(name) == {}, name
    assert found("f_disguised")[f_id][0] == "near-duplicate"


def test_the_fast_blob_reader_skips_the_invariant_section() -> None:
    from modelhash.registry.crud._stacked import stack_blob
    from tests.fingerprint.test_invariant import _sketch, _spectra

    v2, v3 = stack_blob(_sketch(None).to_bytes()), stack_blob(_sketch(_spectra()).to_bytes())
    assert v2.rows == v3.rows and v2.shapes == v3.shapes
    assert np.array_equal(v2.values, v3.values)
