"""Alembic environment for the registry.

Run from ``modelhash.registry._migrations`` (``modelhash db upgrade``), which passes an open
connection in ``config.attributes``; run by the ``alembic`` command with
``-x url=...`` or from the settings otherwise. The target metadata is the registry's
models, so autogenerate and the drift test compare against them.
"""

from __future__ import annotations

from sqlmodel import SQLModel

import modelhash.registry.models as _models  # noqa: F401  (registers the tables)
from alembic import context
from modelhash.registry._db import make_engine
from modelhash.registry._settings import Settings

config = context.config
target_metadata = SQLModel.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or context.get_x_argument(as_dictionary=True).get(
        "url"
    )
    return str(url) if url else Settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url(), pool_size=1)
    try:
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, compare_type=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
