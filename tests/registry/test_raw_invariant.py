"""A flag filed with no reference base near it is stored raw. A copy of it whose units
were permuted, whose residual stream was rotated, or whose scales were moved (each
also cast to float16) is still found, on the invariant layer, through the spectra
the index keeps for raw flags; the same changes applied to an innocent sibling, the
base or an unrelated model are not matched, nor is a revoked flag. Once the base is
registered the flag is re-based, and the copies are found through its delta row.
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select

from modelhash.fingerprint import Sketch, fingerprint_path
from modelhash.fingerprint._robust import INVARIANT_THRESHOLDS
from modelhash.registry._db import session_scope
from modelhash.registry.crud.sketches import RawSpectra, blob_spectra, index_for, raw_layout
from modelhash.registry.models import SketchRow
from modelhash.wire import CheckResponse, encode_sketch
from tests.utils.invariant_models import (
    everything,
    forward,
    llama,
    permute,
    rescale_norms,
    rotate,
    scale_qk,
)
from tests.utils.registry import auth, flag_body
from tests.utils.sketch_models import plus, random_delta, write

# Dimensions no other registry test uses, so their bases and flags cannot interfere.
DIMS = {"d": 40, "f": 112, "layers": 2}
CHANGES: dict[str, Callable[..., tuple[dict[str, np.ndarray], np.ndarray]]] = {
    "permuted": permute,
    "rotated": rotate,
    "norms-rescaled": rescale_norms,
    "qk-scaled": scale_qk,
    "all": everything,
}


def _half(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float16) for k, v in sd.items()}


def _variants(prefix: str, sd: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (name, change) in enumerate(CHANGES.items()):
        changed, _q = change(sd, seed + i)
        out[f"{prefix}-{name}"] = changed
        out[f"{prefix}-{name}-fp16"] = _half(changed)
    return out


def _item(folder: Path, name: str, sd: dict[str, np.ndarray]) -> dict[str, str]:
    (o,) = fingerprint_path(write(folder, name, sd), layers="all")
    assert o.fingerprint is not None and o.fingerprint.sketch is not None
    assert o.fingerprint.sketch.invariant is not None
    return {**o.fingerprint.summary(), "sketch": encode_sketch(o.fingerprint.sketch)}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("raw-invariant-models")
    b = llama(900, **DIMS)
    f, g, h, k = (plus(b, (1, random_delta(b, s))) for s in (901, 902, 903, 904))
    sds = {
        "base": b, "f": f, "h": h,
        **_variants("f", f, 10), **_variants("g", g, 10), **_variants("base", b, 20),
        "h-all": everything(h, 30)[0],
        # A flag that is itself a disguised fine-tune of the base: raw even once the
        # base is registered (its tensors line up with none of the base's).
        "k-all": everything(k, 40)[0],
        "k-rotated-fp16": _half(rotate(permute(k, 41)[0], 42)[0]),
        "stranger": llama(999, **DIMS),
        "stranger-all": everything(llama(999, **DIMS), 10)[0],
    }
    return {name: _item(folder, name, sd) for name, sd in sds.items()}


def test_each_change_keeps_the_function() -> None:
    sd = llama(900, **DIMS)
    x = np.random.default_rng(0).standard_normal((7, DIMS["d"]))
    want = forward(sd, x)
    for name, change in CHANGES.items():
        changed, q = change(sd, 1)
        got = forward(changed, x @ q.T)
        assert np.abs(got - want @ q.T).max() < 1e-5 * np.abs(want).max(), name
        moved = [k for k in sd if sd[k].ndim == 2 and not np.allclose(changed[k], sd[k])]
        assert moved, name  # each change does change the weights


def _matches(client: TestClient, keys: dict[str, str], item: dict[str, str]) -> dict[str, Any]:
    r = client.post("/v1/check", json={"items": [item]}, headers=auth(keys["reader"]))
    assert r.status_code == 200, r.text
    (result,) = CheckResponse.model_validate(r.json()).results
    return {m.flag_id: (m.match, m.evidence.model_dump(), result.verdict) for m in result.matches}


def _flag(client: TestClient, keys: dict[str, str], item: dict[str, str]) -> str:
    fp = {k: v for k, v in item.items() if k != "sketch"}
    r = client.post("/v1/flags", json=flag_body(fp, sketch=item["sketch"]),
                    headers=auth(keys["submitter"]))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _rows(engine: Engine, flag_id: str) -> list[tuple[str, str | None, Sketch]]:
    with session_scope(engine) as s:
        rows = s.exec(select(SketchRow.kind, SketchRow.base_id, SketchRow.blob)
                      .where(SketchRow.owner_id == flag_id)
                      .order_by(SketchRow.id)).all()  # type: ignore[arg-type]
    return [(k, b, Sketch.from_bytes(blob)) for k, b, blob in rows]


POSITIVES = [f"f-{c}{h}" for c in CHANGES for h in ("", "-fp16")]
NEGATIVES = [f"{who}-{c}{h}" for who in ("g", "base") for c in CHANGES for h in ("", "-fp16")]


def test_raw_flags_are_found_on_the_invariant_layer_then_through_their_base(
    client: TestClient, keys: dict[str, str], models: dict[str, dict[str, str]],
    engine: Engine,
) -> None:
    f_id = _flag(client, keys, models["f"])
    h_id = _flag(client, keys, models["h"])
    for fid in (f_id, h_id):
        ((kind, base_id, stored),) = _rows(engine, fid)
        assert kind == "model" and base_id is None and stored.invariant is not None

    def found(name: str, flag_id: str = f_id) -> tuple[str, dict[str, Any], str] | None:
        got: tuple[str, dict[str, Any], str] | None = _matches(
            client, keys, models[name]).get(flag_id)
        return got

    for name in POSITIVES:
        got = found(name)
        assert got is not None, name
        kind, ev, verdict = got
        assert (kind, verdict) == ("near-duplicate", "match"), name
        assert ev["layer"] == "invariant" and ev["invariant"] is True, name
        assert ev["base"] is None and ev["raw_distance"] <= INVARIANT_THRESHOLDS.raw_distance, name
    for name in (*NEGATIVES, "stranger", "stranger-all"):
        assert found(name) is None, name
        assert found(name, h_id) is None, name

    # Revoked: clean at once, whatever the index holds.
    assert found("h-all", h_id) is not None
    r = client.post(f"/v1/flags/{h_id}/revoke", json={"reason": "filed in error"},
                    headers=auth(keys["admin"]))
    assert r.status_code == 200, r.text
    assert found("h-all", h_id) is None

    # The base, registered later: the flag is re-based, its delta row carries the
    # invariant layer, and the spectra index lets go of the raw row.
    fp = {k: v for k, v in models["base"].items() if k != "sketch"}
    base_name = f"tiny-llama-40-{uuid.uuid4().hex[:8]}"
    r = client.post("/v1/bases", json={"name": base_name, "fingerprint": fp,
                                       "sketch": models["base"]["sketch"]},
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    rows = _rows(engine, f_id)
    assert [(k, b is None) for k, b, _ in rows] == [("model", True), ("delta", False)]
    assert rows[1][2].invariant is not None
    with session_scope(engine) as s:
        index = index_for(s)
        assert f_id not in index.raw_flags
    for name in POSITIVES:
        got = found(name)
        assert got is not None, name
        kind, ev, verdict = got
        assert verdict == "match" and ev["layer"] == "invariant", name
        assert ev["invariant"] is True and ev["base"] == base_name, name
    for name in (*NEGATIVES, "stranger", "stranger-all"):
        assert found(name) is None, name

    # Filed after the base, disguised: stored raw, and judged relative to the base
    # its copies' spectra are nearest to, so the base itself is not a copy of it.
    k_id = _flag(client, keys, models["k-all"])
    ((kind, base_id, _k),) = _rows(engine, k_id)
    assert kind == "model" and base_id is None
    got = found("k-rotated-fp16", k_id)
    assert got is not None and got[1]["layer"] == "invariant" and got[1]["base"] == base_name
    for name in ("base-all", "base-all-fp16", "g-all-fp16", "f-all-fp16", "base"):
        assert found(name, k_id) is None, name


def test_the_spectra_index_pairs_by_key_and_needs_half_the_matrices(
    models: dict[str, dict[str, str]],
) -> None:
    from modelhash.wire import decode_sketch

    def spectra(name: str) -> Any:
        inv = decode_sketch(models[name]["sketch"]).invariant
        assert inv is not None
        return inv

    f = spectra("f")
    group = RawSpectra(raw_layout(f))
    for i, name in enumerate(("g-all", "f", "stranger", "base-all")):
        group.add(i, name, spectra(name))
    view = group.view()
    # A permuted, cast copy is the nearest; siblings and strangers are far off.
    assert view.near(spectra("f-all-fp16"), radius=2e-4) == [1]
    assert view.near(spectra("f-qk-scaled-fp16"), radius=2e-4) == [1]
    assert view.near(spectra("g-permuted"), radius=2e-4) == [0]  # g-all, not f
    assert view.near(spectra("base-rotated"), radius=2e-4) == [3]
    assert view.near(spectra("stranger-all"), radius=2e-4) == [2]
    # Ranked by distance: the sibling and the base sit about 3e-3 from f.
    assert view.near(spectra("f-permuted"), radius=1.0, top_k=3)[:1] == [1]
    assert set(view.near(spectra("f-permuted"), radius=0.01)) == {0, 1, 3}
    # Fewer than half the matrices present: nothing is retrieved.
    indexed = [k for k, *_ in raw_layout(f)]
    few = type(f)({k: f.items[k] for k in indexed[: len(indexed) // 2 - 1]}, f.algorithm)
    assert view.near(few, radius=1.0) == []
    # Renamed matrices do not pair by key.
    renamed = type(f)({"x" + k: s for k, s in f.items.items()}, f.algorithm)
    assert view.near(renamed, radius=1.0) == []
    group.drop({"f"})
    assert group.view().near(spectra("f-all"), radius=2e-4) == []
    assert list(view.ids) == [0, 1, 2, 3]  # an earlier view is left as it was


def test_blob_spectra_reads_only_the_invariant_section(
    models: dict[str, dict[str, str]],
) -> None:
    from modelhash.wire import decode_sketch

    sketch = decode_sketch(models["f"]["sketch"])
    blob = sketch.to_bytes()
    got = blob_spectra(blob)
    assert got is not None and sketch.invariant is not None
    assert got.items.keys() == sketch.invariant.items.keys()
    for k, s in got.items.items():
        assert np.array_equal(s.values, sketch.invariant.items[k].values)
    sketch.invariant = None
    assert blob_spectra(sketch.to_bytes()) is None
    for bad in (b"nope", blob[:-7], blob[:6] + b"\x00" * 20):
        with pytest.raises(ValueError):
            blob_spectra(bad)

