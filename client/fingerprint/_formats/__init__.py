"""The table of weight-file readers, and format detection.

A reader is a class with a ``name``, a ``sniff(head, path)`` test on the file's
first bytes, and ``parse(path, size, fh)`` returning a
:class:`~modelhash.fingerprint._model.ParsedFile`. A new format is one more entry in
:data:`READERS`, never another branch elsewhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from modelhash.errors import MalformedFileError, UnsupportedFormatError
from modelhash.fingerprint._guard import guarded
from modelhash.fingerprint._limits import check_name, check_shape, check_tensor_count, open_regular
from modelhash.fingerprint._model import ParsedFile

__all__ = ["READERS", "WEIGHT_SUFFIXES", "Reader", "parse_file"]

HEAD_BYTES = 64

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


class Reader(Protocol):
    """What every format reader provides."""

    name: str

    def sniff(self, head: bytes, path: Path) -> bool:
        """True if ``head`` (the first bytes of the file) looks like this format."""

    def parse(self, path: Path, size: int, fh: BinaryIO) -> ParsedFile:
        """Parse the structure; raise MalformedFileError/UnsafeFileError on bad input."""


class _Lazy:
    """A reader whose module is imported the first time a file might be its format.

    ``maybe`` is a cheap necessary condition of the reader's own ``sniff`` (it never
    says no where ``sniff`` would say yes), so the table's order and answers are
    those of the readers themselves; a safetensors file then never loads the
    pickle machinery, which is most of the start-up of a one-file check.
    """

    def __init__(self, name: str, module: str, cls: str,
                 maybe: Callable[[bytes], bool]) -> None:
        self.name = name
        self._module, self._cls, self._maybe = module, cls, maybe
        self._reader: Reader | None = None

    def _load(self) -> Reader:
        if self._reader is None:
            mod = importlib.import_module(f"modelhash.fingerprint._formats.{self._module}")
            self._reader = getattr(mod, self._cls)()
        return self._reader

    def sniff(self, head: bytes, path: Path) -> bool:
        return self._maybe(head) and self._load().sniff(head, path)

    def parse(self, path: Path, size: int, fh: BinaryIO) -> ParsedFile:
        return self._load().parse(path, size, fh)


def _readers() -> list[Reader]:
    from modelhash.fingerprint._formats._gguf import GgufReader
    from modelhash.fingerprint._formats._safetensors import SafetensorsReader

    return [
        GgufReader(),
        _Lazy("torch-zip", "_torch", "TorchZipReader", lambda h: h[:4] == b"PK\x03\x04"),
        _Lazy("torch-legacy", "_torch", "TorchLegacyReader", lambda h: h[8:9] != b"{"),
        SafetensorsReader(),
    ]


READERS: list[Reader] = []


def parse_file(path: Path) -> ParsedFile:
    """Detect the format of the file at ``path`` and parse its structure.

    Only a regular file is opened (a FIFO or device is refused without blocking),
    and whatever the reader builds is checked against the shared limits. Any
    exception comes out as ``path``'s one ModelhashError.
    """
    return guarded(path, lambda: _parse(path))


def _parse(path: Path) -> ParsedFile:
    if not READERS:
        READERS.extend(_readers())
    fh, size = open_regular(path)
    with fh:
        try:
            head = fh.read(HEAD_BYTES)
        except OSError as exc:
            raise MalformedFileError(path, f"cannot read: {exc.strerror or exc}") from None
        if size == 0:
            raise MalformedFileError(path, "empty file")
        for reader in READERS:
            if reader.sniff(head, path):
                fh.seek(0)
                parsed = reader.parse(path, size, fh)
                _check(parsed)
                return parsed
    raise UnsupportedFormatError(
        path, "unsupported format (not safetensors, a PyTorch checkpoint or GGUF)"
    )


def _check(parsed: ParsedFile) -> None:
    """The limits every reader's output obeys, whichever reader made it."""
    check_tensor_count(parsed.path, len(parsed.tensors))
    for t in parsed.tensors:
        check_name(parsed.path, t.name)
        check_shape(parsed.path, t.name, t.shape)
