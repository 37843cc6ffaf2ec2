"""Packaging: one import name, a wheel that stands alone, migrations inside it.

The repository keeps three folders (client/, registry/, alembic/) that install as
``modelhash``, ``modelhash.registry`` and ``modelhash.registry._alembic``. These tests
build the real wheel and use it from a fresh virtual environment, in a folder that
has packages of its own named ``client`` and ``registry``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from modelhash.registry._migrations import head_revision

ROOT = Path(__file__).resolve().parents[1]
_TOPS = {"client": "modelhash", "registry": "modelhash.registry"}


def test_every_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join([_TOPS[p.relative_to(ROOT).parts[0]], *p.parent.relative_to(ROOT).parts[1:]])
        for top in _TOPS
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"] == {
        "modelhash": "client",
        "modelhash.registry": "registry",
        "modelhash.registry._alembic": "alembic",
    }
    assert not (ROOT / "alembic" / "__init__.py").exists()  # it would shadow the library


@pytest.mark.parametrize("name", ["client", "registry", "client.fingerprint"])
def test_the_folders_do_not_import_under_a_second_name(name: str) -> None:
    # From the repository root the folders are on sys.path; importing them by folder
    # name would give every module two identities (two Settings, two error classes).
    out = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "modelhash" in out.stderr.splitlines()[-1]


def test_client_wire_and_export_load_no_server_modules() -> None:
    code = (
        "import json, sys\n"
        "import modelhash.wire, modelhash._export\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "modelhash.registry" not in loaded
    assert not {m.split(".")[0] for m in loaded} & {
        "fastapi", "sqlmodel", "sqlalchemy", "alembic", "uvicorn", "huggingface_hub",
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("client", "registry", "alembic"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (built,) = dist.glob("*.whl")
    return built


def test_the_wheel_holds_one_top_level_name(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"modelhash"}
    for needed in (
        "modelhash/__main__.py",
        "modelhash/py.typed",
        "modelhash/wire.py",
        "modelhash/fingerprint/__init__.py",
        "modelhash/registry/py.typed",
        "modelhash/registry/_alembic/env.py",
        "modelhash/registry/_alembic/script.py.mako",
        "modelhash/registry/_alembic/versions/0001_initial.py",
        "modelhash/registry/ui/templates/base.html",
        "modelhash/registry/ui/static/vendor/htmx.min.js",
        "modelhash/registry/ui/static/vendor/swagger-ui-bundle.js",
    ):
        assert needed in names, needed


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding the wheel; its dependencies come from this interpreter's site.

    Only the wheel is installed into it: the ``.pth`` line appended below makes the
    running environment's third-party packages importable after the venv's own
    site-packages, without that environment's editable ``modelhash``, whose finder
    is only installed by a ``.pth`` file that a plain path entry does not process.
    """
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    (Path(site) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


@pytest.fixture()
def crowded_folder(tmp_path: Path) -> Path:
    """An empty project of a platform's own, with packages named client and registry."""
    for name in ("client", "registry"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'platform-{name}'\n")
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["MODELHASH_NO_PROGRESS"] = "1"
    return env


def test_the_wheel_imports_beside_a_platforms_own_client_and_registry(
    fresh_venv: Path, crowded_folder: Path
) -> None:
    code = (
        "import client, registry, modelhash, modelhash.fingerprint, modelhash.registry.app\n"
        "from modelhash import RegistryClient, AsyncRegistryClient, scan_upload, check_paths\n"
        "from modelhash.fingerprint import fingerprint_path\n"
        "assert client.OWNER == 'platform-client', client.__file__\n"
        "assert registry.OWNER == 'platform-registry', registry.__file__\n"
        "print(modelhash.__file__)\n"
    )
    out = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c", code],
        cwd=crowded_folder, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(fresh_venv))


def test_the_wheels_cli_runs_beside_a_platforms_own_packages(
    fresh_venv: Path, crowded_folder: Path
) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    model = crowded_folder / "m.safetensors"
    save_file({"w": np.ones((8, 8), dtype=np.float32)}, str(model))
    for argv in (
        [str(fresh_venv / "bin" / "modelhash")],
        [str(fresh_venv / "bin" / "python"), "-m", "modelhash"],
    ):
        version = subprocess.run(
            [*argv, "--version"], cwd=crowded_folder, env=_env(), capture_output=True,
            text=True, timeout=120,
        )
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip().endswith("0.1.0") or "modelhash" in version.stdout
        out = subprocess.run(
            [*argv, "fingerprint", "--json", "m.safetensors"], cwd=crowded_folder, env=_env(),
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["results"][0]["path"] == "m.safetensors"


def test_the_wheel_migrates_from_any_directory(fresh_venv: Path, tmp_path: Path) -> None:
    code = (
        "import modelhash.registry._migrations as m\n"
        "print(m.script_location())\n"
        "print(m.upgrade('sqlite:///fresh.db'))\n"
    )
    out = subprocess.run(
        [str(fresh_venv / "bin" / "python"), "-c", code],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    location, revision = out.stdout.splitlines()
    assert location.startswith(str(fresh_venv))
    assert revision == head_revision()
    assert (tmp_path / "fresh.db").exists()
