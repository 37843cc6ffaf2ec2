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
from modelhash.registry.errors import DatabaseUnavailableError

__all__ = ["db_upgrade", "keys_create", "serve"]


def _settings(db: str | None) -> Settings:
    return Settings(database_url=db) if db else Settings()


def serve(*, db: str | None, host: str, port: int) -> None:
    """Run the registry with uvicorn; an SQLite database is migrated first."""
    import uvicorn

    from modelhash.registry.app import create_app

    settings = _settings(db)
    configure_logging(settings.log_level)
    if settings.is_sqlite:
        upgrade(settings.database_url)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None)


def db_upgrade(*, db: str | None) -> None:
    """Apply every pending migration."""
    settings = _settings(db)
    revision = upgrade(settings.database_url)
    sys.stderr.write(f"modelhash: database schema at revision {revision}\n")


def keys_create(*, role: str, name: str | None, db: str | None) -> str:
    """Make a key straight in the database and return it (SQLite is migrated first)."""
    settings = _settings(db)
    if settings.is_sqlite:
        upgrade(settings.database_url)
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        if not is_current(engine):
            raise DatabaseUnavailableError(
                "the database is not migrated: run 'modelhash db upgrade' first"
            )
        with session_scope(engine) as session:
            _, key = create_key(session, role=role, name=name, actor=CLI)
        return key
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(f"cannot reach the database: {type(exc).__name__}") from None
    finally:
        engine.dispose()
