"""Server settings, read from ``MODELHASH_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "normalise_database_url"]


def normalise_database_url(url: str) -> str:
    """Pick psycopg 3 for ``postgresql://`` and ``postgres://`` URLs.

    SQLAlchemy would otherwise reach for psycopg2, which we do not depend on.
    """
    url = url.strip()
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


class Settings(BaseSettings):
    """Everything the server can be told. Each field is ``MODELHASH_<NAME>`` in the environment.

    ``database_url`` defaults to a SQLite file in the working directory, which the
    server migrates by itself. PostgreSQL is migrated only by ``modelhash db upgrade``.
    ``signing_key_file`` should name an ed25519 private key (PEM) in production;
    ``previous_signing_key_file``, while rotating, the key it replaces: the registry
    then publishes the new public key endorsed by the old one, and mirrors follow. When
    unset, a key is generated on first use and kept in the database. ``range_secret``
    seeds the decoys of range answers; when unset, one is generated and kept in the
    database. API keys are checked against the database on every request, so
    a revoked key stops working at once everywhere (there is no key cache).
    ``ui_session_minutes`` is how long a web UI sign-in lasts; ``ui_secure_cookie``
    forces the session cookie's Secure attribute on or off (by default it is set
    when the request came over HTTPS, as seen by the server or a trusted proxy).
    """

    model_config = SettingsConfigDict(env_prefix="MODELHASH_", extra="ignore")

    database_url: str = "sqlite:///modelhash.db"
    signing_key_file: Path | None = None
    previous_signing_key_file: Path | None = None
    range_secret: SecretStr | None = None
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    range_bucket: int = Field(default=64, ge=8, le=4096)
    log_level: str = "INFO"
    pool_size: int = Field(default=10, ge=1, le=200)
    ui_session_minutes: int = Field(default=480, ge=1, le=7 * 24 * 60)
    ui_secure_cookie: bool | None = None

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return normalise_database_url(value)

    @property
    def is_sqlite(self) -> bool:
        """True for the embedded SQLite backend."""
        return self.database_url.startswith("sqlite")

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, absolute; None for other backends and in-memory ones."""
        if not self.is_sqlite:
            return None
        from sqlalchemy.engine import make_url

        name = make_url(self.database_url).database
        if not name or name == ":memory:" or name.startswith("file:"):
            return None
        return Path(name).expanduser().resolve()

    def describe_database(self) -> str:
        """The database for a human: the absolute SQLite path, or the URL without password."""
        path = self.sqlite_path
        if path is not None:
            return str(path)
        from sqlalchemy.engine import make_url

        return make_url(self.database_url).render_as_string(hide_password=True)
