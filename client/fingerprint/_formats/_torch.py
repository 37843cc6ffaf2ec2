"""PyTorch checkpoints (``torch.save``), read without torch and without running them.

Two containers exist. The zip format (the default since torch 1.6) holds the
pickle as ``<dir>/data.pkl`` and every storage as a ``<dir>/data/<key>`` entry.
The legacy format is five pickles in a row (magic number, protocol version,
system info, the object, the list of storage keys) followed by each storage as
an 8-byte little-endian element count and its raw bytes.

Pickles go through the restricted unpickler in ``_unpickle``; storages are never
read here. A tensor that is one contiguous run of a stored storage becomes a
file span; a strided view, a compressed entry or a big-endian file becomes a
``materialize`` function that yields the tensor's C-order bytes later.
"""

from __future__ import annotations

import io
import itertools
import pickletools
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from modelhash.errors import (
    MalformedFileError,
    ModelhashError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from modelhash.fingerprint._formats._inflate import InflatedMember
from modelhash.fingerprint._formats._pickleflow import lenient_strings
from modelhash.fingerprint._formats._statedict import (
    Blob,
    StorageRef,
    StorageType,
    one_line,
    state_records,
)
from modelhash.fingerprint._formats._unpickle import MAX_PICKLE_BYTES, ScanError, load, scan
from modelhash.fingerprint._limits import MAX_INFLATED
from modelhash.fingerprint._model import ParsedFile

__all__ = ["TorchLegacyReader", "TorchZipReader"]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
CHUNK = 1024 * 1024
MAX_CENTRAL_DIRECTORY = 16 * 1024 * 1024
MAX_INFLATE_RATIO = 100
INFLATE_RATIO_FLOOR = 16 * 1024 * 1024

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_END_RECORD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")


def _guarded(path: Path, parse: Callable[[], ParsedFile]) -> ParsedFile:
    """Run a parse so that only ModelhashError subclasses can escape it."""
    try:
        return parse()
    except ModelhashError:
        raise
    except MemoryError:
        raise ResourceLimitError(path, "out of memory while parsing the checkpoint") from None
    except RecursionError:
        raise MalformedFileError(path, "checkpoint structure nested too deeply") from None
    except zipfile.BadZipFile as exc:
        raise MalformedFileError(path, f"broken zip: {one_line(exc)}") from None
    except OSError as exc:
        raise MalformedFileError(path, f"read error: {exc.strerror or one_line(exc)}") from None
    except Exception as exc:
        reason = f"unreadable PyTorch checkpoint: {type(exc).__name__}: {one_line(exc)}"
        raise MalformedFileError(path, reason) from None


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _count(value: object) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else None  # type: ignore[return-value]


class TorchZipReader:
    """``torch.save`` zip archives: ``<dir>/data.pkl`` plus one entry per storage."""

    name = "torch-zip"

    def sniff(self, head: bytes, path: Path) -> bool:
        """A zip local file header; whether it holds a checkpoint is decided in parse."""
        return head[:4] == b"PK\x03\x04"

    def parse(self, path: Path, size: int, fh: BinaryIO) -> ParsedFile:
        """List the entries, unpickle ``data.pkl`` safely and locate every tensor."""
        return _guarded(path, lambda: _parse_zip(path, size, fh))


def _parse_zip(path: Path, size: int, fh: BinaryIO) -> ParsedFile:
    _check_central_directory(path, size, fh)
    zf = zipfile.ZipFile(fh)
    infos = zf.infolist()
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename in by_name:
            raise MalformedFileError(path, f"zip entry {info.filename!r} appears twice")
        by_name[info.filename] = info
    pkl = _data_pkl(infos)
    if pkl is None:
        raise UnsupportedFormatError(path, "zip file without data.pkl")
    prefix = pkl.filename[: -len("data.pkl")]
    starts = _data_starts(path, size, fh, infos)
    big_endian = _big_endian(path, zf, by_name.get(prefix + "byteorder"))
    if pkl.file_size > MAX_PICKLE_BYTES:
        raise ResourceLimitError(
            path, f"data.pkl of {pkl.file_size} bytes exceeds the {MAX_PICKLE_BYTES}-byte limit"
        )
    _check_member(path, pkl)
    with zf.open(pkl) as member:
        data = member.read(MAX_PICKLE_BYTES + 1)
    try:
        found = scan(data, path, "data.pkl")
    except ScanError as exc:
        raise exc.error(path, "data.pkl") from None

    storages: dict[str, StorageRef] = {}

    def persistent(pid: object) -> object:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _text(pid[0]) == "storage"):
            raise MalformedFileError(path, "data.pkl: unexpected persistent id")
        _, stype, key_obj, location, count = pid
        key = _text(key_obj)
        n = _count(count)
        if not isinstance(stype, StorageType) or key is None or n is None:
            raise MalformedFileError(path, "data.pkl: malformed storage persistent id")
        if _text(location) is None:
            raise MalformedFileError(path, f"storage {key!r}: location is not a string")
        if key in storages:
            return storages[key]
        info = by_name.get(f"{prefix}data/{key}")
        if info is None:
            raise MalformedFileError(path, f"storage {key!r} has no data/{key} entry")
        if n * stype.dtype.itemsize > info.file_size:
            raise MalformedFileError(
                path, f"storage {key!r} claims {n} elements but its entry is {info.file_size} bytes"
            )
        storages[key] = StorageRef(key, stype.dtype, n)
        return storages[key]

    obj = load(found.data, persistent, path, "data.pkl")
    blobs: dict[str, Blob] = {}
    inflated = 0
    for key in storages:
        info = by_name[f"{prefix}data/{key}"]
        _check_member(path, info)
        if info.compress_type == zipfile.ZIP_STORED:
            blobs[key] = Blob(info.file_size, offset=starts[info.filename])
        else:
            inflated += info.file_size
            inflater = InflatedMember(path, info.filename, info.file_size)
            blobs[key] = Blob(info.file_size, member=inflater)
    if inflated > MAX_INFLATED:
        raise ResourceLimitError(path, f"compressed storages inflate to {inflated} bytes")
    tensors, notes = state_records(path, obj, blobs, big_endian=big_endian)
    if found.extensions:
        notes.append(f"data.pkl uses {found.extensions} pickle extension codes")
    return ParsedFile(path=path, format="torch-zip", size=size, tensors=tensors, notes=notes)


def _data_pkl(infos: list[zipfile.ZipInfo]) -> zipfile.ZipInfo | None:
    """The ``<dir>/data.pkl`` entry; with several, the one in the first entry's folder."""
    found = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    if len(found) > 1:
        first = infos[0].filename.split("/", 1)[0]
        found = [i for i in found if i.filename.split("/", 1)[0] == first] or found
    return found[0] if found else None


def _check_central_directory(path: Path, size: int, fh: BinaryIO) -> None:
    """Refuse a central directory too large to list before zipfile reads all of it."""
    tail_len = min(size, _END_RECORD.size + 0xFFFF + _ZIP64_LOCATOR.size)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    at = len(tail) - _END_RECORD.size
    if tail[at : at + 4] != b"PK\x05\x06":
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _END_RECORD.size > len(tail):
        raise MalformedFileError(path, "broken zip: no end of central directory record")
    fields = _END_RECORD.unpack_from(tail, at)
    cd_size = fields[5]
    locator = at - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
        (_, _, end64, _) = _ZIP64_LOCATOR.unpack_from(tail, locator)
        # zipfile reads the zip64 end record just before the locator, whatever
        # offset the locator gives; check both, and refuse a file where they differ.
        before = size - tail_len + locator - _ZIP64_END_RECORD.size
        found = (_zip64_cd_size(fh, end64), _zip64_cd_size(fh, before))
        sizes = {s for s in found if s is not None}
        if len(sizes) > 1:
            raise MalformedFileError(path, "broken zip: zip64 locator disagrees with its record")
        cd_size = max([cd_size, *sizes])
    if cd_size > MAX_CENTRAL_DIRECTORY:
        raise ResourceLimitError(
            path, f"zip central directory of {cd_size} bytes exceeds {MAX_CENTRAL_DIRECTORY}"
        )


def _zip64_cd_size(fh: BinaryIO, offset: int) -> int | None:
    """The central directory size in the zip64 end record at ``offset``, if one is there."""
    if offset < 0:
        return None
    fh.seek(offset)
    record = fh.read(_ZIP64_END_RECORD.size)
    if len(record) != _ZIP64_END_RECORD.size or record[:4] != b"PK\x06\x06":
        return None
    size: int = _ZIP64_END_RECORD.unpack(record)[8]
    return size


def _data_starts(
    path: Path, size: int, fh: BinaryIO, infos: list[zipfile.ZipInfo]
) -> dict[str, int]:
    """The file offset of each entry's data, from its local header; entries must not overlap."""
    starts: dict[str, int] = {}
    extents: list[tuple[int, int, str]] = []
    for info in infos:
        fh.seek(info.header_offset)
        header = fh.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise MalformedFileError(path, f"zip entry {info.filename!r}: bad local header")
        name_len, extra_len = _LOCAL_HEADER.unpack(header)[9:11]
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if fh.read(name_len) != info.orig_filename.encode(encoding, "replace"):
            raise MalformedFileError(path, f"zip entry {info.filename!r}: local name differs")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        end = start + info.compress_size
        if end > size:
            raise MalformedFileError(path, f"zip entry {info.filename!r} is truncated")
        starts[info.filename] = start
        extents.append((info.header_offset, end, info.filename))
    extents.sort()
    for (_, end, name), (begin, _, other) in itertools.pairwise(extents):
        if begin < end:
            raise MalformedFileError(path, f"zip entries {name!r} and {other!r} overlap")
    return starts


def _check_member(path: Path, info: zipfile.ZipInfo) -> None:
    """Only plain stored or deflated members, and no deflate bombs."""
    if info.flag_bits & 0x1:
        raise MalformedFileError(path, f"zip entry {info.filename!r} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise MalformedFileError(path, f"stored zip entry {info.filename!r}: sizes differ")
        return
    if info.compress_type != zipfile.ZIP_DEFLATED:
        raise MalformedFileError(
            path, f"zip entry {info.filename!r}: unsupported compression {info.compress_type}"
        )
    ratio_ok = info.file_size <= max(INFLATE_RATIO_FLOOR, info.compress_size * MAX_INFLATE_RATIO)
    if info.file_size > MAX_INFLATED or not ratio_ok:
        raise ResourceLimitError(
            path,
            f"zip entry {info.filename!r} inflates {info.compress_size} bytes to {info.file_size}",
        )


def _big_endian(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo | None) -> bool:
    if info is None:
        return False
    _check_member(path, info)
    if info.file_size > 16:
        raise MalformedFileError(path, "byteorder entry is too long")
    value = zf.read(info).strip()
    if value not in (b"little", b"big"):
        raise MalformedFileError(path, f"unknown byteorder {value[:16]!r}")
    return value == b"big"


# Opcodes a protocol 0 or 1 pickle can open with: MARK, containers, GLOBAL, INST,
# and the scalars (a bare pickle of one value).
_OLD_FIRST = frozenset(b"(}])cNIJKLMSTUVXFGiP")


def _old_pickle(head: bytes) -> bool:
    """True if ``head`` opens with valid protocol 0/1 opcodes (four, or a whole
    pickle), or with valid ones cut short only where ``head`` itself ends."""
    if not head or head[0] not in _OLD_FIRST:
        return False
    stream = io.BytesIO(head)
    ops = 0
    try:
        with lenient_strings():
            for op, _, _ in pickletools.genops(stream):
                if op.proto > 1:
                    return False
                ops += 1
                if op.name == "STOP" or ops >= 4:
                    return True
    except (ValueError, UnicodeDecodeError):
        return ops >= 1 and stream.tell() >= len(head)
    return False


class TorchLegacyReader:
    """Checkpoints written with ``_use_new_zipfile_serialization=False``, and bare pickles.

    Any pickle is claimed (unless it looks like safetensors), because ``torch.load``
    would run a bare pickle before checking for the magic number: a hostile one must
    be reported as unsafe, not as unsupported. Protocols 2 to 5 open with PROTO;
    protocols 0 and 1 have no header, so their first opcodes are checked instead.
    """

    name = "torch-legacy"

    def sniff(self, head: bytes, path: Path) -> bool:
        """A pickle at offset 0 (PROTO 2-5, or valid protocol 0/1 opcodes), not safetensors."""
        if head[8:9] == b"{":
            return False
        if len(head) >= 2 and head[0] == 0x80:
            return 2 <= head[1] <= 5
        return _old_pickle(head)


    def parse(self, path: Path, size: int, fh: BinaryIO) -> ParsedFile:
        """Unpickle the five pickles safely and locate the storages that follow them."""
        return _guarded(path, lambda: _parse_legacy(path, size, fh))


def _no_persistent_ids(path: Path, where: str) -> Callable[[object], object]:
    def refuse(pid: object) -> object:
        raise MalformedFileError(path, f"{where}: unexpected persistent id")

    return refuse


def _read_pickle(
    path: Path,
    fh: BinaryIO,
    size: int,
    pos: int,
    where: str,
    persistent: Callable[[object], object] | None = None,
) -> tuple[object, int]:
    """Unpickle the pickle starting at ``pos``; return it and the offset after it."""
    available = size - pos
    limit = min(available, MAX_PICKLE_BYTES)
    window = min(CHUNK, limit)
    while True:
        fh.seek(pos)
        data = fh.read(window)
        try:
            found = scan(data, path, where)
            break
        except ScanError as exc:
            if exc.truncated and window < limit:
                window = min(window * 8, limit)
                continue
            if exc.truncated and available > MAX_PICKLE_BYTES and not exc.refused:
                raise ResourceLimitError(
                    path, f"{where} does not end within {MAX_PICKLE_BYTES} bytes"
                ) from None
            raise exc.error(path, where) from None
    obj = load(found.data, persistent or _no_persistent_ids(path, where), path, where)
    return obj, pos + found.end


def _parse_legacy(path: Path, size: int, fh: BinaryIO) -> ParsedFile:
    magic, pos = _read_pickle(path, fh, size, 0, "first pickle")
    if type(magic) is not int or magic != MAGIC_NUMBER:
        raise MalformedFileError(
            path, "a pickle, but not a PyTorch checkpoint (no torch magic number)"
        )
    version, pos = _read_pickle(path, fh, size, pos, "protocol version pickle")
    if type(version) is not int or version != LEGACY_PROTOCOL_VERSION:
        raise MalformedFileError(path, f"unsupported legacy protocol version {version!r}"[:120])
    _, pos = _read_pickle(path, fh, size, pos, "sys_info pickle")
    roots: dict[str, StorageRef] = {}
    obj, pos = _read_pickle(path, fh, size, pos, "main pickle", _legacy_ids(path, roots))
    keys, pos = _read_pickle(path, fh, size, pos, "storage key pickle")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise MalformedFileError(path, "storage key pickle is not a list of strings")
    if len(set(keys)) != len(keys):
        raise MalformedFileError(path, "storage key list repeats a key")
    blobs: dict[str, Blob] = {}
    for key in keys:
        root = roots.get(key)
        if root is None:
            raise MalformedFileError(path, f"storage {key!r} is listed but never used")
        fh.seek(pos)
        raw = fh.read(8)
        if len(raw) < 8:
            raise MalformedFileError(path, f"truncated before storage {key!r}")
        count = int.from_bytes(raw, "little", signed=True)
        if count != root.numel:
            raise MalformedFileError(
                path, f"storage {key!r} holds {count} elements, its pickle says {root.numel}"
            )
        nbytes = count * root.dtype.itemsize
        if pos + 8 + nbytes > size:
            raise MalformedFileError(path, f"storage {key!r} is truncated")
        blobs[key] = Blob(nbytes, offset=pos + 8)
        pos += 8 + nbytes
    tensors, notes = state_records(path, obj, blobs, big_endian=False)
    if pos < size:
        notes.append(f"ignored {size - pos} bytes after the last storage")
    return ParsedFile(path=path, format="torch-legacy", size=size, tensors=tensors, notes=notes)


def _legacy_ids(path: Path, roots: dict[str, StorageRef]) -> Callable[[object], object]:
    """``persistent_load`` for the legacy main pickle: storages and storage views."""

    def persistent(pid: object) -> object:
        if not isinstance(pid, tuple) or not pid:
            raise MalformedFileError(path, "main pickle: unexpected persistent id")
        tag = _text(pid[0])
        if tag == "module" and len(pid) == 4:
            return pid[1]
        if tag != "storage" or len(pid) != 6:
            raise MalformedFileError(path, "main pickle: unexpected persistent id")
        _, stype, key_obj, location, count, view = pid
        key, n = _text(key_obj), _count(count)
        if not isinstance(stype, StorageType) or key is None or n is None:
            raise MalformedFileError(path, "main pickle: malformed storage persistent id")
        if _text(location) is None:
            raise MalformedFileError(path, f"storage {key!r}: location is not a string")
        root = roots.setdefault(key, StorageRef(key, stype.dtype, n))
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and _text(view[0]) is not None):
            raise MalformedFileError(path, f"storage {key!r}: malformed view")
        offset, length = _count(view[1]), _count(view[2])
        if offset is None or length is None:
            raise MalformedFileError(path, f"storage {key!r}: malformed view")
        item = stype.dtype.itemsize
        return StorageRef(key, stype.dtype, length, view=(offset * item, length * item))

    return persistent
