"""Packaging: the migrations ship inside the wheel, and the client never loads the server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from registry._migrations import head_revision

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("client", "registry")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"] == {"registry._alembic": "alembic"}
    assert not (ROOT / "alembic" / "__init__.py").exists()  # it would shadow the library


def test_client_wire_and_export_load_no_server_modules():
    code = (
        "import json, sys\n"
        "import client.wire, client._export\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not loaded & {"registry", "fastapi", "sqlmodel", "sqlalchemy", "alembic", "uvicorn"}


def test_a_built_wheel_migrates_from_any_directory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("client", "registry", "alembic"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("modelhash\n")
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = dist.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "registry/_alembic/env.py",
        "registry/_alembic/script.py.mako",
        "registry/_alembic/versions/0001_initial.py",
        "registry/py.typed",
        "client/wire.py",
    ):
        assert needed in names
    assert not any(n.startswith("alembic/") for n in names)

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import registry, registry._migrations as m\n"
        "print(registry.__file__)\n"
        "print(m.script_location())\n"
        "print(m.upgrade('sqlite:///fresh.db'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert out[2] == head_revision()
    assert (elsewhere / "fresh.db").exists()
