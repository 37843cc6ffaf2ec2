"""The container kit, checked without a container engine (none runs in CI here).

The image itself is built and started by hand before a release: see
docs/registry.md, "Production", for the commands and what each must show.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_is_slim_and_runs_as_a_non_root_user():
    steps = instructions()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms[-1].endswith("-slim")
    users = [rest for word, rest in steps if word == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    assert int(users[-1].split(":")[0]) >= 1000
    (cmd,) = [json.loads(rest) for word, rest in steps if word == "CMD"]
    line = " ".join(cmd)
    assert "--factory modelhash.registry.app:create_app" in line and "--proxy-headers" in line
    assert "PROMETHEUS_MULTIPROC_DIR" in line  # emptied at each start
    assert any(word == "HEALTHCHECK" and "/healthz" in rest for word, rest in steps)
    copied = [rest.split()[0] for word, rest in steps if word == "COPY" and "--from" not in rest]
    assert "tests" not in copied and "." not in copied


def test_compose_runs_migrations_before_the_registry_on_postgresql():
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert services["db"]["image"].startswith("postgres:")
    assert services["migrate"]["command"] == ["modelhash", "db", "upgrade"]
    registry = services["registry"]
    assert registry["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    env = registry["environment"]
    assert env["MODELHASH_DATABASE_URL"].startswith("postgresql://")
    assert env["MODELHASH_SIGNING_KEY_FILE"].startswith("/run/secrets/")
    assert registry["read_only"] is True
    assert all(p.startswith("127.0.0.1:") for p in registry["ports"])
