"""Client configuration from ``MODELHASH_*`` environment variables.

Only the variables in the interface contract are read: ``MODELHASH_REGISTRY`` (the
registry's base URL) and ``MODELHASH_API_KEY``; ``MODELHASH_CACHE`` names the
offline cache folder. Anything passed explicitly wins over the environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_REGISTRY", "ClientSettings", "default_cache_dir"]

DEFAULT_REGISTRY = "http://127.0.0.1:8000"


class ClientSettings(BaseSettings):
    """Where the registry is and how to authenticate; each field is ``MODELHASH_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="MODELHASH_", extra="ignore")

    registry: str = DEFAULT_REGISTRY
    api_key: SecretStr | None = None
    cache: Path | None = None

    @field_validator("registry")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"the registry URL must start with http:// or https://, not {value!r}")
        return value

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        return SecretStr(value.get_secret_value().strip())


def default_cache_dir() -> Path:
    """``MODELHASH_CACHE``, else ``$XDG_CACHE_HOME/modelhash``, else ``~/.cache/modelhash``."""
    explicit = os.environ.get("MODELHASH_CACHE", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "modelhash"
