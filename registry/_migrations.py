"""Alembic, driven from code: the migrations ship inside the package.

The migration scripts live in the repository's top-level ``alembic/`` folder and are
installed as ``registry/_alembic``. The Config is built here rather than read from
an ``alembic.ini``, so ``modelhash db upgrade`` works from any directory.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from modelhash.registry._db import make_engine
from modelhash.registry.errors import ConfigurationError, DatabaseUnavailableError

__all__ = [
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "is_current",
    "script_location",
    "upgrade",
]


def script_location() -> Path:
    """Where the migration scripts are: in the installed package, or in a source checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "_alembic"
    if (packaged / "env.py").is_file():
        return packaged
    source = here.parent / "alembic"
    if (source / "env.py").is_file():
        return source
    raise ConfigurationError("the registry's migration scripts are missing from this install")


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic Config for the bundled migrations, aimed at ``database_url``."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise ConfigurationError("no migrations found")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_current(engine: Engine) -> bool:
    """True when the database is at the newest migration."""
    return current_revision(engine) == head_revision()


def upgrade(database_url: str, revision: str = "head") -> str:
    """Apply migrations up to ``revision``; returns the revision reached."""
    engine = make_engine(database_url, pool_size=1)
    try:
        config = alembic_config(database_url)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
        return current_revision(engine) or "base"
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(f"cannot migrate the database: {_short(exc)}") from None
    finally:
        engine.dispose()


def downgrade(database_url: str, revision: str) -> None:
    """Undo migrations down to ``revision`` (``base`` for an empty schema)."""
    engine = make_engine(database_url, pool_size=1)
    try:
        config = alembic_config(database_url)
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def _short(exc: SQLAlchemyError) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
