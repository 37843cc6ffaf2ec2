"""Hash values and the one parser that accepts every string form users paste.

A fingerprint value is an algorithm name plus its canonical lower-case hex. The
algorithm names are part of the wire format: a stored value always says how it was
made, so any change to how a value is computed gets a new name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelhash.errors import InvalidHashError

__all__ = [
    "ALGORITHMS",
    "CONTENT_ALGORITHM",
    "Algorithm",
    "Digest",
    "parse_hash",
    "parse_hash_as",
]

CONTENT_ALGORITHM = "content-blake3-v1"


@dataclass(frozen=True)
class Algorithm:
    """One accepted hash algorithm and the hex lengths it is written in."""

    name: str
    canonical_len: int
    accepted_lens: tuple[int, ...]
    description: str
    aliases: tuple[str, ...] = ()

    def normalize(self, hex_value: str) -> str:
        """Return the canonical form of ``hex_value`` or raise InvalidHashError."""
        value = hex_value.strip().lower()
        if not _HEX.fullmatch(value):
            raise InvalidHashError(f"{self.name}: {hex_value!r} is not hexadecimal")
        if len(value) not in self.accepted_lens:
            lens = " or ".join(str(n) for n in self.accepted_lens)
            raise InvalidHashError(
                f"{self.name}: expected {lens} hex digits, got {len(value)}"
            )
        return value[: self.canonical_len]


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("sha256", 64, (64,), "SHA-256 of the whole file (Civitai SHA256)"),
        Algorithm("blake3", 64, (64,), "BLAKE3 of the whole file"),
        Algorithm("crc32", 8, (8,), "CRC32 of the whole file, Civitai byte order"),
        Algorithm("autov1", 8, (8,), "SHA-256 of file[0x100000:0x110000], 8 digits"),
        Algorithm(
            "autov2", 10, (10, 64), "first 10 digits of the file's SHA-256", ("autov2",)
        ),
        Algorithm(
            "autov3",
            12,
            (12, 64),
            "SHA-256 of a safetensors file after its header, 12 digits",
        ),
        Algorithm(
            CONTENT_ALGORITHM,
            64,
            (64,),
            "modelhash content hash over canonical tensors",
            ("content",),
        ),
    )
}

_ALIASES: dict[str, str] = {}
for _alg in ALGORITHMS.values():
    _ALIASES[_alg.name] = _alg.name
    for _alias in _alg.aliases:
        _ALIASES[_alias] = _alg.name

_HEX = re.compile(r"[0-9a-f]+")
_PREFIXED = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*[:=]\s*(\S+)\s*$")

# Bare hex of a given length could be any of these, most likely first.
_BY_LENGTH: dict[int, tuple[str, ...]] = {
    64: ("sha256", "blake3", CONTENT_ALGORITHM),
    12: ("autov3",),
    10: ("autov2",),
    8: ("autov1", "crc32"),
}


@dataclass(frozen=True, order=True)
class Digest:
    """A fingerprint value: algorithm name plus canonical lower-case hex."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def bytes(self) -> bytes:
        """The raw digest bytes."""
        return bytes.fromhex(self.hex)


def _algorithm(name: str) -> Algorithm:
    canonical = _ALIASES.get(name.strip().lower())
    if canonical is None:
        known = ", ".join(sorted(ALGORITHMS))
        raise InvalidHashError(f"unknown hash algorithm {name!r} (known: {known})")
    return ALGORITHMS[canonical]


def parse_hash_as(algorithm: str, value: str) -> Digest:
    """Validate ``value`` as a hash of ``algorithm`` and return its canonical form."""
    alg = _algorithm(algorithm)
    return Digest(alg.name, alg.normalize(value))


def parse_hash(text: str) -> list[Digest]:
    """Every reading of a pasted hash string, most likely first.

    Accepts ``ALGORITHM:HEX`` (any case, ``=`` also works) or bare hex of either
    case. Bare hex is ambiguous by length (64 digits may be SHA-256, BLAKE3 or a
    content hash), so all candidates are returned and the caller looks each up.
    A 64-digit value given as AutoV2 or AutoV3 is cut to its display length.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidHashError("empty hash")
    if len(text) > 200:
        raise InvalidHashError("hash string longer than 200 characters")
    m = _PREFIXED.match(text)
    if m:
        return [parse_hash_as(m.group(1), m.group(2))]
    value = text.strip().lower()
    if value.startswith("0x"):
        value = value[2:]
    if not _HEX.fullmatch(value):
        raise InvalidHashError(f"{text.strip()!r} is not a hexadecimal hash")
    names = _BY_LENGTH.get(len(value))
    if names is None:
        raise InvalidHashError(
            f"{len(value)} hex digits fits no known hash (8, 10, 12 or 64 expected)"
        )
    return [Digest(n, ALGORITHMS[n].normalize(value)) for n in names]
