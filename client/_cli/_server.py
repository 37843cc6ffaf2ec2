"""``modelhash serve``, ``db upgrade`` and ``keys create``: commands that run the server side.

They need the ``server`` extra; without it they say which extra to install.
"""

from __future__ import annotations

from types import ModuleType

import click

from modelhash._cli._app import fail, guarded

__all__ = ["db", "db_option", "serve", "server_module"]


def server_module() -> ModuleType:
    """The registry's command functions; exit 2 naming the extra when it is not installed."""
    try:
        import modelhash.registry._cli as server_cli
    except ImportError as exc:
        fail(f"this command needs the server extra: pip install 'modelhash[server]' ({exc})")
    return server_cli


db_option = click.option(
    "--db",
    envvar="MODELHASH_DATABASE_URL",
    show_envvar=True,
    help="SQLAlchemy database URL [default: sqlite:///modelhash.db in this folder].",
)


@click.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on.")
@click.option("--create/--no-create", default=True, show_default=True,
              help="Make a new SQLite database when there is none (it says so on stderr).")
def serve(db: str | None, host: str, port: int, create: bool) -> None:
    """Run the registry (creates and migrates an SQLite database; prints its path)."""
    server = server_module()
    guarded(lambda: server.serve(db=db, host=host, port=port, create=create))


@click.group(no_args_is_help=True)
def db() -> None:
    """Database administration."""


@db.command("upgrade")
@db_option
@click.option("--create", is_flag=True, help="Make a new SQLite database when there is none.")
def db_upgrade(db: str | None, create: bool) -> None:
    """Apply the schema migrations to the database."""
    server = server_module()
    guarded(lambda: server.db_upgrade(db=db, create=create))
