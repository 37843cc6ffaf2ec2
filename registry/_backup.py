"""Online backup of an SQLite registry, safe while the server runs.

SQLite's backup API copies a consistent snapshot page by page while writers go on
(WAL mode), which copying the file cannot do: a copied file may miss the WAL or
catch a write half done. The copy is created with mode 0600, like the database.
PostgreSQL is backed up with its own tools (``pg_dump``); see docs/registry.md.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy.engine.url import make_url

from modelhash.registry._settings import normalise_database_url
from modelhash.registry.errors import ConfigurationError

__all__ = ["backup_sqlite"]


def backup_sqlite(database_url: str, destination: Path) -> Path:
    """Copy the SQLite database at ``database_url`` to a new file ``destination``."""
    url = make_url(normalise_database_url(database_url))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        raise ConfigurationError("backup_sqlite needs an SQLite file database")
    source = Path(str(url.database))
    if not source.is_file():
        raise ConfigurationError(f"{source}: no such database")
    try:
        os.close(os.open(destination, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise ConfigurationError(f"{destination}: cannot create: {exc.strerror}") from None
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(destination)
    try:
        src.backup(dst, pages=1024)
    finally:
        dst.close()
        src.close()
    return destination
