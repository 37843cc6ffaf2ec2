"""Every error the client raises, rooted at :class:`ModelhashError`.

The tree::

    ModelhashError                  root; ``diagnostics()`` is the one-line text for humans
    ├── InputError                  bad input from the caller (CLI exit 2)
    │   ├── InvalidHashError        a hash string that parses as no known algorithm
    │   ├── UnsupportedFormatError  a file or folder that is no weight format we read
    │   ├── MalformedFileError      a weight file whose structure is broken or inconsistent
    │   │   ├── ResourceLimitError  a file that asks for more than the reader allows
    │   │   └── InternalReadError   an unexpected failure while reading one file (a bug)
    │   ├── UnsafeFileError         a pickle that references code; carries the globals
    │   ├── UploadTooLargeError     an upload stream longer than the caller allows
    │   └── HubNotFoundError        no such Hugging Face repo, revision or file (or gated)
    └── RegistryError               the registry could not be reached or failed (CLI exit 3)
        ├── RegistryUnreachableError  no answer: refused, reset or timed out, after retries
        ├── RegistryResponseError     an answer that is not the documented wire format
        ├── RegistryHTTPError         an error status; carries ``status``, ``method``, ``url``
        │   ├── UnauthorizedError     401: no API key, or an unknown or revoked one
        │   ├── ForbiddenError        403: the key's role may not do this
        │   ├── NotFoundError         404
        │   ├── ConflictError         409: contradicts what the registry stores
        │   └── RejectedError         400, 413, 422: the registry refused the request body
        ├── MirrorError               the offline cache is missing, stale, or fails its
        │   │                         signature check
        │   └── ExportVerificationError  a signed export that is malformed, signed by
        │                                another key, or whose signature is wrong
        └── HubError                  the Hugging Face Hub could not be reached or failed

Only the CLI prints errors or exits; library code raises these with enough context
(the path, the offending globals) for the caller to decide. ``diagnostics()`` and
``printable`` escape control characters, so a hostile file or tensor name always
prints as one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "ConflictError",
    "ExportVerificationError",
    "ForbiddenError",
    "HubError",
    "HubNotFoundError",
    "InputError",
    "InternalReadError",
    "InvalidHashError",
    "MalformedFileError",
    "MirrorError",
    "ModelhashError",
    "NotFoundError",
    "RegistryError",
    "RegistryHTTPError",
    "RegistryResponseError",
    "RegistryUnreachableError",
    "RejectedError",
    "ResourceLimitError",
    "UnauthorizedError",
    "UnsafeFileError",
    "UnsupportedFormatError",
    "UploadTooLargeError",
    "printable",
]


def printable(text: str, limit: int | None = None) -> str:
    """``text`` safe to print on one line: control characters, lone surrogates and
    other unprintable characters escaped (``\\n``, ``\\x1b``, ``\\ud800``), and at most
    ``limit`` characters long if given.

    File and tensor names come from the files being checked, so a name could
    otherwise end a line early or send a terminal escape sequence.
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    return text


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{code:02x}")
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class ModelhashError(Exception):
    """Root of every error modelhash raises on purpose."""

    #: The ``kind`` of its JSON form: a stable word scripts can branch on.
    kind: ClassVar[str] = "error"

    def diagnostics(self) -> str:
        """One line for a human: what went wrong and with what, unprintables escaped."""
        return printable(str(self))

    def to_json(self) -> dict[str, Any]:
        """The one JSON shape of an error: ``message``, ``kind``, then fields of its own."""
        return {"message": self.diagnostics(), "kind": self.kind, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        return {}


class InputError(ModelhashError):
    """The caller gave us something we cannot use."""

    kind = "input"


class InvalidHashError(InputError):
    """A hash string matches no accepted algorithm or form."""

    kind = "hash"


class _FileError(InputError):
    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def _fields(self) -> dict[str, Any]:
        return {"path": self.path}


class UnsupportedFormatError(_FileError):
    """The path is not a weight format modelhash reads."""

    kind = "unsupported"


class MalformedFileError(_FileError):
    """A weight file is truncated, inconsistent or otherwise broken."""

    kind = "malformed"


class ResourceLimitError(MalformedFileError):
    """A file asks for more memory or work than the reader allows."""

    kind = "limit"


class InternalReadError(_FileError):
    """Reading one file failed in a way the readers did not expect: a bug in modelhash.

    Raised by the per-file boundary in place of whatever escaped, so that one file's
    failure is that file's one-line error and never costs the results of the others.
    """


class UnsafeFileError(InputError):
    """A pickle references globals outside the tensor-and-container allow-list.

    Nothing it names was imported or called. ``globals`` lists them as
    ``module.name`` strings, which is itself a signal worth reporting.
    """

    def __init__(self, path: str | Path, globals_: Sequence[str], where: str = "") -> None:
        self.path = str(path)
        self.globals = sorted(set(globals_))
        self.where = where
        inner = f" in {where}" if where else ""
        super().__init__(
            f"{self.path}: unsafe pickle{inner}: refers to {', '.join(self.globals)}"
        )

    kind = "unsafe"

    def _fields(self) -> dict[str, Any]:
        return {"path": self.path, "globals": self.globals}


class RegistryError(ModelhashError):
    """The registry could not be reached, or answered with an error."""

    kind = "registry"


class UploadTooLargeError(InputError):
    """An upload stream went past the size the caller allows; reading stopped there."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        super().__init__(f"{name}: upload exceeds the {limit}-byte limit")

    kind = "limit"


class RegistryUnreachableError(RegistryError):
    """No answer from the registry: connection refused or reset, or a timeout.

    Raised after the retries the client allows. ``url`` is the request's URL.
    """

    def __init__(self, method: str, url: str, reason: str) -> None:
        self.method = method
        self.url = url
        self.reason = reason
        super().__init__(f"{method} {url}: registry unreachable: {reason}")

    kind = "unreachable"

    def _fields(self) -> dict[str, Any]:
        return {"url": self.url}


class RegistryResponseError(RegistryError):
    """The registry answered, but not with the documented wire format."""

    def __init__(self, method: str, url: str, reason: str, status: int | None = None) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.reason = reason
        super().__init__(f"{method} {url}: unexpected answer from the registry: {reason}")


class RegistryHTTPError(RegistryError):
    """The registry answered with an error status; ``detail`` is its one-line reason."""

    def __init__(self, method: str, url: str, status: int, detail: str) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.detail = detail
        super().__init__(f"{method} {url}: {status} {detail}")

    kind = "http"

    def _fields(self) -> dict[str, Any]:
        return {"status": self.status, "url": self.url}


class UnauthorizedError(RegistryHTTPError):
    """401: the request had no API key, or one the registry does not know or has revoked."""

    kind = "unauthorized"

    def diagnostics(self) -> str:
        return (f"{self}: set MODELHASH_API_KEY or pass --api-key with a key this "
                "registry knows and has not revoked")


class ForbiddenError(RegistryHTTPError):
    """403: the API key is valid, but its role may not do this."""

    kind = "forbidden"

    def diagnostics(self) -> str:
        return f"{self}: ask the registry's admin for a key with that role"


class NotFoundError(RegistryHTTPError):
    """404: no such flag, key or route."""


class ConflictError(RegistryHTTPError):
    """409: the request contradicts what the registry stores (e.g. revoking a revoked flag)."""


class RejectedError(RegistryHTTPError):
    """400, 413 or 422: the registry refused the request as malformed or too large."""


class MirrorError(RegistryError):
    """The offline cache cannot answer: never synced, too old, or fails verification.

    A tampered or foreign-signed export is refused with this error, never used.
    """

    kind = "mirror"


class ExportVerificationError(MirrorError):
    """An export is malformed, signed by another key, or its signature is wrong."""


class HubNotFoundError(InputError):
    """The Hugging Face Hub has no such repo, revision or file, or it is gated to us."""


class HubError(RegistryError):
    """The Hugging Face Hub could not be reached or failed.

    A RegistryError because, like the registry, it is an outside service whose
    failure says nothing about the model: the CLI exits 3.
    """

    kind = "hub"
