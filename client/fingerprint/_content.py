"""The content layer: one hash over a model's tensors, whatever holds them.

``content-blake3-v1`` is BLAKE3 over a length-prefixed, unambiguous encoding of
every tensor's canonical name, dtype, shape and the BLAKE3 of its C-order bytes,
sorted by name. Container, tensor order, metadata, sharding and wrapper prefixes
do not change it; a dtype cast or any changed value does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import blake3

from modelhash.fingerprint._digest import CONTENT_ALGORITHM, Digest
from modelhash.fingerprint._result import TensorDigest

__all__ = ["WRAPPER_PREFIXES", "canonical_names", "content_digest"]

# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_DOMAIN = b"modelhash/content/v1\x00"


def canonical_names(names: Sequence[str]) -> list[str]:
    """Strip wrapper prefixes that every name shares, repeatedly.

    Only prefixes carried by *all* names are removed: a real layer that happens to
    be called ``module`` in one key must keep its name.
    """
    out = list(names)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(n.startswith(prefix) and len(n) > len(prefix) for n in out):
                out = [n[len(prefix) :] for n in out]
                changed = True
    return out


def content_digest(tensors: Sequence[TensorDigest]) -> Digest:
    """The content hash of ``tensors`` (names must already be canonical and unique)."""
    h = blake3.blake3(_DOMAIN)
    h.update(struct.pack("<Q", len(tensors)))
    for t in sorted(tensors, key=lambda t: t.name.encode("utf-8")):
        name = t.name.encode("utf-8")
        dtype = t.dtype.encode("ascii")
        h.update(struct.pack("<I", len(name)) + name)
        h.update(struct.pack("<B", len(dtype)) + dtype)
        h.update(struct.pack("<B", len(t.shape)))
        h.update(b"".join(struct.pack("<Q", d) for d in t.shape))
        h.update(bytes.fromhex(t.blake3))
    return Digest(CONTENT_ALGORITHM, h.hexdigest())
