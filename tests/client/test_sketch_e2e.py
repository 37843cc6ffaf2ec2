"""End to end: ``bases add``, ``flag`` and ``check`` send sketches; derivatives match."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np

from modelhash import RegistryClient
from modelhash.fingerprint import fingerprint_path
from tests.client.conftest import LiveRegistry
from tests.utils.sketch_models import base_model, cast, lora, plus, random_delta, write


def test_cli_finds_derivatives_through_sketches(
    live_registry: LiveRegistry, tmp_path: Path
) -> None:
    reader = live_registry.cli(live_registry.reader)
    submitter = live_registry.cli(live_registry.submitter)
    admin = live_registry.cli(live_registry.admin)
    b = base_model(1000)
    df, dg = random_delta(b, 1001), random_delta(b, 1002)
    adapter, ldelta = lora(b, 1003)
    paths = {
        name: write(tmp_path, name, sd)
        for name, sd in {
            "base": b,
            "f": plus(b, (1.0, df)),
            "f16": cast(plus(b, (1.0, df))),
            "merge": plus(b, (0.5, df), (0.5, dg)),
            "g": plus(b, (1.0, dg)),
            "lora": adapter,
            "baked": plus(b, (1.0, ldelta)),
            "public_lora": lora(b, 1004)[0],
        }.items()
    }
    name = f"e2e-base-{uuid.uuid4().hex[:6]}"
    out = admin("bases", "add", paths["base"], "--name", name)
    assert out.exit_code == 0, out.stderr
    # A public adapter is registered the same way, as a reference adapter.
    out = admin("bases", "add", paths["public_lora"], "--name", f"{name}-public-lora", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["name"] == f"{name}-public-lora"
    assert json.loads(out.stdout)["sketch_kind"] == "lora"
    out = admin("bases", "list")
    assert out.exit_code == 0, out.stderr
    assert f"{name}-public-lora  (reference adapter)" in out.stdout
    assert f"{name}\n" in out.stdout  # the base itself, unmarked
    for flagged in ("f", "lora"):
        out = submitter("flag", paths[flagged], "--category", "other", "--json")
        assert out.exit_code == 0, out.stderr

    out = reader("check", "--json", paths["f16"], paths["merge"], paths["g"], paths["baked"],
                 paths["base"])
    assert out.exit_code == 1, out.stderr
    results = json.loads(out.stdout)["results"]
    assert [r["verdict"] for r in results] == ["match", "match", "clean", "match", "clean"]
    kinds = [r["matches"][0]["match"] if r["matches"] else None for r in results]
    assert kinds == ["near-duplicate", "derived", None, "lora-baked", None]
    evidence = results[0]["matches"][0]["evidence"]
    assert evidence["layer"] == "sketch" and evidence["base"] == name
    assert evidence["tensors_compared"] == 8
    assert "sketch" not in results[0]["fingerprint"]

    out = reader("check", "--json", "--layers", "exact", paths["f16"])
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["results"][0]["verdict"] == "clean"

    # The SDK sends the sketch of a fingerprint computed with every layer.
    (o,) = fingerprint_path(paths["merge"], layers="all")
    assert o.fingerprint is not None
    with RegistryClient(live_registry.url, api_key=live_registry.reader) as sdk:
        (r,) = sdk.check([o.fingerprint])
    assert r.verdict == "match" and r.matches[0].match == "derived"


def test_cli_finds_a_disguised_copy_of_a_flag_filed_without_a_base(
    live_registry: LiveRegistry, tmp_path: Path
) -> None:
    """No base is registered for this architecture: the flag is stored raw, and its
    copy with its units and heads permuted, its residual stream rotated and cast to
    float16 is found on the invariant layer through ``modelhash check``; a sibling
    changed the same way is not."""
    from tests.utils.invariant_models import llama, permute, rotate

    def disguised(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return cast(rotate(permute(sd, 7)[0], 8)[0])

    reader = live_registry.cli(live_registry.reader)
    submitter = live_registry.cli(live_registry.submitter)
    b = llama(1100, d=36, f=100)
    f, g = plus(b, (1.0, random_delta(b, 1101))), plus(b, (1.0, random_delta(b, 1102)))
    paths = {
        "f": write(tmp_path, "f", f),
        "f-all16": write(tmp_path, "f-all16", disguised(f)),
        "g-all16": write(tmp_path, "g-all16", disguised(g)),
    }
    out = submitter("flag", paths["f"], "--category", "other", "--json")
    assert out.exit_code == 0, out.stderr
    flag_id = json.loads(out.stdout)["id"]
    out = reader("check", "--json", paths["f-all16"], paths["g-all16"])
    assert out.exit_code == 1, out.stderr
    results = json.loads(out.stdout)["results"]
    assert [r["verdict"] for r in results] == ["match", "clean"]
    (m,) = results[0]["matches"]
    assert m["flag_id"] == flag_id and m["match"] == "near-duplicate"
    assert m["evidence"]["layer"] == "invariant" and m["evidence"]["invariant"] is True
