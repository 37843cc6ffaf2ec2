"""The export signing key (ed25519) and the range-decoy secret.

Production should set ``MODELHASH_SIGNING_KEY_FILE`` to a PEM private key kept
outside the database, so that a stolen database cannot sign lists; a key file that
other users may read is refused, and :func:`write_key_file` makes one with mode
0600. Without it, a key is generated on first use and stored in the database (an
SQLite file is created 0600), which is fine for one machine and for tests. Mirrors
pin the public key (``GET /v1/export/public-key``).
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine
from sqlmodel import Session

from modelhash._export import key_id
from modelhash.registry._settings import Settings
from modelhash.registry.crud.state import get_or_create
from modelhash.registry.errors import ConfigurationError

__all__ = [
    "Secrets",
    "Signer",
    "generate_private_pem",
    "load_private_key",
    "read_key_file",
    "write_key_file",
]


def generate_private_pem() -> str:
    """A new ed25519 private key as unencrypted PKCS#8 PEM."""
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode("ascii")
    )


def read_key_file(path: Path) -> bytes:
    """The bytes of a private key file; ConfigurationError if others may read it.

    Group read is allowed (a secret mounted for a group), any access for others is
    not: a private key readable by every user of the machine is not private.
    """
    try:
        mode = path.stat().st_mode
        if mode & 0o007:
            raise ConfigurationError(
                f"signing key file {path} is accessible to other users (mode "
                f"{mode & 0o777:o}): run 'chmod 600 {path}'"
            )
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"signing key file {path}: {exc.strerror}") from None


def write_key_file(path: Path) -> str:
    """Write a new ed25519 private key to ``path`` (mode 0600, never over a file).

    Returns the new key's id.
    """
    pem = generate_private_pem().encode("ascii")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot create the key file: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return Signer(load_private_key(pem, source=str(path))).key_id


def load_private_key(pem: bytes, *, source: str) -> Ed25519PrivateKey:
    """Parse an unencrypted ed25519 private key, or raise ConfigurationError."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{source}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{source}: the signing key must be ed25519")
    return key


@dataclass(frozen=True)
class Signer:
    """Signs export payloads; knows its public key and key id."""

    private_key: Ed25519PrivateKey

    @property
    def public_pem(self) -> str:
        """The public key as SubjectPublicKeyInfo PEM."""
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    @property
    def key_id(self) -> str:
        """16 hex digits naming the public key (see ``modelhash._export.key_id``)."""
        return key_id(self.private_key.public_key())

    def sign(self, payload: bytes) -> str:
        """Base64 of the ed25519 signature of ``payload``."""
        return base64.b64encode(self.private_key.sign(payload)).decode("ascii")


class Secrets:
    """Loads the signer and the range secret once, on first use.

    Lazy on purpose: the server must start (and say 503 on /readyz) even when the
    database is not migrated yet.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self._settings = settings
        self._engine = engine
        self._lock = threading.Lock()
        self._signer: Signer | None = None
        self._previous: Signer | None = None
        self._range: bytes | None = None

    def signer(self) -> Signer:
        """The export signer, from the key file or the database."""
        with self._lock:
            if self._signer is None:
                path = self._settings.signing_key_file
                if path is not None:
                    key = load_private_key(read_key_file(path), source=str(path))
                else:
                    with Session(self._engine) as session:
                        stored = get_or_create(
                            session, name="signing_key_pem", make=generate_private_pem
                        )
                    key = load_private_key(stored.encode("ascii"), source="stored signing key")
                self._signer = Signer(key)
            return self._signer

    def previous_signer(self) -> Signer | None:
        """The key being rotated out (``MODELHASH_PREVIOUS_SIGNING_KEY_FILE``), if any."""
        path = self._settings.previous_signing_key_file
        if path is None:
            return None
        with self._lock:
            if self._previous is None:
                self._previous = Signer(load_private_key(read_key_file(path), source=str(path)))
            return self._previous

    def range_secret(self) -> bytes:
        """The HMAC key that makes range decoys."""
        with self._lock:
            if self._range is None:
                configured = self._settings.range_secret
                if configured is not None:
                    self._range = configured.get_secret_value().encode("utf-8")
                else:
                    with Session(self._engine) as session:
                        value = get_or_create(
                            session, name="range_secret", make=lambda: secrets.token_hex(32)
                        )
                    self._range = value.encode("ascii")
            return self._range
