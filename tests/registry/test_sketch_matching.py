"""The sketch layer in the registry: derivatives and carriers match, innocents do not.

Every sketch is computed by the client from a real (small) safetensors file: a base
with a few attention matrices, fine-tunes of it (base plus a dense delta of 2 %),
casts, merges, kohya LoRAs and the base with a LoRA baked in.
"""

from __future__ import annotations

import base64
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import col, select

from modelhash.fingerprint import Sketch, TensorSketch, fingerprint_path
from modelhash.fingerprint._project import K
from modelhash.registry._db import session_scope
from modelhash.registry.crud.sketches import SIG_BYTES, SharedDirections
from modelhash.registry.models import SketchBand, SketchRow, SketchSignature
from modelhash.wire import MAX_SKETCH_BYTES, CheckResponse, decode_sketch, encode_sketch
from tests.utils.registry import auth, flag_body, random_fingerprint
from tests.utils.sketch_models import (
    MODULES,
    base_model,
    cast,
    lora,
    lora_resaved,
    lora_sum,
    plus,
    random_delta,
    sketch_of,
    write,
)


@dataclass(frozen=True)
class Model:
    """One model file: its flat fingerprint map and its wire sketch."""

    fingerprint: dict[str, str]
    sketch: str

    def item(self) -> dict[str, str]:
        return {**self.fingerprint, "sketch": self.sketch}


def _model(folder: Path, name: str, sd: dict[str, np.ndarray]) -> Model:
    (o,) = fingerprint_path(write(folder, name, sd), layers="all")
    assert o.fingerprint is not None and o.fingerprint.sketch is not None
    return Model(o.fingerprint.summary(), encode_sketch(o.fingerprint.sketch))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    folder = tmp_path_factory.mktemp("sketch-models")
    b = base_model(0)
    df, dg = random_delta(b, 1), random_delta(b, 2)
    dh, dj = random_delta(b, 3), random_delta(b, 4)
    adapter, ldelta = lora(b, 5)
    other, odelta = lora(b, 6)
    stranger = base_model(50)
    sds = {
        "base": b,
        "base16": cast(b),
        "f": plus(b, (1.0, df)),
        "f16": cast(plus(b, (1.0, df))),
        "f_further": plus(b, (1.0, df), (0.3, random_delta(b, 7))),
        "merge": plus(b, (0.5, df), (0.5, dg)),
        "g": plus(b, (1.0, dg)),
        "h": plus(b, (1.0, dh)),
        "h16": cast(plus(b, (1.0, dh))),
        "j": plus(b, (1.0, dj)),
        "j16": cast(plus(b, (1.0, dj))),
        "lora": adapter,
        "lora_resaved": lora_resaved(adapter, 3),
        "baked": plus(b, (1.0, ldelta)),
        "baked_on_g": plus(b, (1.0, dg), (1.0, ldelta)),
        "other_lora": other,
        "other_baked": plus(b, (1.0, odelta)),
        "random": base_model(99),
        "stranger": stranger,
        "stranger16": cast(stranger),
    }
    return {name: _model(folder, name, sd) for name, sd in sds.items()}


@dataclass(frozen=True)
class World:
    base_name: str
    flags: dict[str, str]


def _flag(client: TestClient, key: str, m: Model, **fields: Any) -> str:
    r = client.post(
        "/v1/flags", json=flag_body(m.fingerprint, sketch=m.sketch, **fields), headers=auth(key)
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.fixture(scope="module")
def world(client: TestClient, keys: dict[str, str], models: dict[str, Model]) -> World:
    """One base and its flags, in the session's database of this backend."""
    name = f"tiny-unet-{uuid.uuid4().hex[:8]}"
    r = client.post(
        "/v1/bases",
        json={"name": name, "fingerprint": models["base"].fingerprint,
              "sketch": models["base"].sketch},
        headers=auth(keys["admin"]),
    )
    assert r.status_code == 201, r.text
    sub = keys["submitter"]
    flags = {n: _flag(client, sub, models[n]) for n in ("f", "lora", "h", "j", "stranger")}
    r = client.post(f"/v1/flags/{flags['h']}/revoke", json={"reason": "wrong model"},
                    headers=auth(keys["admin"]))
    assert r.status_code == 200, r.text
    r = client.post(f"/v1/flags/{flags['j']}/dispute", json={"reason": "not sure"},
                    headers=auth(keys["submitter2"]))
    assert r.status_code == 200, r.text
    return World(name, flags)


def _check(client: TestClient, key: str, *items: dict[str, str]) -> CheckResponse:
    r = client.post("/v1/check", json={"items": list(items)}, headers=auth(key))
    assert r.status_code == 200, r.text
    return CheckResponse.model_validate(r.json())


def _verdict(client: TestClient, keys: dict[str, str], m: Model) -> tuple[str, list[Any]]:
    (result,) = _check(client, keys["reader"], m.item()).results
    return result.verdict, result.matches


def _matched(client: TestClient, keys: dict[str, str], m: Model, *flag_ids: str) -> dict[str, str]:
    """The match types of ``m`` against these flags only (flag id -> type)."""
    _, matches = _verdict(client, keys, m)
    return {x.flag_id: x.match for x in matches if x.flag_id in flag_ids}


def test_flags_are_stored_as_deltas_from_the_nearest_base(world, engine: Engine):
    with session_scope(engine) as session:
        rows = {
            r.owner_id: r
            for r in session.exec(
                select(SketchRow).where(SketchRow.owner_type == "flag")
            )
        }
        f, adapter, stranger = (rows[world.flags[n]] for n in ("f", "lora", "stranger"))
        sigs = {
            s.sketch_id: s
            for s in session.exec(
                select(SketchSignature).where(
                    col(SketchSignature.sketch_id).in_([f.id, adapter.id, stranger.id])
                )
            )
        }
        bands = session.exec(select(SketchBand).where(SketchBand.sketch_id == stranger.id)).all()
    assert f.kind == "delta" and f.base_id is not None
    assert sigs[f.id].base_id == f.base_id and len(sigs[f.id].signature) == SIG_BYTES
    assert sigs[f.id].norm > 0 and sigs[f.id].modules is None
    assert adapter.kind == "lora" and adapter.base_id == f.base_id and adapter.id in sigs
    assert sigs[adapter.id].modules is not None and len(sigs[adapter.id].modules) == 32
    assert stranger.kind == "model" and stranger.base_id is None and stranger.id not in sigs
    assert len(bands) == 16
    assert Sketch.from_bytes(f.blob).kind == "delta"


@pytest.mark.parametrize(
    ("upload", "flag", "kinds"),
    [
        ("f16", "f", {"near-duplicate"}),
        ("f_further", "f", {"derived", "near-duplicate"}),
        ("merge", "f", {"derived"}),
        ("lora_resaved", "lora", {"lora"}),
        ("baked", "lora", {"lora-baked"}),
        ("baked_on_g", "lora", {"lora-baked"}),
        ("stranger16", "stranger", {"near-duplicate"}),
    ],
)
def test_derivatives_and_carriers_match(client, keys, models, world, upload, flag, kinds):
    verdict, matches = _verdict(client, keys, models[upload])
    assert verdict == "match", matches
    (m,) = matches
    assert m.flag_id == world.flags[flag] and m.match in kinds
    assert m.status == "active" and m.category == "csam" and 0 < m.score <= 1.0001
    evidence = m.evidence.model_dump()
    assert evidence["layer"] == "sketch" and evidence["tensors_compared"] >= 0
    if flag != "stranger":
        assert evidence["base"] == world.base_name and evidence["tensors_compared"] >= 4


@pytest.mark.parametrize(
    "upload", ["base", "base16", "g", "other_lora", "other_baked", "random"]
)
def test_innocents_are_clean(client, keys, models, world, upload):
    verdict, matches = _verdict(client, keys, models[upload])
    assert (verdict, matches) == ("clean", [])


def test_revoked_flags_never_match_and_disputed_ones_do(client, keys, models, world):
    assert _verdict(client, keys, models["h16"]) == ("clean", [])
    verdict, (m,) = _verdict(client, keys, models["j16"])
    assert verdict == "match" and m.flag_id == world.flags["j"] and m.status == "disputed"


def test_exact_matches_come_first_and_are_unchanged(client, keys, models, world):
    verdict, (m,) = _verdict(client, keys, models["f"])
    assert verdict == "match" and m.match == "exact" and m.evidence.layer == "file"
    # Without the sketch, the fp16 cast is unknown: only the sketch layer finds it.
    (r,) = _check(client, keys["reader"], models["f16"].fingerprint).results
    assert r.verdict == "clean"


def test_a_batch_mixes_sketch_and_hash_answers_in_order(client, keys, models, world):
    items = [models[n].item() for n in ("g", "merge", "base", "baked")]
    results = _check(client, keys["reader"], *items).results
    assert [r.verdict for r in results] == ["clean", "match", "clean", "match"]


def test_a_near_duplicate_of_a_base_cannot_be_flagged_unless_forced(
    client, keys, models, world
):
    m = models["base16"]
    r = client.post("/v1/flags", json=flag_body(m.fingerprint, sketch=m.sketch),
                    headers=auth(keys["submitter"]))
    assert r.status_code == 409 and world.base_name in r.json()["detail"]
    r = client.post("/v1/flags", json=flag_body(m.fingerprint, sketch=m.sketch, force=True),
                    headers=auth(keys["submitter"]))
    assert r.status_code == 403
    # An admin may force it; then the base's casts match it, as they should.
    r = client.post("/v1/flags", json=flag_body(m.fingerprint, sketch=m.sketch, force=True),
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    forced = r.json()["id"]
    r = client.post(f"/v1/flags/{forced}/revoke", json={"reason": "test over"},
                    headers=auth(keys["admin"]))
    assert r.status_code == 200
    assert _verdict(client, keys, models["base"]) == ("clean", [])


def test_reflagging_is_still_idempotent(client, keys, models, world):
    m = models["f"]
    r = client.post("/v1/flags", json=flag_body(m.fingerprint, sketch=m.sketch),
                    headers=auth(keys["submitter2"]))
    assert r.status_code == 200 and r.json()["id"] == world.flags["f"]


def test_a_bad_stored_blob_is_skipped_not_a_crash(client, keys, models, world, engine):
    r = client.post("/v1/flags", json=flag_body(random_fingerprint()),
                    headers=auth(keys["submitter"]))
    assert r.status_code == 201
    broken = r.json()["id"]
    with session_scope(engine) as session:
        good = session.exec(
            select(SketchRow).where(SketchRow.owner_id == world.flags["f"])
        ).one()
        sig = session.get(SketchSignature, good.id)
        assert sig is not None and good.base_id is not None
        for blob, signature in ((b"MHSK\x01\x01not zlib", sig.signature),
                                (b"MHSK\x01\x00\x05", sig.signature),
                                (good.blob, b"short")):
            row = SketchRow(owner_type="flag", owner_id=broken, algorithm=good.algorithm,
                            kind="delta", base_id=good.base_id, tensors=1, blob=blob)
            session.add(row)
            session.flush()
            assert row.id is not None
            session.add(SketchSignature(sketch_id=row.id, base_id=good.base_id,
                                        signature=signature, norm=sig.norm))
        session.commit()
    verdict, matches = _verdict(client, keys, models["f16"])
    assert verdict == "match" and [m.flag_id for m in matches] == [world.flags["f"]]


def _blob(sketch: Sketch) -> str:
    return base64.b64encode(sketch.to_bytes()).decode()


def _tiny(kind: str = "model", algorithm: str | None = None) -> Sketch:
    t = TensorSketch("unet:x", (64, 64), np.ones((K, K)))
    s = Sketch(kind, {"unet:x": t})
    if algorithm is not None:
        s.algorithm = algorithm
    return s


_BOMB = base64.b64encode(
    b"MHSK" + struct.pack("<BB", 1, 1) + zlib.compress(b"\0" * (40 * 1024 * 1024), 9)
).decode()

BAD_SKETCHES = [
    pytest.param("not base64!", "base64", id="bad-base64"),
    pytest.param("QUJD", "not a modelhash sketch", id="not-a-sketch"),
    pytest.param(base64.b64encode(b"MHSK\x01\x01garbage").decode(), "corrupt", id="bad-zlib"),
    pytest.param(_blob(_tiny()) [:-8] + "AAAAAAA=", "sketch", id="truncated"),
    pytest.param(_blob(_tiny(algorithm="sketch-gaussian-k16-v9")), "algorithm", id="algorithm"),
    pytest.param(_blob(_tiny("delta")), "kind", id="delta-kind"),
    pytest.param(_blob(Sketch("model", {})), "no tensors", id="empty"),
    pytest.param(_BOMB, "larger than", id="zip-bomb"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_SKETCHES)
def test_bad_sketches_are_422_everywhere(client, keys, text, needle):
    fp = random_fingerprint()
    for path, body, key in (
        ("/v1/check", {"items": [{"sha256": fp["sha256"], "sketch": text}]}, "reader"),
        ("/v1/flags", flag_body(fp, sketch=text), "submitter"),
        ("/v1/bases", {"name": uuid.uuid4().hex, "fingerprint": fp, "sketch": text}, "admin"),
    ):
        r = client.post(path, json=body, headers=auth(keys[key]))
        assert r.status_code == 422, (path, r.text)
        assert needle in r.text, (path, r.text)


def test_a_base_sketch_must_be_a_model_or_an_adapter(client, keys):
    fp = random_fingerprint()
    r = client.post("/v1/bases", json={"name": uuid.uuid4().hex, "fingerprint": fp,
                                       "sketch": _blob(_tiny("delta"))},
                    headers=auth(keys["admin"]))
    assert r.status_code == 422 and "kind" in r.text


def test_oversized_sketches_are_refused():
    with pytest.raises(ValueError, match="larger than"):
        decode_sketch("A" * (4 * (MAX_SKETCH_BYTES // 3) + 8))


def _moved_factory(base: Sketch):
    def moved(*parts: tuple[float, int]) -> Sketch:
        out = {}
        for k, t in base.tensors.items():
            v = t.values.copy()
            for w, seed in parts:
                v = v + w * 0.02 * np.random.default_rng([seed, int(k[6:])]).standard_normal((K, K))
            out[k] = TensorSketch(k, t.shape, v)
        return Sketch("model", out)
    return moved


def _base_sketch(tensors: int = 60, seed: int = 7) -> Sketch:
    rng = np.random.default_rng(seed)
    shapes = [(320, 320), (640, 320), (1280, 640)]
    return Sketch("model", {
        f"unet:b{i}": TensorSketch(f"unet:b{i}", shapes[i % 3], rng.standard_normal((K, K)))
        for i in range(tensors)
    })


def test_signatures_estimate_the_verifiers_cosine_and_coefficient():
    """The retrieval estimates track the pooled cosine and coefficient the verifier computes."""
    from modelhash.fingerprint import compare, delta_sketch
    from modelhash.registry.crud._stacked import pooled_cosine, stack_blob, stack_sketch
    from modelhash.registry.crud.sketches import SIG_BITS, BankView, estimate, signature

    base = _base_sketch()
    moved = _moved_factory(base)
    flagged = delta_sketch(moved((1.0, 1)), base)[0]
    sig_f = signature(flagged, base)
    assert sig_f is not None and len(sig_f.bits) == SIG_BITS // 8 and sig_f.norm > 0
    bank = BankView(sig_f.words()[None, :], np.array([sig_f.norm], np.float32),
                    np.array([1], np.int64))
    for alpha in (1.0, 0.7, 0.5, 0.3, 0.0):
        up_model = moved((alpha, 1), (1 - alpha, 2))
        up = delta_sketch(up_model, base)[0]
        sig_u = signature(up, base)
        assert sig_u is not None
        exact = pooled_cosine(stack_sketch(up), stack_blob(flagged.to_bytes()),
                              stack_sketch(base))
        verdict = compare(up_model, flagged, base)
        assert verdict.cosine is not None and abs(verdict.cosine - exact) < 1e-3
        est = float(estimate(bank.bits, sig_u)[0])
        # 60 tensors x 256 values: a standard error near 0.03 at these cosines.
        assert abs(est - exact) < 0.12, (alpha, exact, est)
        assert verdict.coefficient is not None
        coef = est * sig_u.norm / sig_f.norm
        assert abs(coef - verdict.coefficient) < 0.15, (alpha, verdict.coefficient, coef)


def test_signatures_of_unrelated_deltas_are_near_zero():
    """Unrelated deltas estimate cosine 0 with the standard error the floor assumes."""
    from modelhash.fingerprint import delta_sketch
    from modelhash.registry.crud.sketches import FLOOR, SIG_BITS, estimate, signature

    base = _base_sketch(tensors=200)
    moved = _moved_factory(base)
    sigs = [signature(delta_sketch(moved((1.0, 100 + i)), base)[0], base) for i in range(60)]
    assert all(s is not None for s in sigs)
    bits = np.stack([s.words() for s in sigs if s is not None])
    est = np.concatenate([estimate(bits[i + 1 :], s) for i, s in enumerate(sigs[:-1]) if s])
    expected = np.pi / (2 * np.sqrt(SIG_BITS))
    assert abs(float(est.mean())) < 0.01
    assert 0.6 * expected < float(est.std()) < 1.5 * expected
    assert float(np.abs(est).max()) < 2 * FLOOR + 0.05


@pytest.mark.parametrize(
    ("parts", "label"),
    [
        (((0.3, 1), (0.7, 2)), "30/70 merge"),
        (((1.0, 1), (5.0, 2)), "whole delta plus an unrelated change 5x its size"),
    ],
)
def test_weak_matches_are_retrieved_among_many_unrelated_flags(parts, label):
    """At 100k unrelated flags on the base, the weakest accepted forms still reach the top-k.

    With the 256-float v1 signature the carrier (cosine 0.2) was found in 1 of these
    20 queries; the merge (cosine 0.39) in all 20.
    """
    from modelhash.fingerprint import compare, delta_sketch
    from modelhash.registry.crud.sketches import SIG_BITS, BankView, retrieve, signature

    base = _base_sketch(tensors=200)
    moved = _moved_factory(base)
    flagged = delta_sketch(moved((1.0, 1)), base)[0]
    sig_f = signature(flagged, base)
    assert sig_f is not None
    rng = np.random.default_rng(11)
    n = 100_000
    filler = rng.integers(0, 2**63, (n, SIG_BITS // 64), dtype=np.uint64)
    bits = np.concatenate([filler, sig_f.words()[None, :]])
    norms = np.full(n + 1, sig_f.norm, dtype=np.float32)
    ids = np.arange(n + 1, dtype=np.int64)
    bank = BankView(bits, norms, ids)
    found = 0
    for seed in range(20):
        up_model = moved((parts[0][0], 1), (parts[1][0], 1000 + seed))
        verdict = compare(up_model, flagged, base)
        assert verdict.cosine is not None and verdict.cosine < 0.45, label
        query = signature(delta_sketch(up_model, base)[0], base)
        assert query is not None
        found += n in retrieve(bank, query)
    assert found == 20, (label, found)


def test_flags_sketched_before_their_base_are_rebased_when_it_arrives(
    client: TestClient, keys: dict[str, str], tmp_path: Path, engine: Engine, world: World
):
    """Until the base exists, only near-duplicates match; registering it re-bases the flags.

    ``world`` registers another base of the same layout first, so the adapter is filed
    under that one and must be matched through the upload's nearest base.
    """
    b = base_model(300)
    df, dg = random_delta(b, 301), random_delta(b, 302)
    adapter, ldelta = lora(b, 303)
    ms = {name: _model(tmp_path, name, sd) for name, sd in {
        "base": b,
        "f": plus(b, (1.0, df)),
        "f16": cast(plus(b, (1.0, df))),
        "merge": plus(b, (0.5, df), (0.5, dg)),
        "lora": adapter,
        "baked_on_g": plus(b, (1.0, dg), (1.0, ldelta)),
        "g": plus(b, (1.0, dg)),
    }.items()}
    sub = keys["submitter"]
    f_id, l_id = _flag(client, sub, ms["f"]), _flag(client, sub, ms["lora"])

    def matched(name: str) -> dict[str, str]:
        return _matched(client, keys, ms[name], f_id, l_id)

    assert matched("f16") == {f_id: "near-duplicate"}
    assert matched("merge") == {} and matched("baked_on_g") == {}
    r = client.post("/v1/bases", json={"name": f"late-base-{uuid.uuid4().hex[:8]}",
                                       "fingerprint": ms["base"].fingerprint,
                                       "sketch": ms["base"].sketch},
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    base_id = r.json()["id"]
    assert matched("merge") == {f_id: "derived"}
    assert matched("baked_on_g") == {l_id: "lora-baked"}
    assert matched("f16") == {f_id: "near-duplicate"}
    assert matched("g") == {}
    with session_scope(engine) as session:
        rows = session.exec(select(SketchRow).where(col(SketchRow.owner_id).in_([f_id, l_id]))).all()
        f_rows = sorted((r.kind, r.base_id == base_id) for r in rows if r.owner_id == f_id)
        delta_row = next(r for r in rows if r.owner_id == f_id and r.kind == "delta")
        sig = session.get(SketchSignature, delta_row.id)
        l_rows = [r for r in rows if r.owner_id == l_id]
    # The raw row stays (append-only); a row relative to the new base is added. The
    # adapter, whose modules another base of this layout already had, was filed
    # under that one at flag time and matched through the upload's nearest base.
    assert f_rows == [("delta", True), ("model", False)]
    assert sig is not None and sig.base_id == base_id
    assert [(r.kind, r.base_id is not None and r.base_id != base_id) for r in l_rows] == [
        ("lora", True)
    ]


def _add_base(client: TestClient, keys: dict[str, str], m: Model, prefix: str) -> str:
    r = client.post("/v1/bases", json={"name": f"{prefix}-{uuid.uuid4().hex[:8]}",
                                       "fingerprint": m.fingerprint, "sketch": m.sketch},
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    assert r.json()["sketch_kind"] == decode_sketch(m.sketch).kind
    listed = client.get("/v1/bases", headers=auth(keys["reader"])).json()
    assert {b["id"]: b["sketch_kind"] for b in listed}[r.json()["id"]] == r.json()["sketch_kind"]
    return str(r.json()["id"])


def test_references_remove_what_innocent_fine_tunes_share(
    client: TestClient, keys: dict[str, str], tmp_path: Path
):
    """Fine-tunes that share a direction match each other until public ones are registered.

    Every fine-tune here is its own delta plus 0.8 of a common one, so two siblings
    sit at delta cosine 0.39 (coefficient 0.39), over the fine-tune thresholds. Six
    public fine-tunes registered as references teach the registry that direction.
    """
    b = base_model(400)
    common = random_delta(b, 401)
    own = {i: random_delta(b, 410 + i) for i in range(10)}
    ft = {i: plus(b, (1.0, own[i]), (0.8, common)) for i in own}
    ms = {name: _model(tmp_path, name, sd) for name, sd in {
        "base": b, "f": ft[0], "f16": cast(ft[0]), "g": ft[1], "h16": cast(ft[2]),
        "merge": plus(b, (0.5, own[0]), (0.5, own[1]), (0.8, common)),
        **{f"ref{i}": ft[4 + i] for i in range(6)},
    }.items()}
    _add_base(client, keys, ms["base"], "shared-ft-base")
    f_id = _flag(client, keys["submitter"], ms["f"])

    def matched(name: str) -> dict[str, str]:
        return _matched(client, keys, ms[name], f_id)

    assert matched("g") == {f_id: "derived"}  # the false match the references remove
    for i in range(6):
        _add_base(client, keys, ms[f"ref{i}"], "public-fine-tune")
    assert matched("g") == {} and matched("h16") == {}
    assert matched("merge") == {f_id: "derived"}
    assert matched("f16") == {f_id: "near-duplicate"}
    _, matches = _verdict(client, keys, ms["merge"])
    evidence = next(m.evidence for m in matches if m.flag_id == f_id)
    assert evidence.model_dump().get("shared_direction_removed") is True


def test_references_raise_the_thresholds_where_innocent_fine_tunes_are_alike(
    client: TestClient, keys: dict[str, str], tmp_path: Path
):
    """Fine-tunes of three tasks: same-task siblings stay alike after the references'
    mean is removed (delta cosine 0.3-0.45), which no single shared direction
    explains. The references show it (two of them per task), and the registry raises
    this base's thresholds above what they reach, so the sibling is clean while a
    copy and a 70/30 merge of the flagged fine-tune still match."""
    b = base_model(450)
    tasks = [random_delta(b, 451 + j) for j in range(3)]

    def ft(seed: int, task: int) -> dict[str, np.ndarray]:
        return plus(b, (1.0, random_delta(b, seed)), (0.8, tasks[task]))

    f, other = random_delta(b, 470), random_delta(b, 471)
    ms = {name: _model(tmp_path, name, sd) for name, sd in {
        "base": b, "f": plus(b, (1.0, f), (0.8, tasks[0])), "g": ft(472, 0),
        "f16": cast(plus(b, (1.0, f), (0.8, tasks[0]))),
        "merge": plus(b, (0.7, f), (0.56, tasks[0]), (0.3, other), (0.24, tasks[1])),
        **{f"ref{i}": ft(480 + i, i % 3) for i in range(6)},
    }.items()}
    _add_base(client, keys, ms["base"], "task-base")
    for i in range(6):
        _add_base(client, keys, ms[f"ref{i}"], "public-task-fine-tune")
    f_id = _flag(client, keys["submitter"], ms["f"])

    def matched(name: str) -> dict[str, str]:
        return _matched(client, keys, ms[name], f_id)

    assert matched("g") == {}
    assert matched("f16") == {f_id: "near-duplicate"}
    assert matched("merge") == {f_id: "derived"}


def test_reference_adapters_remove_what_innocent_adapters_share(
    client: TestClient, keys: dict[str, str], tmp_path: Path, engine: Engine
):
    """Adapters that share a direction: the same, with public adapters as references.

    Each adapter is its own rank-4 LoRA plus 1.3 of a common one (cosine 0.63 between
    two of them, over the adapter threshold of 0.6). A reference adapter is never a
    base: the flagged adapter stays filed under the model base, and a copy of a
    reference adapter cannot be flagged unless forced.
    """
    b = base_model(500)
    attn2 = [m for m in MODULES if "attn2" in m]
    common, cdelta = lora(b, 501, modules=attn2)
    parts = {i: lora(b, 510 + i, modules=attn2) for i in range(10)}
    adapters = {i: lora_sum((1.0, parts[i][0]), (1.3, common)) for i in parts}

    def baked(*ws: tuple[float, int]) -> dict[str, np.ndarray]:
        return plus(b, *((w, parts[i][1]) for w, i in ws),
                    (sum(w for w, _ in ws) * 1.3, cdelta))

    ms = {name: _model(tmp_path, name, sd) for name, sd in {
        "base": b, "l": adapters[0], "l_resaved": lora_resaved(adapters[0], 7),
        "other": adapters[1], "others_half": baked((0.5, 1), (0.5, 2)),
        "baked": baked((1.0, 0)), "mixed": baked((0.5, 0), (0.5, 1)),
        **{f"ref{i}": adapters[4 + i] for i in range(6)},
    }.items()}
    _add_base(client, keys, ms["base"], "shared-lora-base")
    l_id = _flag(client, keys["submitter"], ms["l"])

    def matched(name: str) -> dict[str, str]:
        return _matched(client, keys, ms[name], l_id)

    assert matched("other") == {l_id: "lora"}  # the false matches the references remove
    assert matched("others_half") == {l_id: "lora-baked"}
    refs = [_add_base(client, keys, ms[f"ref{i}"], "public-adapter") for i in range(6)]
    assert matched("other") == {} and matched("others_half") == {}
    assert matched("l_resaved") == {l_id: "lora"}
    assert matched("baked") == {l_id: "lora-baked"}
    assert matched("mixed") == {l_id: "lora-baked"}
    copy = _model(tmp_path, "ref0_resaved", lora_resaved(adapters[4], 9))
    r = client.post("/v1/flags", json=flag_body(copy.fingerprint, sketch=copy.sketch),
                    headers=auth(keys["submitter"]))
    assert r.status_code == 409 and "public-adapter" in r.json()["detail"], r.text
    r = client.post("/v1/flags", json=flag_body(copy.fingerprint, sketch=copy.sketch, force=True),
                    headers=auth(keys["admin"]))
    assert r.status_code == 201, r.text
    # A flagged adapter is filed under a model base (here the first one registered
    # with its layout), never under a reference adapter.
    with session_scope(engine) as session:
        rows = session.exec(select(SketchRow).where(
            col(SketchRow.owner_id).in_([l_id, r.json()["id"]]))).all()
    assert len(rows) == 2
    assert all(row.base_id is not None and row.base_id not in refs for row in rows)


def test_a_reference_teaches_only_the_base_it_was_registered_under(tmp_path: Path):
    """Public fine-tunes are samples for the base registered before them, not for each other."""
    b = base_model(600)
    common = random_delta(b, 601)
    sketches = {"base": sketch_of(write(tmp_path, "base", b))}
    for i in range(5):
        sketches[f"ref{i}"] = sketch_of(write(
            tmp_path, f"ref{i}", plus(b, (1.0, random_delta(b, 610 + i)), (0.8, common))))
    shared = SharedDirections({k: (k, s) for k, s in sketches.items()}, {})
    assert shared.get("base", "model") is not None
    # ref0's "derivatives" would be the foundation and its siblings: none count.
    assert shared.get("ref0", "model") is None
    assert shared.get("base", "lora") is None  # no reference adapters
    # With three public fine-tunes there are too few samples for a direction.
    three = SharedDirections({k: (k, sketches[k]) for k in ("base", "ref0", "ref1", "ref2")}, {})
    assert three.get("base", "model") is None


def test_a_partial_reference_is_not_taken_for_a_full_checkpoints_base(
    client: TestClient, keys: dict[str, str], tmp_path: Path, engine: Engine
):
    """UNet-only public fine-tunes must not become the base of a full flagged checkpoint.

    Measured over the tensors they share, the flagged model is closer to such a
    sibling than to its real base once its VAE is replaced; stored relative to the
    sibling, every other fine-tune of the base would look derived from it.
    """
    rng = np.random.default_rng(701)
    b = base_model(700)
    vae = {f"vae.decoder.up_blocks.0.resnets.{i}.conv1.weight":
           (rng.standard_normal((64, 64)) / 8).astype(np.float32) for i in range(4)}
    full = {**b, **vae}
    common = random_delta(b, 702)
    own = {i: random_delta(b, 710 + i) for i in range(8)}
    vae_ft = {k: v + (rng.standard_normal(v.shape) * 0.3 * np.abs(v).mean()).astype(np.float32)
              for k, v in vae.items()}
    ms = {name: _model(tmp_path, name, sd) for name, sd in {
        "base": full,
        "fv": {**plus(b, (1.0, own[0]), (0.8, common)), **vae_ft},
        "g": {**plus(b, (1.0, own[1]), (0.8, common)), **vae},
        "gv": {**plus(b, (1.0, own[1]), (0.8, common)), **vae_ft},
        **{f"ref{i}": plus(b, (1.0, own[2 + i]), (0.8, common)) for i in range(4)},
    }.items()}
    base_id = _add_base(client, keys, ms["base"], "full-base")
    refs = [_add_base(client, keys, ms[f"ref{i}"], "unet-only-fine-tune") for i in range(4)]
    fv_id = _flag(client, keys["submitter"], ms["fv"])
    with session_scope(engine) as session:
        row = session.exec(select(SketchRow).where(SketchRow.owner_id == fv_id)).one()
    assert row.kind == "delta" and row.base_id == base_id and row.base_id not in refs
    for name in ("g", "gv"):
        _, matches = _verdict(client, keys, ms[name])
        assert fv_id not in {m.flag_id for m in matches}, name


def test_a_shared_direction_that_cannot_be_computed_falls_back_to_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A failure there must not cost a check its candidates: the fixed thresholds apply."""
    import modelhash.registry.crud.sketches as sketches

    def broken(*_: object, **__: object) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(sketches, "shared_direction", broken)
    b = base_model(800)
    refs = {f"r{i}": (f"r{i}", sketch_of(write(tmp_path, f"r{i}", plus(b, (1.0, random_delta(b, 801 + i))))))
            for i in range(4)}
    shared = SharedDirections({"b": ("b", sketch_of(write(tmp_path, "b", b))), **refs}, {})
    assert shared.get("b", "model") is None
    assert "could not be computed" in caplog.text
