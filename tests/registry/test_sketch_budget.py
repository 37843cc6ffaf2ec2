"""Sketch budgets: tensors per sketch, tensors per request, and one decoded sketch at a time.

A check of 12 items, each a valid sketch of about 60,000 tiny tensors, once took the
server from about 100 MB to 1.8 GB: every item was decoded while the body was
validated, all at once. Now the header's tensor count is read first and bounded per
sketch and per request, and items are decoded one at a time.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from fastapi.testclient import TestClient

from modelhash.fingerprint._sketch import sketch_from_arrays
from modelhash.registry._settings import Settings
from modelhash.registry.app import create_app
from modelhash.wire import (
    MAX_SKETCH_TENSORS,
    MAX_SKETCHED_TENSORS_PER_REQUEST,
    CheckItem,
    CheckRequest,
    decode_sketch,
    encode_sketch,
    sketch_tensor_count,
)
from tests.utils.registry import auth, random_fingerprint

_TINY = np.zeros((16, 16))


def tiny_sketch(n: int) -> str:
    """A valid sketch of ``n`` 1x1 tensors of zeros: compresses to almost nothing."""
    return encode_sketch(sketch_from_arrays("model", {f"t{i}": ((1, 1), _TINY) for i in range(n)}))


@pytest.fixture(scope="module")
def big_app(db_url):
    with TestClient(create_app(Settings(database_url=db_url))) as c:
        yield c


def test_a_sketch_over_the_tensor_budget_is_refused_from_its_header():
    text = tiny_sketch(MAX_SKETCH_TENSORS + 1)
    with pytest.raises(ValueError, match="tensors, more than"):
        sketch_tensor_count(text)
    with pytest.raises(ValueError, match="tensors, more than"):
        decode_sketch(text)
    assert sketch_tensor_count(tiny_sketch(3)) == 3


def test_the_attack_request_is_422(big_app, keys):
    # The reported request: up to 12 items of 60,000 tiny tensors, under 4 MiB.
    sketch = tiny_sketch(60_000)
    n = min(12, 3_900_000 // len(sketch))
    assert n >= 8
    items = [{**random_fingerprint(), "sketch": sketch} for _ in range(n)]
    r = big_app.post("/v1/check", json={"items": items}, headers=auth(keys["reader"]))
    assert r.status_code == 422, r.text[:300]
    assert "tensors" in r.text


def test_a_request_over_the_total_budget_is_422(big_app, keys):
    per = MAX_SKETCH_TENSORS
    n = MAX_SKETCHED_TENSORS_PER_REQUEST // per + 1
    sketch = tiny_sketch(per)
    items = [{**random_fingerprint(), "sketch": sketch} for _ in range(n)]
    r = big_app.post("/v1/check", json={"items": items}, headers=auth(keys["reader"]))
    assert r.status_code == 422 and "split the batch" in r.text


def test_a_request_at_the_budget_is_answered(big_app, keys):
    sketch = tiny_sketch(MAX_SKETCH_TENSORS)
    n = MAX_SKETCHED_TENSORS_PER_REQUEST // MAX_SKETCH_TENSORS
    items = [{**random_fingerprint(), "sketch": sketch} for _ in range(n)]
    r = big_app.post("/v1/check", json={"items": items}, headers=auth(keys["reader"]))
    assert r.status_code == 200, r.text[:300]
    assert [x["verdict"] for x in r.json()["results"]] == ["clean"] * n


def test_check_items_hold_no_decoded_sketch_after_validation():
    sketch = tiny_sketch(4000)
    one = decode_sketch(sketch)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        request = CheckRequest.model_validate(
            {"items": [{**random_fingerprint(), "sketch": sketch} for _ in range(8)]}
        )
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(isinstance(i, CheckItem) and i.sketch_tensors() == 4000 for i in request.items)
    # One decoded sketch of 4000 tensors is about 10 MB; eight held at once would be 80.
    per_sketch = 4000 * 2 * 1024
    assert after - before < per_sketch, (after - before, peak)
    assert peak - before < 3 * per_sketch, peak - before
    assert request.items[0].parsed_sketch().tensors.keys() == one.tensors.keys()


def test_aligning_many_unpaired_tensors_of_one_shape_stays_small():
    # Zero tensors never pair by key (cosine 0), so all 5000 of one shape are left
    # to the greedy pass, which once built a 5000 x 5000 comparison (16k: 6 GB).
    from modelhash.fingerprint._similarity import MAX_GREEDY_PAIRS, align

    n = 5000
    assert n * n > MAX_GREEDY_PAIRS
    a = sketch_from_arrays("model", {f"a{i}": ((1, 1), _TINY) for i in range(n)})
    b = sketch_from_arrays("model", {f"b{i}": ((1, 1), _TINY + 1) for i in range(n)})
    tracemalloc.start()
    try:
        pairs = align(a, b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pairs == {}
    assert peak < 20 * 2**20, peak
