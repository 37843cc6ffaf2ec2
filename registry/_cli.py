"""What ``modelhash serve``, ``modelhash db upgrade`` and ``modelhash keys create`` call.

The client's CLI imports this module only when one of those commands runs, and maps
the :mod:`modelhash.registry.errors` it raises to exit codes.
"""

from __future__ import annotations

import sys

from sqlalchemy.exc import SQLAlchemyError

from modelhash.registry._db import make_engine, session_scope
from modelhash.registry._logging import configure_logging
from modelhash.registry._migrations import is_current, upgrade
from modelhash.registry._settings import Settings
from modelhash.registry.crud.keys import CLI, create_key
from modelhash.registry.errors import ConfigurationError, DatabaseUnavailableError

__all__ = ["db_upgrade", "keys_create", "serve"]


def _settings(db: str | None) -> Settings:
    return Settings(database_url=db) if db else Settings()


def _ensure_database(settings: Settings, *, create: bool) -> bool:
    """Refuse a missing SQLite file unless ``create``; True when one is to be made.

    A command run from another folder would otherwise make a new, empty database
    there without a word, and a key or a server would silently use it. Every
    command names the database it used, by absolute path.
    """
    path = settings.sqlite_path
    if path is None or path.exists():
        return False
    if not create:
        raise ConfigurationError(
            f"no database at {path}: run this in the folder that holds it, name it with "
            "--db or MODELHASH_DATABASE_URL, or pass --create to make a new one"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return True


def serve(*, db: str | None, host: str, port: int, create: bool = True) -> None:
    """Run the registry with uvicorn; an SQLite database is migrated first."""
    import uvicorn

    from modelhash.registry.app import create_app

    settings = _settings(db)
    configure_logging(settings.log_level)
    new = _ensure_database(settings, create=create)
    where = settings.describe_database()
    sys.stderr.write(
        f"modelhash: first run: created a new database at {where}\n" if new
        else f"modelhash: database {where}\n"
    )
    if settings.is_sqlite:
        upgrade(settings.database_url)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None)


def db_upgrade(*, db: str | None, create: bool = False) -> None:
    """Apply every pending migration."""
    settings = _settings(db)
    new = _ensure_database(settings, create=create)
    revision = upgrade(settings.database_url)
    made = "new " if new else ""
    sys.stderr.write(
        f"modelhash: {made}database {settings.describe_database()} at schema revision "
        f"{revision}\n"
    )


def keys_create(
    *, role: str, name: str | None, db: str | None, create: bool = False
) -> dict[str, str | int | None]:
    """Make a key straight in the database (SQLite is migrated first).

    Returns its ``id``, ``prefix``, ``role``, ``name`` and the ``key`` itself, which is
    shown this once: only its hash is stored.
    """
    settings = _settings(db)
    new = _ensure_database(settings, create=create)
    if settings.is_sqlite:
        upgrade(settings.database_url)
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        if not is_current(engine):
            raise DatabaseUnavailableError(
                "the database is not migrated: run 'modelhash db upgrade' first"
            )
        with session_scope(engine) as session:
            row, key = create_key(session, role=role, name=name, actor=CLI)
            made = "new " if new else ""
            sys.stderr.write(
                f"modelhash: {role} key {row.prefix}... made in {made}database "
                f"{settings.describe_database()}\n"
            )
            return {"id": row.id, "prefix": row.prefix, "role": row.role, "name": row.name,
                    "key": key}
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(f"cannot reach the database: {type(exc).__name__}") from None
    finally:
        engine.dispose()
