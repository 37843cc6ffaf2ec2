"""Files that hold secrets are the owner's only: the SQLite database and key files."""

from __future__ import annotations

import os
import stat

import pytest
from fastapi.testclient import TestClient

from modelhash.registry._db import make_engine
from modelhash.registry._migrations import upgrade
from modelhash.registry._settings import Settings
from modelhash.registry._signing import read_key_file, write_key_file
from modelhash.registry.app import create_app
from modelhash.registry.errors import ConfigurationError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_sqlite_database_and_its_wal_are_0600(tmp_path, open_umask):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    app = create_app(Settings(database_url=url))
    with TestClient(app) as c:
        assert c.get("/v1/export/public-key").status_code == 200  # stores the signing key
    for name in os.listdir(tmp_path):
        if name.startswith("registry.db"):
            assert mode(tmp_path / name) == 0o600, name


def test_an_existing_readable_database_is_narrowed(tmp_path, open_umask):
    path = tmp_path / "old.db"
    path.write_bytes(b"")
    path.chmod(0o644)
    make_engine(f"sqlite:///{path}").dispose()
    assert mode(path) == 0o600


def test_key_files_are_made_private_and_readable_ones_refused(tmp_path, open_umask):
    path = tmp_path / "signing.pem"
    kid = write_key_file(path)
    assert mode(path) == 0o600 and len(kid) == 16
    assert read_key_file(path).startswith(b"-----BEGIN PRIVATE KEY-----")
    with pytest.raises(ConfigurationError):
        write_key_file(path)  # never over an existing file
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        read_key_file(path)
    path.chmod(0o640)  # a secret mounted for a group is fine
    assert read_key_file(path)
