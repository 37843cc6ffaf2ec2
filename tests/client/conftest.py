"""Client fixtures: tiny models, a CLI runner, and the real registry on loopback."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import save_file

from modelhash._cli import cli as app
from tests.fingerprint.conftest import tiny_state_dict
from tests.utils.registry import stop, wait_ready

_SCRIPT = Path(sys.executable).with_name("modelhash")
MODELHASH = (
    [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "modelhash._cli"]
)
_seeds = itertools.count(1000)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any MODELHASH_ or HF_ setting of the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELHASH_", "HF_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("MODELHASH_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MODELHASH_CACHE", str(tmp_path / "mirror-cache"))


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """Write a new, distinct tiny safetensors model and return its path."""

    def make(name: str | None = None, seed: int | None = None) -> Path:
        seed = next(_seeds) if seed is None else seed
        path = tmp_path / (name or f"model-{seed}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tiny_state_dict(seed), str(path))
        return path

    return make


@dataclass
class Cli:
    """Runs ``modelhash`` in-process against a registry."""

    env: dict[str, str]

    def __call__(self, *args: str | Path, input: str | None = None, **env: str) -> Result:
        runner = CliRunner()
        return runner.invoke(app, [str(a) for a in args], input=input, env={**self.env, **env})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveRegistry:
    """``modelhash serve`` in a subprocess, with one key per role."""

    url: str
    admin: str
    submitter: str
    reader: str
    proc: subprocess.Popen[bytes]
    log: Path

    def cli(self, key: str | None = None) -> Cli:
        env = {"MODELHASH_REGISTRY": self.url}
        if key is not None:
            env["MODELHASH_API_KEY"] = key
        return Cli(env)


def _key(db: str, role: str, cwd: Path) -> str:
    out = subprocess.run(
        [*MODELHASH, "keys", "create", "--role", role, "--db", db, "--create"],
        cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120, check=True,
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def live_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRegistry]:
    """The real server on a free loopback port with a temporary SQLite database."""
    folder = tmp_path_factory.mktemp("live-registry")
    db = f"sqlite:///{folder / 'registry.db'}"
    keys = {role: _key(db, role, folder) for role in ("admin", "submitter", "reader")}
    port = free_port()
    log = folder / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*MODELHASH, "serve", "--db", db, "--host", "127.0.0.1", "--port", str(port)],
            cwd=folder, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield LiveRegistry(url, keys["admin"], keys["submitter"], keys["reader"], proc, log)
    finally:
        stop(proc)
