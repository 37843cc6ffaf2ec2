"""The tensors a checkpoint's pickle describes, and the records the engine hashes.

The restricted unpickler builds plain values (:class:`TensorRef` views of
:class:`StorageRef` storages, with a :class:`DType`) inside ordinary dicts and
lists. Checkpoints wrap their weights: Lightning puts them under ``state_dict`` next to
optimizer state and callbacks, DeepSpeed under ``module``, fairseq under
``model``, ESRGAN under ``params_ema``. :func:`flatten_state` follows those
wrapper keys, then names every tensor it finds by its dotted path, the way
``state_dict()`` would. Name prefixes such as ``module.`` are kept: stripping
them is the content layer's job.

:func:`state_records` then checks each tensor view against the storage bytes the
container located (a :class:`Blob`) and says where the tensor's bytes are: a
file span when they are one contiguous stored run, else a ``materialize``
function yielding them in C order.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from modelhash.errors import MalformedFileError, ModelhashError, ResourceLimitError
from modelhash.fingerprint._formats._inflate import InflatedMember
from modelhash.fingerprint._model import TensorRecord, numel

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DTYPES",
    "MAX_DEPTH",
    "MAX_VISITS",
    "WRAPPER_KEYS",
    "Blob",
    "DType",
    "Leaf",
    "Sealed",
    "StateDictError",
    "StorageRef",
    "StorageType",
    "TensorRef",
    "Unsupported",
    "flatten_state",
    "one_line",
    "state_records",
]

WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "module",
    "model",
    "net",
    "params_ema",
    "params",
)
MAX_DEPTH = 100
MAX_VISITS = 2_000_000
CHUNK = 1024 * 1024
AMPLIFICATION = 4
AMPLIFICATION_FLOOR = 1024 * 1024
_MAX_UNWRAP = 8
_LISTED = 6
_COMPLEX_PART = {"C64": 4, "C128": 8}


class Sealed:
    """Base of the values the unpickler builds: a pickle BUILD on one is refused."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError(f"BUILD on {type(self).__name__}")


@dataclass(slots=True, eq=False)
class DType(Sealed):
    """A torch dtype: its torch name, canonical name (None if unsupported), size."""

    torch_name: str
    canonical: str | None
    itemsize: int


@dataclass(slots=True, eq=False)
class StorageType(Sealed):
    """A legacy storage class such as ``torch.HalfStorage``: it stands for a dtype."""

    name: str
    dtype: DType


@dataclass(slots=True, eq=False)
class StorageRef(Sealed):
    """A storage named by a persistent id: key, dtype, element count, byte window.

    ``view`` is ``(byte offset, byte length)`` inside the root storage for the
    storage views of old legacy files, else ``None``.
    """

    key: str
    dtype: DType
    numel: int
    view: tuple[int, int] | None = None


@dataclass(slots=True, eq=False)
class TensorRef(Sealed):
    """A dense tensor as a view of a storage: offset and stride in elements."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: DType


@dataclass(slots=True, eq=False)
class Unsupported(Sealed):
    """A tensor of a kind we do not read (quantized, sparse, nested, meta...)."""

    kind: str


# Element sizes of the dtypes we do not read are still needed to skip their bytes.
_DTYPES: dict[str, tuple[str | None, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2),
    "bfloat16": ("BF16", 2), "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
    "float8_e4m3fnuz": ("F8_E4M3FNUZ", 1), "float8_e5m2fnuz": ("F8_E5M2FNUZ", 1),
    "float8_e8m0fnu": ("F8_E8M0", 1), "complex64": ("C64", 8), "complex128": ("C128", 16),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint64": ("U64", 8), "uint32": ("U32", 4), "uint16": ("U16", 2), "uint8": ("U8", 1),
    "bool": ("BOOL", 1), "complex32": (None, 4), "qint8": (None, 1), "quint8": (None, 1),
    "qint32": (None, 4), "quint4x2": (None, 1), "quint2x4": (None, 1),
    "float4_e2m1fn_x2": (None, 1), "bits1x8": (None, 1), "bits2x4": (None, 1),
    "bits4x2": (None, 1), "bits8": (None, 1), "bits16": (None, 2),
    **{f"uint{n}": (None, 1) for n in range(1, 8)},
    **{f"int{n}": (None, 1) for n in range(1, 8)},
}
DTYPES: dict[str, DType] = {n: DType(f"torch.{n}", c, s) for n, (c, s) in _DTYPES.items()}

Leaf = TensorRef | Unsupported


@dataclass(frozen=True)
class Blob:
    """Where a storage's bytes are: at a file offset, or inside a compressed zip member."""

    nbytes: int
    offset: int | None = None
    member: InflatedMember | None = None


class StateDictError(ValueError):
    """The object graph is too deep or too large to flatten; ``limit`` says which."""

    def __init__(self, reason: str, *, limit: bool) -> None:
        super().__init__(reason)
        self.limit = limit


class _Budget:
    def __init__(self) -> None:
        self.visits = 0

    def spend(self, n: int = 1) -> None:
        self.visits += n
        if self.visits > MAX_VISITS:
            raise StateDictError(f"more than {MAX_VISITS} objects to walk for tensors", limit=True)


def flatten_state(obj: object) -> tuple[list[tuple[str, Leaf]], list[str]]:
    """The tensors of a checkpoint object with dotted names, and notes on what was skipped.

    Containers are dicts, lists, tuples and parameter containers; every other
    leaf that is not a tensor is counted and named in a note. A tensor reached by
    two paths appears under both names, as in ``state_dict()``.
    """
    budget = _Budget()
    notes: list[str] = []
    obj = _unwrap(obj, notes, budget)
    found: list[tuple[str, Leaf]] = []
    skipped = 0
    shown: list[str] = []
    for prefix, key, leaf in _walk(obj, budget):
        if isinstance(leaf, TensorRef | Unsupported):
            found.append((_join(prefix, key), leaf))
            continue
        skipped += 1
        if len(shown) <= _LISTED:
            shown.append(_join(prefix, key) or "<root>")
    if skipped:
        notes.append(f"ignored {skipped} non-tensor entries: {_listing(shown)}")
    return found, notes


def _unwrap(obj: object, notes: list[str], budget: _Budget) -> object:
    """Follow wrapper keys while the value under one of them holds tensors."""
    taken: list[str] = []
    for _ in range(_MAX_UNWRAP):
        if not isinstance(obj, dict):
            break
        for key in WRAPPER_KEYS:
            inner = _get(obj, key)
            if _named(inner) is not None and _has_tensor(inner, budget):
                others = [_key_text(k) for k in obj if not (isinstance(k, str) and k == key)]
                taken.append(key)
                if others:
                    notes.append(
                        f"read the tensors under {'.'.join(taken)!r}; "
                        f"ignored its siblings: {_listing(sorted(others))}"
                    )
                obj = inner
                break
        else:
            break
    return obj


def _get(obj: dict[object, object], key: str) -> object:
    for k, v in obj.items():
        if isinstance(k, str) and k == key:
            return v
    return None


def _named(obj: object) -> dict[object, object] | None:
    """The named children of a dict, or of a parameter container stub."""
    if isinstance(obj, dict):
        return obj
    parameters = getattr(obj, "parameters", None)
    return parameters if isinstance(parameters, dict) else None


def _children(obj: object, budget: _Budget) -> Iterator[tuple[object, object]] | None:
    """The children of a container, charged to the budget before any is touched."""
    if isinstance(obj, list | tuple):
        budget.spend(len(obj))
        return enumerate(obj)
    named = _named(obj)
    if named is None:
        return None
    budget.spend(len(named))
    return iter(named.items())


def _has_tensor(obj: object, budget: _Budget) -> bool:
    stack: list[tuple[object, int]] = [(obj, 0)]
    seen: set[int] = set()
    while stack:
        item, depth = stack.pop()
        if isinstance(item, TensorRef | Unsupported):
            return True
        if id(item) in seen or depth >= MAX_DEPTH:
            continue
        children = _children(item, budget)
        if children is None:
            continue
        seen.add(id(item))
        stack.extend((v, depth + 1) for _, v in children)
    return False


_ROOT = object()


def _walk(obj: object, budget: _Budget) -> Iterator[tuple[str, object, object]]:
    """Depth-first, in container order: ``(parent name, key, leaf)`` for every leaf.

    Names are joined only for containers; a leaf's own name is left to the caller,
    which needs it for tensors and a few skipped entries only.
    """
    root = _children(obj, budget)
    if root is None:
        yield "", _ROOT, obj
        return
    stack: list[tuple[str, Iterator[tuple[object, object]]]] = [("", root)]
    while stack:
        prefix, items = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        key, value = entry
        children = _children(value, budget)
        if children is None:
            yield prefix, key, value
        elif len(stack) >= MAX_DEPTH:
            raise StateDictError(f"containers nested deeper than {MAX_DEPTH} levels", limit=False)
        else:
            stack.append((_join(prefix, key), children))


def _join(prefix: str, key: object) -> str:
    if key is _ROOT:
        return prefix
    text = _key_text(key)
    return f"{prefix}.{text}" if prefix else text


def _key_text(key: object) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool | int | float):
        return str(key)
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    qualname = getattr(key, "qualname", None) if isinstance(key, type) else None
    return qualname if isinstance(qualname, str) else f"<{type(key).__name__}>"


def _listing(names: list[str]) -> str:
    shown = ", ".join(n[:80] for n in names[:_LISTED])
    return shown + (", ..." if len(names) > _LISTED else "")


def _c_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


def state_records(
    path: Path, obj: object, blobs: dict[str, Blob], *, big_endian: bool
) -> tuple[list[TensorRecord], list[str]]:
    """The tensor records of the state dict in ``obj``, and notes on what was skipped.

    Every tensor view must lie inside its storage, and all distinct views together
    may not claim more than AMPLIFICATION times the storage bytes they use.
    """
    try:
        flat, notes = flatten_state(obj)
    except StateDictError as exc:
        if exc.limit:
            raise ResourceLimitError(path, str(exc)) from None
        raise MalformedFileError(path, str(exc)) from None
    return _records(path, flat, blobs, big_endian), notes


def _records(
    path: Path, flat: list[tuple[str, Leaf]], blobs: dict[str, Blob], big_endian: bool
) -> list[TensorRecord]:
    views: dict[tuple[object, ...], int] = {}
    used: set[str] = set()
    records: list[TensorRecord] = []
    for name, leaf in flat:
        if isinstance(leaf, Unsupported):
            raise MalformedFileError(path, f"unsupported tensor type ({leaf.kind}): {name!r}")
        dtype = leaf.dtype.canonical
        if dtype is None:
            raise MalformedFileError(
                path, f"unsupported tensor type {leaf.dtype.torch_name}: {name!r}"
            )
        item = leaf.dtype.itemsize
        storage = leaf.storage
        blob = blobs.get(storage.key)
        if blob is None:
            raise MalformedFileError(path, f"tensor {name!r}: storage {storage.key!r} has no data")
        base, limit = storage.view or (0, storage.numel * storage.dtype.itemsize)
        if base + limit > blob.nbytes:
            raise MalformedFileError(path, f"storage {storage.key!r} is larger than its data")
        count = numel(leaf.shape)
        extent = 0
        if count:
            extent = 1 + sum((d - 1) * s for d, s in zip(leaf.shape, leaf.stride, strict=True))
            extent *= item
            if leaf.offset * item + extent > limit:
                raise MalformedFileError(path, f"tensor {name!r} lies outside its storage")
        start = base + leaf.offset * item
        views[(storage.key, start, leaf.shape, leaf.stride, dtype)] = count * item
        used.add(storage.key)
        records.append(_record(path, name, dtype, leaf, blob, start, extent, big_endian))
    stored = sum(blobs[k].nbytes for k in used)
    viewed = sum(views.values())
    if viewed > AMPLIFICATION * stored + AMPLIFICATION_FLOOR:
        raise ResourceLimitError(path, f"tensors claim {viewed} bytes from {stored} of storage")
    return records


def _record(
    path: Path,
    name: str,
    dtype: str,
    leaf: TensorRef,
    blob: Blob,
    start: int,
    extent: int,
    big_endian: bool,
) -> TensorRecord:
    item = leaf.dtype.itemsize
    nbytes = numel(leaf.shape) * item
    swap = _COMPLEX_PART.get(dtype, item) if big_endian else 1
    if nbytes == 0:
        return TensorRecord(name, dtype, leaf.shape, 0, materialize=lambda: iter(()))
    contiguous = _c_contiguous(leaf.shape, leaf.stride)
    if contiguous and blob.offset is not None and swap == 1:
        return TensorRecord(name, dtype, leaf.shape, nbytes, span=(blob.offset + start, nbytes))
    make = functools.partial(
        _materialize, path, blob, start, extent, leaf.shape, leaf.stride, item, swap, contiguous
    )
    return TensorRecord(name, dtype, leaf.shape, nbytes, materialize=make)


def _materialize(
    path: Path,
    blob: Blob,
    start: int,
    extent: int,
    shape: tuple[int, ...],
    stride: tuple[int, ...],
    item: int,
    swap: int,
    contiguous: bool,
) -> Iterator[bytes]:
    """The C-order bytes of one tensor view, in chunks of about 1 MiB."""
    import numpy as np  # only strided or byte-swapped views need it

    try:
        if contiguous and blob.member is not None:
            pieces = blob.member.read(start, extent)
        else:
            region = _region(path, blob, start, extent)
            view = np.lib.stride_tricks.as_strided(
                region.view(np.dtype((np.void, item))),
                shape=shape,
                strides=tuple(s * item for s in stride),
                writeable=False,
            )
            pieces = _c_chunks(view)
        for piece in pieces:
            if swap > 1:
                piece = np.frombuffer(piece, dtype=f"u{swap}").byteswap().tobytes()
            yield piece
    except ModelhashError:
        raise
    except Exception as exc:
        raise MalformedFileError(path, f"cannot read tensor bytes: {one_line(exc)}") from None


def _region(path: Path, blob: Blob, start: int, extent: int) -> np.ndarray:
    import numpy as np

    if blob.offset is not None:
        offset = blob.offset + start
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(extent,))
    assert blob.member is not None
    return blob.member.region(start, extent)


def _c_chunks(view: np.ndarray) -> Iterator[bytes]:
    """The bytes of ``view`` in C order, a bounded slice at a time."""
    if view.ndim == 0 or view.nbytes <= CHUNK:
        yield view.tobytes()
        return
    row = view.nbytes // view.shape[0]
    rows = CHUNK // row if row else view.shape[0]
    if rows >= 1:
        for i in range(0, view.shape[0], rows):
            yield view[i : i + rows].tobytes()
    else:
        for i in range(view.shape[0]):
            yield from _c_chunks(view[i])


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as a short single line for an error reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
