"""Real-size deltas: fine-tunes that move the weights by 8e-4, the size real ones have.

The raw sketch of such a fine-tune sits at relative distance 8e-4 from its base,
inside the raw near-duplicate distance; every rule here must work on deltas instead:
the fine-tune can be flagged (it is not "the base"), a cast copy of the base cannot,
a flag filed before its base is re-based, and then neither the base nor a sibling
matches it while a cast of the flagged model still does.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import select

from modelhash.fingerprint import fingerprint_path
from modelhash.registry._db import session_scope
from modelhash.registry.models import SketchRow
from modelhash.wire import CheckResponse, encode_sketch
from tests.utils.registry import auth, flag_body
from tests.utils.sketch_models import StateDict, base_model, cast, plus, random_delta, write

SIZE = 8e-4


def _bf16(sd: StateDict) -> StateDict:
    """Round to bfloat16 (kept in float32 storage)."""
    out = {}
    for k, v in sd.items():
        u = v.astype(np.float32).view(np.uint32)
        out[k] = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).view(np.float32)
    return out


def _item(folder: Path, name: str, sd: StateDict) -> dict[str, str]:
    # Another block than the other registry tests' models: the bases registered
    # here must not cover (and so adopt) adapters flagged by those tests.
    sd = {k.replace("down_blocks.0.", "down_blocks.3."): v for k, v in sd.items()}
    (o,) = fingerprint_path(write(folder, name, sd), layers="all")
    assert o.fingerprint is not None and o.fingerprint.sketch is not None
    return {**o.fingerprint.summary(), "sketch": encode_sketch(o.fingerprint.sketch)}


def _add_base(client: TestClient, keys: dict[str, str], item: dict[str, str]) -> dict[str, object]:
    sketch = item["sketch"]
    fingerprint = {k: v for k, v in item.items() if k != "sketch"}
    r = client.post("/v1/bases", json={"name": f"real-size-{uuid.uuid4().hex[:8]}",
                                       "fingerprint": fingerprint, "sketch": sketch},
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    return dict(r.json())


def _flag(client: TestClient, key: str, item: dict[str, str]) -> tuple[int, dict[str, object]]:
    fingerprint = {k: v for k, v in item.items() if k != "sketch"}
    r = client.post("/v1/flags", json=flag_body(fingerprint, sketch=item["sketch"]),
                    headers=auth(key))
    return r.status_code, dict(r.json())


def _matches(client: TestClient, keys: dict[str, str], item: dict[str, str]) -> dict[str, str]:
    r = client.post("/v1/check", json={"items": [item]}, headers=auth(keys["reader"]))
    assert r.status_code == 200, r.text
    (result,) = CheckResponse.model_validate(r.json()).results
    return {m.flag_id: m.match for m in result.matches}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-size")


def test_a_small_fine_tune_is_flaggable_and_a_cast_base_is_not(
    client: TestClient, keys: dict[str, str], folder: Path
) -> None:
    b = base_model(71)
    _add_base(client, keys, _item(folder, "b71", b))
    tune = plus(b, (1.0, random_delta(b, 1, SIZE)))
    status, body = _flag(client, keys["submitter"], _item(folder, "t71", tune))
    assert status == 201, body
    for name, copy in (("b71_f16", cast(b)), ("b71_bf16", _bf16(b))):
        status, body = _flag(client, keys["submitter"], _item(folder, name, copy))
        assert status == 409 and "reference base" in str(body["detail"]), (name, body)


def test_a_flag_filed_before_its_base_is_rebased_and_siblings_stay_clean(
    client: TestClient, keys: dict[str, str], folder: Path, engine: Engine
) -> None:
    b = base_model(72)
    tune = plus(b, (1.0, random_delta(b, 1, SIZE)))
    sibling = plus(b, (1.0, random_delta(b, 2, SIZE)))
    status, body = _flag(client, keys["submitter"], _item(folder, "t72", tune))
    assert status == 201, body
    flag_id = str(body["id"])
    added = _add_base(client, keys, _item(folder, "b72", b))
    with session_scope(engine) as session:
        kinds = session.exec(
            select(SketchRow.kind).where(SketchRow.owner_id == flag_id,
                                         SketchRow.base_id == added["id"])
        ).all()
    assert list(kinds) == ["delta"]
    assert flag_id not in _matches(client, keys, _item(folder, "b72_again", cast(b)))
    assert flag_id not in _matches(client, keys, _item(folder, "s72", sibling))
    assert flag_id not in _matches(client, keys, _item(folder, "s72_16", cast(sibling)))
    found = _matches(client, keys, _item(folder, "t72_16", cast(tune)))
    assert found.get(flag_id) == "near-duplicate", found
