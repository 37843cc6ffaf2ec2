"""Exact lookups in any accepted form, and k-anonymity range queries with decoys."""

from __future__ import annotations

import secrets

import pytest

from modelhash.fingerprint import ALGORITHMS
from modelhash.registry._db import session_scope
from modelhash.registry.crud.flags import create_flag
from modelhash.registry.crud.keys import CLI
from modelhash.registry.crud.ranges import ROTATE
from modelhash.wire import FlagCreate
from tests.utils.registry import auth, flag_body, random_fingerprint


@pytest.fixture
def flagged(client, keys):
    fp = random_fingerprint()
    r = client.post("/v1/flags", json=flag_body(fp), headers=auth(keys["submitter"]))
    return {**fp, "id": r.json()["id"]}


def lookup(client, key, algorithm, value, status=200):
    r = client.get(f"/v1/hashes/{algorithm}/{value}", headers=auth(key))
    assert r.status_code == status, r.text
    return r.json()


@pytest.mark.parametrize(
    ("algorithm", "key", "transform"),
    [
        ("sha256", "sha256", str.upper),
        ("SHA256", "sha256", str.lower),
        ("content", "content", str.upper),
        ("content-blake3-v1", "content", str.lower),
        ("blake3", "blake3", str.lower),
        ("autov2", "autov2", str.upper),
        ("autov2", "sha256", str.upper),  # a full SHA-256 given as AutoV2 is cut to 10
        ("crc32", "crc32", str.upper),
        ("autov1", "autov1", str.lower),
        ("autov3", "autov3", str.lower),
    ],
)
def test_lookup_accepts_every_form(client, keys, flagged, algorithm, key, transform):
    result = lookup(client, keys["reader"], algorithm, transform(flagged[key]))
    assert [f["flag_id"] for f in result["flags"]] == [flagged["id"]]
    assert result["flagged"] is True
    assert set(result["flags"][0]) == {"flag_id", "category", "severity", "status"}
    weak = ALGORITHMS[result["algorithm"]].canonical_len < 64
    assert result["strength"] == ("weak" if weak else "strong")
    assert result["ambiguous"] is weak
    assert (result["note"] is not None) is weak


def test_a_weak_hash_shared_by_two_flags_lists_both(client, keys):
    crc = secrets.token_hex(4)
    ids = []
    for _ in range(2):
        r = client.post(
            "/v1/flags",
            json=flag_body(random_fingerprint(crc32=crc)),
            headers=auth(keys["submitter"]),
        )
        ids.append(r.json()["id"])
    result = lookup(client, keys["reader"], "crc32", crc)
    assert sorted(f["flag_id"] for f in result["flags"]) == sorted(ids)
    assert result["ambiguous"] is True and "chance" in result["note"]


def test_unflagged_and_revoked_lookups(client, keys, flagged):
    miss = lookup(client, keys["reader"], "sha256", secrets.token_hex(32))
    assert miss["flags"] == [] and miss["flagged"] is False
    client.post(
        f"/v1/flags/{flagged['id']}/revoke", json={"reason": "r"}, headers=auth(keys["admin"])
    )
    hit = lookup(client, keys["reader"], "sha256", flagged["sha256"])
    assert hit["flagged"] is False and hit["flags"][0]["status"] == "revoked"


@pytest.mark.parametrize(
    ("algorithm", "value", "needle"),
    [
        ("sha256", "xyz", "not hexadecimal"),
        ("sha256", "ab" * 16, "expected 64"),
        ("md5", "ab" * 16, "unknown hash algorithm"),
        ("crc32", "0x1234", "not hexadecimal"),
    ],
)
def test_malformed_lookups_are_400(client, keys, algorithm, value, needle):
    r = client.get(f"/v1/hashes/{algorithm}/{value}", headers=auth(keys["reader"]))
    assert r.status_code == 400 and needle in r.json()["detail"]


def test_range_hides_real_values_among_stable_decoys(client, keys, flagged):
    prefix = flagged["sha256"][:5]
    r = client.get(f"/v1/range/sha256/{prefix.upper()}", headers=auth(keys["reader"]))
    assert r.status_code == 200
    answer = r.json()
    assert answer["prefix"] == prefix and answer["algorithm"] == "sha256"
    values = answer["values"]
    assert len(values) == 64 and values == sorted(values) and len(set(values)) == 64
    assert flagged["sha256"] in values
    assert all(v.startswith(prefix) and len(v) == 64 for v in values)
    assert set(answer) == {"algorithm", "prefix", "values"}
    again = client.get(f"/v1/range/sha256/{prefix}", headers=auth(keys["reader"])).json()
    assert again["values"] == values
    # A prefix with nothing real has an answer of the same size.
    empty = client.get("/v1/range/content/fffff", headers=auth(keys["reader"])).json()
    assert len(empty["values"]) == 64


def test_range_for_weak_algorithms_and_revoked_flags(client, keys, flagged):
    crc = client.get(f"/v1/range/crc32/{flagged['crc32'][:5]}", headers=auth(keys["reader"])).json()
    assert flagged["crc32"] in crc["values"] and all(len(v) == 8 for v in crc["values"])
    client.post(
        f"/v1/flags/{flagged['id']}/revoke", json={"reason": "r"}, headers=auth(keys["admin"])
    )
    after = client.get(
        f"/v1/range/sha256/{flagged['sha256'][:5]}", headers=auth(keys["reader"])
    ).json()
    assert flagged["sha256"] not in after["values"] and len(after["values"]) == 64


def test_a_crowded_prefix_grows_to_the_next_power_of_two(client, keys, engine):
    prefix = secrets.token_hex(3)[:5]
    with session_scope(engine) as session:
        for _ in range(70):
            fp = {"sha256": prefix + secrets.token_hex(32)[5:]}
            create_flag(session, data=FlagCreate(category="other", fingerprint=fp), actor=CLI)
    values = client.get(f"/v1/range/sha256/{prefix}", headers=auth(keys["reader"])).json()["values"]
    assert len(values) == 128


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/v1/range/sha256/abcd", "exactly 5"),
        ("/v1/range/sha256/abcdef", "exactly 5"),
        ("/v1/range/sha256/abcdg", "exactly 5"),
        ("/v1/range/md5/abcde", "unknown hash algorithm"),
    ],
)
def test_bad_range_queries_are_400(client, keys, path, needle):
    r = client.get(path, headers=auth(keys["reader"]))
    assert r.status_code == 400 and needle in r.json()["detail"]


def _range(client, key, algorithm, prefix):
    r = client.get(f"/v1/range/{algorithm}/{prefix}", headers=auth(key))
    assert r.status_code == 200
    return r.json()["values"]


def test_sha256_and_autov2_answers_do_not_single_out_the_flagged_value(client, keys, flagged):
    prefix = flagged["sha256"][:5]
    sha = _range(client, keys["reader"], "sha256", prefix)
    auto = _range(client, keys["reader"], "autov2", prefix)
    assert flagged["autov2"] in auto and flagged["sha256"] in sha
    overlap = {v[:10] for v in sha} & set(auto)
    # Independent decoys overlapped on exactly the flagged value; now on all of them.
    assert overlap == set(auto) and len(overlap) == len(auto) == 64


def test_an_autov2_without_its_sha256_is_padded_consistently(client, keys):
    fp = random_fingerprint()
    weak_only = {"content": fp["content"], "autov2": secrets.token_hex(5)}
    r = client.post("/v1/flags", json=flag_body(weak_only), headers=auth(keys["submitter"]))
    assert r.status_code == 201
    prefix = weak_only["autov2"][:5]
    sha = _range(client, keys["reader"], "sha256", prefix)
    auto = _range(client, keys["reader"], "autov2", prefix)
    assert weak_only["autov2"] in auto
    assert {v[:10] for v in sha} == set(auto)


def test_a_new_flag_changes_many_values_of_a_polled_prefix(client, keys):
    first = random_fingerprint()
    prefix = first["sha256"][:5]
    before = set(_range(client, keys["reader"], "sha256", prefix))
    auto_before = set(_range(client, keys["reader"], "autov2", prefix))
    second = random_fingerprint(sha256=prefix + secrets.token_hex(32)[5:])
    second["autov2"] = second["sha256"][:10]
    r = client.post("/v1/flags", json=flag_body(second), headers=auth(keys["submitter"]))
    assert r.status_code == 201
    after = set(_range(client, keys["reader"], "sha256", prefix))
    auto_after = set(_range(client, keys["reader"], "autov2", prefix))
    new, gone = after - before, before - after
    assert second["sha256"] in new
    # Before, the diff was the real value alone: one in, one out.
    assert len(new) >= ROTATE and len(gone) >= ROTATE and len(after) == len(before)
    assert len(auto_after - auto_before) >= ROTATE
