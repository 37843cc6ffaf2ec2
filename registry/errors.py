"""Every error the registry raises on purpose, rooted at :class:`ServiceError`.

The tree::

    modelhash.errors.ModelhashError
    └── ServiceError                  root of the registry's errors; ``status`` is its HTTP code
        ├── BadRequestError           400: a malformed hash or parameter
        ├── AuthenticationError       401: no key, or a key that is unknown or revoked
        ├── PermissionDeniedError     403: the key's role may not do this
        ├── NotFoundError             404
        ├── UnprocessableError        422: valid JSON the registry cannot take or answer
        ├── ConflictError             409: the request contradicts the stored state
        │   └── ReferenceBaseConflict 409: a flag that matches a registered reference base
        ├── DatabaseUnavailableError  503: unreachable or not migrated (also a RegistryError:
        │                                  the CLI exits 3)
        └── ConfigurationError        bad settings or an unreadable key file (also an
                                      InputError: the CLI exits 2)

Routes raise these; one exception handler turns each into ``{"detail": message}``
with its status. The CLI glue raises them too, and ``modelhash`` maps them to exit
codes through the client's error classes.
"""

from __future__ import annotations

from modelhash.errors import InputError, ModelhashError, RegistryError

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ConfigurationError",
    "ConflictError",
    "DatabaseUnavailableError",
    "NotFoundError",
    "PermissionDeniedError",
    "ReferenceBaseConflict",
    "ServiceError",
    "UnprocessableError",
]


class ServiceError(ModelhashError):
    """Root of the registry's errors; ``status`` is the HTTP status it maps to."""

    status: int = 500


class BadRequestError(ServiceError):
    """A malformed hash, prefix or parameter."""

    status = 400


class AuthenticationError(ServiceError):
    """No API key, or one that is unknown or revoked."""

    status = 401


class PermissionDeniedError(ServiceError):
    """The key is valid but its role may not do this."""

    status = 403


class NotFoundError(ServiceError):
    """No such flag, base or key."""

    status = 404


class UnprocessableError(ServiceError):
    """Well-formed input the registry cannot take: a sketch that fails to decode, or
    a submission whose answer could not be rendered (nothing is stored then)."""

    status = 422


class ConflictError(ServiceError):
    """The request contradicts what is stored (revoking a revoked flag, a duplicate name)."""

    status = 409


class ReferenceBaseConflict(ConflictError):
    """The submitted fingerprint is a registered reference base; only an admin may force it."""

    def __init__(self, base_id: str, base_name: str) -> None:
        self.base_id = base_id
        self.base_name = base_name
        super().__init__(
            f"the fingerprint matches reference base {base_name!r} ({base_id}); "
            "reference bases are never flagged (an admin may set force=true)"
        )


class DatabaseUnavailableError(ServiceError, RegistryError):
    """The database cannot be reached, or its schema is not at the current migration."""

    status = 503


class ConfigurationError(ServiceError, InputError):
    """A setting is invalid, or a file it names cannot be used."""

    status = 500
