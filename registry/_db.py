"""Engines, sessions and write transactions for SQLite and PostgreSQL.

An SQLite database file is created with mode 0600 (:func:`private_file`).

SQLite runs in WAL mode with ``synchronous=FULL`` (a committed flag survives a killed
process), ``foreign_keys`` on and a busy timeout. pysqlite's own transaction
handling is switched off so that every transaction is an explicit ``BEGIN``: reads
get a consistent snapshot, and writes take ``BEGIN IMMEDIATE`` so two writers never
deadlock upgrading their locks.

Writers are serialised on both backends (``BEGIN IMMEDIATE`` on SQLite, a
transaction-scoped advisory lock on PostgreSQL). Writes are rare next to checks, and
serialising them gives the change feed cursors in commit order, so a mirror that
reads ``since=N`` can never skip a change that commits late.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlmodel import Session

from modelhash.registry._settings import normalise_database_url
from modelhash.registry.errors import ConfigurationError

__all__ = ["begin_write", "make_engine", "private_file", "session_scope"]

_log = logging.getLogger("modelhash.registry")

_WRITE_OPTION = "modelhash_write"
# An arbitrary constant naming the registry's one writer lock.
_PG_WRITE_LOCK = 0x6D6F64656C68


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine for ``url`` with the per-backend settings described above."""
    try:
        parsed = make_url(normalise_database_url(url))
    except ArgumentError as exc:
        raise ConfigurationError(f"not a database URL: {exc}") from None
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if parsed.database not in (None, "", ":memory:"):
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            if not parsed.database.startswith("file:"):
                private_file(Path(parsed.database), sidecars=("-wal", "-shm", "-journal"))
    elif parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 5}
        kwargs["pool_pre_ping"] = True  # survive server restarts and failovers
        kwargs["pool_size"] = pool_size
        kwargs["max_overflow"] = pool_size
    else:
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql"
        )
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, NoSuchModuleError, ImportError, TypeError) as exc:
        raise ConfigurationError(f"cannot use database URL: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def private_file(path: Path, *, sidecars: tuple[str, ...] = ()) -> None:
    """Make sure ``path`` (and its ``sidecars``) can be read by its owner only.

    A missing file is created empty with mode 0600 before anything else opens it
    (SQLite takes an empty file as a new database, and gives its -wal and -shm files
    the database's mode). An existing file we own that others may read is narrowed
    to 0600, with a warning: it holds the list, key hashes, and, without
    ``MODELHASH_SIGNING_KEY_FILE``, the private signing key.
    """
    if path.parent.is_dir():
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigurationError(
                f"{path}: cannot create the database: {exc.strerror}"
            ) from None
    for candidate in (path, *(path.with_name(path.name + s) for s in sidecars)):
        try:
            info = candidate.stat()
        except OSError:
            continue
        if info.st_mode & 0o077 and info.st_uid == os.getuid():
            _log.warning("narrowing %s to mode 0600 (it was %o)", candidate, info.st_mode & 0o777)
            os.chmod(candidate, 0o600)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get(_WRITE_OPTION):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def begin_write(session: Session) -> None:
    """Start the session's write transaction, holding the registry's writer lock.

    Ends any read transaction first (its snapshot may be stale by the time the lock
    is ours); objects loaded before are expired, so callers re-read what they need.
    """
    if session.in_transaction():
        session.commit()
    conn = session.connection(execution_options={_WRITE_OPTION: True})
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_WRITE_LOCK})


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that is closed (and rolled back if uncommitted) on exit."""
    with Session(engine, expire_on_commit=False) as session:
        yield session
