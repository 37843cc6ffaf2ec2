"""A pickle reader for PyTorch checkpoints that never imports or runs anything.

``find_class`` looks ``module.name`` up in :data:`ALLOWED`, a table of our own
inert reconstructors; nothing named in a file is ever imported. Every other global
is answered with a fresh do-nothing placeholder class so that unpickling can go
on and collect *all* offending names, which are then reported together in one
:class:`~modelhash.errors.UnsafeFileError`.

Before the C unpickler sees a pickle, :func:`scan` walks its opcodes once: it finds
the end of the pickle, bounds memo indices and object counts (the C unpickler
sizes its memo from the largest index it is given), and rewrites ``EXT`` opcodes
into plain ``GLOBAL`` ones, because the C unpickler serves extension codes from
the process-wide ``copyreg`` cache without asking ``find_class``.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import io
import pickle
import pickletools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from modelhash.errors import (
    MalformedFileError,
    ModelhashError,
    ResourceLimitError,
    UnsafeFileError,
    printable,
)
from modelhash.fingerprint._formats._pickleflow import follow, lenient_strings
from modelhash.fingerprint._formats._statedict import (
    DTYPES,
    DType,
    Sealed,
    StorageRef,
    StorageType,
    TensorRef,
    Unsupported,
    one_line,
)
from modelhash.fingerprint._limits import MAX_PICKLE_OBJECT_BYTES

__all__ = [
    "ALLOWED",
    "MAX_PICKLE_BYTES",
    "Inert",
    "ModuleStub",
    "Scan",
    "ScanError",
    "load",
    "scan",
]

MAX_PICKLE_BYTES = 64 * 1024 * 1024
MAX_OPCODES = 4_000_000
MAX_NESTING = 200
"""Deepest nesting of values in a pickle; checked before the unpickler builds (and
hashes) anything. Real checkpoints nest under 20 deep."""
MAX_COLLECTION_ITEMS = 1_000_000
"""Items the allow-listed ``set``/``frozenset`` builders may copy in one pickle."""
MAX_REFUSED = 1000
_MEMO_SLACK = 1024
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})


class _SealedMeta(type):
    """Metaclass of the classes find_class hands out: their attributes stay as made."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise pickle.UnpicklingError(f"attribute assignment on {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise pickle.UnpicklingError(f"attribute deletion on {cls.__name__}")


class Inert(metaclass=_SealedMeta):
    """Base of the inert stand-ins find_class hands out for classes it does not build.

    ``qualname`` says which global a subclass stands for; ``refused`` is true for a
    global outside the allow-list. Instances accept any arguments, calls, items and
    state, keep none of it, and never reach the real class.
    """

    __slots__ = ()
    qualname = ""
    refused = False

    def __new__(cls, *args: object, **kwargs: object) -> Inert:
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        return None

    def __call__(self, *args: object, **kwargs: object) -> Inert:
        return type(self)()

    def __setstate__(self, state: object) -> None:
        return None

    def __setitem__(self, key: object, value: object) -> None:
        return None

    def append(self, item: object) -> None:
        return None

    def extend(self, items: object) -> None:
        return None


class ModuleStub(Inert):
    """A torch parameter container (``ParameterDict``): keeps its parameters."""

    __slots__ = ("parameters",)
    parameters: dict[object, object]

    def __new__(cls, *args: object, **kwargs: object) -> ModuleStub:
        self = object.__new__(cls)
        self.parameters = {}
        return self

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0]
        if isinstance(state, dict):
            for part in ("_parameters", "_buffers"):
                found = state.get(part)
                if isinstance(found, dict):
                    self.parameters.update(found)


class PlainOrderedDict(OrderedDict[Any, Any]):
    """``collections.OrderedDict`` as the unpickler rebuilds it: plain data only.

    A real OrderedDict accepts instance state (BUILD sets attributes), so a pickle
    could set an ``items`` attribute that shadows the method and show one set of
    tensors to a reader and another to ``load_state_dict``. This one refuses state.
    """

    def __setstate__(self, state: object) -> None:
        raise pickle.UnpicklingError("OrderedDict given instance state")


def _inert(qualname: str, base: type[Inert] = Inert, *, refused: bool = False) -> type[Inert]:
    name = qualname.rpartition(".")[2] or "Inert"
    attrs = {"__slots__": (), "qualname": qualname, "refused": refused}
    return _SealedMeta(name, (base,), attrs)  # type: ignore[return-value]


def _fail(msg: str) -> NoReturn:
    raise pickle.UnpicklingError(msg)


def _kind(obj: object) -> str:
    return type(obj).__name__


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or len(x) > 64:
        _fail(f"{what} is {_kind(x)}, not a tuple of at most 64 ints")
    if not all(_is_int(d) and d >= 0 for d in x):
        _fail(f"{what} holds a value that is not a non-negative int")
    return tuple(x)


def _tensor(storage: object, offset: object, size: object, stride: object, dtype: object) -> object:
    if not isinstance(storage, StorageRef):
        _fail(f"tensor storage is {_kind(storage)}")
    if not isinstance(dtype, DType):
        _fail(f"tensor dtype is {_kind(dtype)}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        _fail("tensor storage offset is not a non-negative int")
    shape = _ints(size, "tensor size")
    strides = _ints(stride, "tensor stride")
    if len(shape) != len(strides):
        _fail("tensor size and stride differ in length")
    return TensorRef(storage, offset, shape, strides, dtype)


def _flagged(metadata: object) -> bool:
    return isinstance(metadata, dict) and any(bool(v) for v in metadata.values())


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> object:
    if not isinstance(storage, StorageRef):
        _fail(f"tensor storage is {_kind(storage)}")
    return _tensor(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v2(
    storage: object, offset: object, size: object, stride: object,
    requires_grad: object = False, hooks: object = None, metadata: object = None,
) -> object:
    if _flagged(metadata):
        return Unsupported("tensor with conjugate or negative bit")
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: object, offset: object, size: object, stride: object,
    requires_grad: object, hooks: object, dtype: object, metadata: object = None,
) -> object:
    if _flagged(metadata):
        return Unsupported("tensor with conjugate or negative bit")
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: object, *args: object) -> object:
    if not isinstance(data, TensorRef | Unsupported):
        _fail(f"parameter data is {_kind(data)}")
    return data


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> object:
    if not (isinstance(func, _Callable) and func.name.startswith("torch._utils._rebuild_")):
        _fail("_rebuild_from_type_v2 with an unexpected rebuild function")
    if not isinstance(args, tuple):
        _fail("_rebuild_from_type_v2 with arguments that are not a tuple")
    if not (isinstance(new_type, type) and issubclass(new_type, Inert)):
        _fail("_rebuild_from_type_v2 with an unexpected tensor type")
    return func(*args)


def _unsupported(kind: str) -> Callable[..., object]:
    def rebuild(*args: object, **kwargs: object) -> object:
        return Unsupported(kind)

    return rebuild


@dataclass(slots=True, eq=False)
class _Callable(Sealed):
    """A reconstructor function handed out by ``find_class``, immune to BUILD."""

    fn: Callable[..., object]
    name: str

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.fn(*args, **kwargs)


class _Budget(threading.local):
    """What the allow-listed builders of one load may still create (per thread)."""

    bytes_left = MAX_PICKLE_OBJECT_BYTES
    items_left = MAX_COLLECTION_ITEMS

    def reset(self) -> None:
        self.bytes_left = MAX_PICKLE_OBJECT_BYTES
        self.items_left = MAX_COLLECTION_ITEMS

    def spend_bytes(self, n: int) -> None:
        self.bytes_left -= n
        if self.bytes_left < 0:
            raise _OverBudget(
                f"pickle builds more than {MAX_PICKLE_OBJECT_BYTES} bytes of byte strings"
            )

    def spend_items(self, n: int) -> None:
        self.items_left -= n
        if self.items_left < 0:
            raise _OverBudget(f"pickle copies more than {MAX_COLLECTION_ITEMS} set items")


_BUDGET = _Budget()


def _codecs_encode(obj: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        _fail("_codecs.encode used for anything but latin-1 bytes")
    _BUDGET.spend_bytes(len(obj))
    return obj.encode("latin-1")


def _collection(make: Callable[[Iterable[Any]], object]) -> Callable[..., object]:
    def build(items: object = ()) -> object:
        if not isinstance(items, list | tuple | set | frozenset):
            _fail(f"collection built from {_kind(items)}")
        _BUDGET.spend_items(len(items))
        return make(items)

    return build


def _complex(real: object = 0, imag: object = 0) -> complex:
    if not (isinstance(real, int | float) and isinstance(imag, int | float)):
        _fail("complex from non-numbers")
    return complex(real, imag)


def _bytearray(data: object = b"") -> bytearray:
    if not isinstance(data, bytes):
        _fail("bytearray from anything but bytes")
    _BUDGET.spend_bytes(len(data))
    return bytearray(data)


def _torch_size(dims: object = ()) -> tuple[int, ...]:
    return _ints(dims, "torch.Size")


def _reconstructor(cls: object, base: object, state: object = None) -> object:
    if not (isinstance(cls, type) and issubclass(cls, Inert)):
        _fail("copyreg._reconstructor for a class outside the allow-list")
    return cls()


_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}

_REBUILDERS: dict[str, Callable[..., object]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}
_UNSUPPORTED_REBUILDERS = {
    "_rebuild_qtensor": "quantized",
    "_rebuild_sparse_tensor": "sparse",
    "_rebuild_sparse_csr": "sparse",
    "_rebuild_nested_tensor": "nested",
    "_rebuild_meta_tensor_no_storage": "meta",
    "_rebuild_wrapper_subclass": "wrapper-subclass",
    "_rebuild_device_tensor_from_numpy": "numpy-backed",
    "_rebuild_device_tensor_from_cpu_tensor": "device",
    "_rebuild_xla_tensor": "xla",
    "_rebuild_mtia_tensor": "mtia",
}

# Classes that are rebuilt as inert stubs: known-benign metadata seen in real
# checkpoints (Lightning callbacks keyed by class, fairseq's argparse args, numpy
# scalars in training state) and the torch classes, devices, layouts and
# quantization schemes that torch's own rebuilders are given.
INERT_CLASSES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.model_checkpoint",
    "argparse.Namespace",
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "builtins.object",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.device",
    "torch.serialization._get_layout",
    "torch.per_tensor_affine",
    "torch.per_tensor_symmetric",
    "torch.per_channel_affine",
    "torch.per_channel_symmetric",
    "torch.per_channel_affine_float_qparams",
)
MODULE_CONTAINERS = (
    "torch.nn.modules.container.ParameterDict",
    "torch.nn.modules.container.ParameterList",
)


def _allowed() -> dict[str, object]:
    functions: dict[str, Callable[..., object]] = {
        "builtins.set": _collection(set),
        "builtins.frozenset": _collection(frozenset),
        "builtins.complex": _complex,
        "builtins.bytearray": _bytearray,
        "copyreg._reconstructor": _reconstructor,
        "_codecs.encode": _codecs_encode,
        "torch.Size": _torch_size,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    }
    functions.update({f"torch._utils.{n}": fn for n, fn in _REBUILDERS.items()})
    functions.update(
        {f"torch._utils.{n}": _unsupported(k) for n, k in _UNSUPPORTED_REBUILDERS.items()}
    )
    table: dict[str, object] = {k: _Callable(fn, k) for k, fn in functions.items()}
    table["collections.OrderedDict"] = PlainOrderedDict
    table.update({f"torch.{name}": dtype for name, dtype in DTYPES.items()})
    for cls, dname in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda"):
            table[f"{module}.{cls}"] = StorageType(cls, DTYPES[dname])
    for name in ("torch.storage.UntypedStorage", "torch.storage.TypedStorage"):
        table[name] = StorageType(name.rpartition(".")[2], DTYPES["uint8"])
    table.update({name: _inert(name) for name in INERT_CLASSES})
    table.update({name: _inert(name, ModuleStub) for name in MODULE_CONTAINERS})
    return table


ALLOWED: dict[str, object] = _allowed()


def canonical_global(module: str, name: str) -> str:
    """``module.name`` after Python 2 renames (``__builtin__`` -> ``builtins``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, persistent: Callable[[object], object]) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._persistent = persistent
        self.refused: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = canonical_global(module, name)
        found = ALLOWED.get(key)
        if found is not None:
            return found
        placeholder = self.refused.get(key)
        if placeholder is None:
            if len(self.refused) >= MAX_REFUSED:
                raise _TooManyRefused
            placeholder = _inert(key, refused=True)
            self.refused[key] = placeholder
        return placeholder

    def persistent_load(self, pid: Any) -> Any:
        return self._persistent(pid)

    def reported(self) -> list[str]:
        return [printable(name, 200) for name in self.refused]


class _TooManyRefused(pickle.UnpicklingError):
    pass


class _OverBudget(pickle.UnpicklingError):
    pass




@dataclass(frozen=True)
class Scan:
    """What one pass over a pickle's opcodes found: its end, and the bytes to load."""

    end: int
    data: bytes
    extensions: int


class ScanError(ValueError):
    """Broken opcodes. ``truncated``: they ran past the bytes given; ``refused``: the
    globals outside the allow-list named before the break, found by reading the
    opcodes without running them.
    """

    def __init__(self, reason: str, *, truncated: bool, refused: list[str]) -> None:
        super().__init__(reason)
        self.truncated = truncated
        self.refused = refused

    def error(self, path: Path, where: str) -> ModelhashError:
        """The error to raise once the pickle is known to be broken."""
        if self.refused:
            return UnsafeFileError(path, self.refused, where=where)
        return MalformedFileError(path, f"{where}: broken pickle: {self}")


def scan(data: bytes, path: Path, where: str) -> Scan:
    """Walk the opcodes of the pickle at the start of ``data``; check and prepare it.

    Raises ScanError if the pickle is broken or does not end inside ``data``, and
    ResourceLimitError for memo and size bombs.
    """
    flow = follow(
        data,
        max_depth=MAX_NESTING,
        max_opcodes=MAX_OPCODES,
        memo_slack=_MEMO_SLACK,
        extension=_extension,
        canonical=canonical_global,
    )
    if flow.stopped == "depth":
        raise MalformedFileError(path, f"{where}: pickle values nested deeper than {MAX_NESTING}")
    if flow.stopped == "opcodes":
        raise ResourceLimitError(path, f"{where}: more than {MAX_OPCODES} pickle opcodes")
    if flow.stopped == "memo":
        raise ResourceLimitError(path, f"{where}: pickle memo index out of range")
    if flow.broken is not None:
        refused = [printable(n, 200) for n in flow.names if n not in ALLOWED]
        raise ScanError(flow.broken, truncated=flow.truncated, refused=refused)
    extensions = flow.extensions
    end = flow.end
    body = data[:end]
    if extensions:
        body = _rewrite_extensions(body)
    return Scan(end=end, data=body, extensions=extensions)


def _extension(code: int) -> tuple[str, str]:
    """The ``(module, name)`` an EXT code stands for; read, never cached or imported."""
    pair = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
    if isinstance(pair, tuple) and len(pair) == 2:
        return str(pair[0]), str(pair[1])
    return "copyreg", f"_extension_registry[{code}]"


def _rewrite_extensions(data: bytes) -> bytes:
    """Replace every EXT opcode by the GLOBAL it stands for; drop FRAME opcodes."""
    with lenient_strings():
        ops = list(pickletools.genops(data))
    out = bytearray()
    starts = [pos or 0 for _, _, pos in ops] + [len(data)]
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "FRAME":
            continue
        if op.name in _EXT_OPS and isinstance(arg, int):
            module, name = _extension(arg)
            out += b"c" + f"{module}\n{name}\n".encode()
            continue
        out += data[starts[i] : starts[i + 1]]
    return bytes(out)


def load(
    data: bytes, persistent: Callable[[object], object], path: Path, where: str
) -> object:
    """Unpickle one complete pickle (from :func:`scan`) with the allow-list.

    Raises UnsafeFileError if any global outside the allow-list was named, even
    when the pickle then failed to load for another reason.
    """
    unpickler = _Unpickler(data, persistent)
    _BUDGET.reset()
    try:
        with lenient_strings():
            obj = unpickler.load()
    except Exception as exc:
        if unpickler.refused:
            raise UnsafeFileError(path, unpickler.reported(), where=where) from None
        if isinstance(exc, ModelhashError):
            raise
        if isinstance(exc, _OverBudget):
            raise ResourceLimitError(path, f"{where}: too large: {exc}") from None
        if isinstance(exc, MemoryError):
            raise ResourceLimitError(path, f"{where}: out of memory while unpickling") from None
        if isinstance(exc, RecursionError):
            raise MalformedFileError(path, f"{where}: pickle nested too deeply") from None
        raise MalformedFileError(path, f"{where}: broken pickle: {one_line(exc)}") from None
    if unpickler.refused:
        raise UnsafeFileError(path, unpickler.reported(), where=where)
    return obj
