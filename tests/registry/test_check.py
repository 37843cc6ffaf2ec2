"""POST /v1/check: strong hashes match, weak ones never do, results come in order."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from fastapi.testclient import TestClient

from modelhash.fingerprint import Sketch, TensorSketch
from modelhash.fingerprint._project import K
from modelhash.wire import CheckResponse, encode_sketch
from tests.utils.registry import auth, flag_body, random_fingerprint


@pytest.fixture
def flagged(client: TestClient, keys: dict[str, str]) -> dict[str, str]:
    fp = random_fingerprint()
    r = client.post("/v1/flags", json=flag_body(fp), headers=auth(keys["submitter"]))
    assert r.status_code == 201, r.text
    return {**fp, "id": r.json()["id"]}


def check(client: TestClient, key: str, *items: dict[str, str]) -> CheckResponse:
    r = client.post("/v1/check", json={"items": list(items)}, headers=auth(key))
    assert r.status_code == 200, r.text
    return CheckResponse.model_validate(r.json())


@pytest.mark.parametrize("algorithm", ["sha256", "blake3", "content"])
def test_each_strong_hash_matches_alone(client, keys, flagged, algorithm):
    result = check(client, keys["reader"], {algorithm: flagged[algorithm].upper()}).results[0]
    assert result.verdict == "match"
    (match,) = result.matches
    assert match.flag_id == flagged["id"]
    assert (match.category, match.severity, match.status) == ("csam", "critical", "active")
    assert match.score == 1.0
    assert match.match == ("content" if algorithm == "content" else "exact")
    assert match.evidence.layer == ("content" if algorithm == "content" else "file")


def test_a_full_summary_gives_one_match_per_flag_preferring_the_file_layer(client, keys, flagged):
    item = {k: v for k, v in flagged.items() if k != "id"}
    (result,) = check(client, keys["reader"], item).results
    (match,) = result.matches
    assert match.match == "exact" and match.evidence.algorithm == "sha256"


@pytest.mark.parametrize("weak", ["crc32", "autov1", "autov2", "autov3"])
def test_weak_hashes_never_match(client, keys, flagged, weak):
    # An upload sharing only a truncated hash with a flagged model is a chance collision.
    item = {"sha256": secrets.token_hex(32), weak: flagged[weak]}
    (result,) = check(client, keys["reader"], item).results
    assert result.verdict == "clean" and result.matches == []


def test_results_are_in_order_one_per_item(client, keys, flagged):
    items = [{"sha256": secrets.token_hex(32)} for _ in range(999)]
    items.insert(500, {"content": flagged["content"]})
    results = check(client, keys["reader"], *items).results
    assert [r.index for r in results] == list(range(1000))
    assert [r.verdict for r in results].count("match") == 1
    assert results[500].verdict == "match"


def test_a_batch_repeating_one_flagged_item_matches_each_time(client, keys, flagged):
    results = check(client, keys["reader"], *[{"sha256": flagged["sha256"]}] * 3).results
    assert [r.verdict for r in results] == ["match"] * 3


def test_revoked_flags_are_listed_but_do_not_match(client, keys, flagged):
    r = client.post(
        f"/v1/flags/{flagged['id']}/revoke",
        json={"reason": "wrong file"},
        headers=auth(keys["admin"]),
    )
    assert r.status_code == 200
    (result,) = check(client, keys["reader"], {"sha256": flagged["sha256"]}).results
    assert result.verdict == "clean"
    assert [m.status for m in result.matches] == ["revoked"]


def test_disputed_flags_still_match_and_say_so(client, keys, flagged):
    r = client.post(
        f"/v1/flags/{flagged['id']}/dispute",
        json={"reason": "looks like the base"},
        headers=auth(keys["submitter2"]),
    )
    assert r.status_code == 200
    (result,) = check(client, keys["reader"], {"sha256": flagged["sha256"]}).results
    assert result.verdict == "match" and result.matches[0].status == "disputed"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"items": []}, "at least 1"),
        ({"items": [{"sha256": "00" * 32}] * 1001}, "at most 1000"),
        ({"items": [{"crc32": "85114a0d"}]}, "no strong hash"),
        ({"items": [{}]}, "no strong hash"),
        ({"items": [{"sha256": "zz"}]}, "not hexadecimal"),
        ({"items": [{"sha256": "ab" * 16}]}, "expected 64"),
        ({"items": [{"sha265": "ab" * 32}]}, "sha265"),
        ({"items": [{"sha256": 12}]}, "string"),
        ({"fingerprints": []}, "items"),
        ([1, 2], "valid dictionary"),
    ],
)
def test_bad_requests_are_422_with_a_reason(client, keys, body, needle):
    r = client.post("/v1/check", json=body, headers=auth(keys["reader"]))
    assert r.status_code == 422, r.text
    assert needle in r.text


def test_broken_json_is_a_4xx(client, keys):
    r = client.post(
        "/v1/check",
        content=b'{"items": [',
        headers={**auth(keys["reader"]), "content-type": "application/json"},
    )
    assert r.status_code == 422
    assert "JSON" in r.text


def test_a_sketch_leaves_the_exact_answer_alone_and_must_be_valid(client, keys, flagged):
    sketch = Sketch("model", {"unet:x": TensorSketch("unet:x", (64, 64), np.ones((K, K)))})
    (result,) = check(
        client, keys["reader"], {"sha256": flagged["sha256"], "sketch": encode_sketch(sketch)}
    ).results
    assert result.verdict == "match" and [m.match for m in result.matches] == ["exact"]
    r = client.post(
        "/v1/check",
        json={"items": [{"sha256": flagged["sha256"], "sketch": "AAAA"}]},
        headers=auth(keys["reader"]),
    )
    assert r.status_code == 422 and "not a modelhash sketch" in r.text
