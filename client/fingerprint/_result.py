"""Fingerprint results: plain values with a stable JSON form.

The JSON form (``to_json``) is the wire format the CLI prints and the registry
accepts, so field names here are a promise to scripts.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modelhash.fingerprint._digest import CONTENT_ALGORITHM, Digest

if TYPE_CHECKING:
    from modelhash.fingerprint._sketch import Sketch

__all__ = [
    "FileHashes",
    "ModelDescription",
    "ModelFingerprint",
    "TensorDigest",
]


@dataclass(frozen=True)
class FileHashes:
    """The file layer of one file: model-site hashes of its exact bytes."""

    path: str
    size: int
    sha256: str
    blake3: str
    crc32: str
    autov1: str | None
    autov2: str
    autov3: str | None

    def digests(self) -> list[Digest]:
        """Every hash of this file as a :class:`Digest`."""
        out = [
            Digest("sha256", self.sha256),
            Digest("autov2", self.autov2),
            Digest("blake3", self.blake3),
            Digest("crc32", self.crc32),
        ]
        if self.autov1 is not None:
            out.append(Digest("autov1", self.autov1))
        if self.autov3 is not None:
            out.append(Digest("autov3", self.autov3))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "autov1": self.autov1,
            "autov2": self.autov2,
            "autov3": self.autov3,
            "blake3": self.blake3,
            "crc32": self.crc32,
        }


@dataclass(frozen=True)
class TensorDigest:
    """One tensor of the content layer: canonical name, dtype, shape, BLAKE3 of bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    blake3: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "blake3": self.blake3,
        }


@dataclass(frozen=True)
class ModelDescription:
    """What the tensors look like: kind, flavour, architecture and size.

    ``kind`` is ``checkpoint``, ``lora``, ``embedding`` or ``other``; ``flavour``
    names the adapter convention (``kohya``, ``peft``, ``diffusers``, ``loha``,
    ``lokr``, ``xlabs``, ``gguf``) where there is one; ``architecture`` is a best
    guess from key names and shapes (see
    ``modelhash.fingerprint._describe.ARCHITECTURES``), or
    ``unknown``.
    """

    kind: str
    flavour: str | None
    architecture: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "flavour": self.flavour,
            "architecture": self.architecture,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "dtypes": dict(sorted(self.dtypes.items())),
        }


@dataclass
class ModelFingerprint:
    """Every layer computed for one model: a file, or a folder read as one model.

    ``format`` is the container (``safetensors``, ``torch-zip``, ``torch-legacy``,
    ``gguf``, ``safetensors-sharded``, ``diffusers``, ...). ``files`` has the file
    layer of each file read, ``content`` the content hash over all tensors,
    ``sketch`` the similarity layer (None when only the exact layers were asked for).
    """

    path: str
    format: str
    files: list[FileHashes]
    content: Digest
    tensors: list[TensorDigest]
    model: ModelDescription
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sketch: Sketch | None = None

    def digests(self) -> list[Digest]:
        """Exact-layer digests: the content hash, and file hashes for a single file."""
        out = [self.content]
        if len(self.files) == 1:
            out.extend(self.files[0].digests())
        return out

    def summary(self) -> dict[str, str]:
        """Flat ``algorithm -> hex`` map of :meth:`digests`, as used on the wire."""
        out = {d.algorithm: d.hex for d in self.digests()}
        out["content"] = out.pop(CONTENT_ALGORITHM)
        return out

    def to_json(self, *, include_tensors: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "format": self.format,
            "fingerprint": self.summary(),
            "content": {"algorithm": self.content.algorithm, "value": self.content.hex},
            "files": [f.to_json() for f in self.files],
            "model": self.model.to_json(),
            "notes": list(self.notes),
        }
        if include_tensors:
            out["tensors"] = [t.to_json() for t in self.tensors]
        if self.sketch is not None:
            out["sketch"] = sketch_json(self.sketch)
        return out


def sketch_json(sketch: Sketch) -> dict[str, Any]:
    """The JSON form of a sketch layer: its algorithm, size, stored bytes and band keys."""
    blob = sketch.to_bytes()
    return {
        "algorithm": sketch.algorithm,
        "kind": sketch.kind,
        "tensors": len(sketch),
        "bytes": len(blob),
        "blob": base64.b64encode(blob).decode("ascii"),
        "bands": [f"{k:08x}" for k in sketch.band_keys()],
        **({"invariant": {"algorithm": sketch.invariant.algorithm,
                          "matrices": len(sketch.invariant),
                          "products": sketch.invariant.products()}}
           if sketch.invariant is not None else {}),
    }
