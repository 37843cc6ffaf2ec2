"""Follow a pickle's stack without running it: the globals it names and how deep it nests.

Each opcode's stack effect comes from :mod:`pickletools` (``stack_before`` and
``stack_after``), so MARK, POP, POP_MARK, DUP and the memo are followed exactly as
the real unpickler would: a value pushed and then popped cannot shift which two
strings a later STACK_GLOBAL takes. A broken pickle is followed up to where it
breaks, because the real unpickler runs every opcode before that point.

Every value on the simulated stack is an object id with a nesting depth. Building
a container gives a new object one level deeper than its deepest part; APPEND,
SETITEM, ADDITEMS and BUILD deepen the container they modify, by id, so a list
changed after it was memoised is seen changed wherever it is fetched. Tuples and
frozensets (the only hashable containers) are immutable, so their depth is final
when they are built: a dict key nested a million deep is refused here, before the C
unpickler would hash it recursively and overflow the C stack.
"""

from __future__ import annotations

import io
import pickletools
import warnings
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["Flow", "follow", "lenient_strings"]

_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_GLOBAL_OPS = frozenset({"GLOBAL", "INST"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_MARK = -1
_MAX_NAME = 256


@dataclass
class Flow:
    """What following the stack found.

    ``names``: globals named; ``depth``: deepest nesting seen; ``end``: offset after
    the last opcode read; ``broken``: why the opcodes broke (None if they did not),
    ``truncated`` if that was at the end of ``data``; ``stopped``: the limit that
    ended the walk early (``depth``, ``opcodes`` or ``memo``), else None;
    ``extensions``: EXT opcodes seen.
    """

    names: dict[str, None] = field(default_factory=dict)
    depth: int = 0
    end: int = 0
    broken: str | None = None
    truncated: bool = False
    stopped: str | None = None
    extensions: int = 0


class _Stack:
    """Object ids on the stack; depths in a compact array indexed by id (2 bytes per
    object), strings only while on the stack or in the memo. Values that can never
    change or nest (numbers, bytes, None) all share id 0, of depth 0."""

    def __init__(self) -> None:
        self.items: list[int] = []  # object ids, or _MARK
        self.depth = array("H", [0])
        self.text: dict[int, str] = {}
        self.memo: dict[int, int] = {}
        self.memoised: set[int] = set()

    def new(self, depth: int) -> int:
        self.depth.append(min(depth, 0xFFFF))
        return len(self.depth) - 1

    def pop(self) -> int | None:
        if self.items:
            item = self.items.pop()
            return None if item == _MARK else item
        return None

    def pop_mark(self) -> list[int]:
        out: list[int] = []
        while self.items:
            item = self.items.pop()
            if item == _MARK:
                break
            out.append(item)
        out.reverse()
        return out


# Per opcode: (pops a mark-delimited slice, items popped below it, items pushed,
# modifies its first operand, is an empty container).
_PLAN: dict[str, tuple[bool, int, int, bool, bool]] = {}
for _op in pickletools.opcodes:
    _before = _op.stack_before
    _mark = pickletools.markobject in _before
    _below = _before.index(pickletools.markobject) if _mark else len(_before)
    _PLAN[_op.name] = (
        _mark, _below, len(_op.stack_after), _op.name in _MUTATORS, _op.name.startswith("EMPTY_")
    )


@contextmanager
def lenient_strings() -> Iterator[None]:
    """Decode pickle strings as :mod:`pickle` does, without its DeprecationWarning.

    A protocol-0 string with an invalid escape (a backslash before a byte that
    starts no escape) loads with a DeprecationWarning from the escape decoder, in
    :mod:`pickletools` as in :mod:`pickle`. Where warnings are errors, that would end
    the read of a file pickle itself reads; the warning says nothing about the file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@lenient_strings()
def follow(
    data: bytes,
    *,
    max_depth: int,
    max_opcodes: int,
    memo_slack: int,
    extension: Callable[[int], tuple[str, str]],
    canonical: Callable[[str, str], str],
) -> Flow:
    """Follow the opcodes of the pickle at the start of ``data`` (see the module doc).

    Stops early, with ``stopped`` set, at the first value nested deeper than
    ``max_depth``, past ``max_opcodes`` opcodes, or at a memo index more than
    ``memo_slack`` past the memo's size (the C unpickler sizes its memo by it).
    """
    flow = Flow()
    st = _Stack()
    items = st.items
    depths = st.depth
    memo_count = 0
    stream = io.BytesIO(data)
    count = 0
    try:
        for op, arg, _ in pickletools.genops(stream):
            count += 1
            if count > max_opcodes:
                flow.stopped = "opcodes"
                return flow
            name = op.name
            mark, below, pushed, mutates, empty = _PLAN[name]
            if not mark and not below and name not in _SPECIAL:
                # Pushes only: a constant, an empty container, a persistent id...
                if pushed:
                    if isinstance(arg, str):
                        ident = st.new(0)
                        if len(arg) <= _MAX_NAME:
                            st.text[ident] = arg
                        items.append(ident)
                    else:
                        items.append(st.new(1) if empty else 0)
                continue
            if name in _SPECIAL:
                if name == "MARK":
                    items.append(_MARK)
                elif name in _PUT_OPS:
                    index = arg if isinstance(arg, int) else memo_count
                    if index > memo_count + memo_slack:
                        flow.stopped = "memo"
                        return flow
                    memo_count += 1
                    if items and items[-1] != _MARK:
                        st.memo[index] = items[-1]
                        st.memoised.add(items[-1])
                elif name in _GET_OPS:
                    found = st.memo.get(arg) if isinstance(arg, int) else None
                    items.append(found if found is not None else 0)
                elif name == "DUP":
                    if items:
                        items.append(items[-1])
                elif name in _GLOBAL_OPS:
                    if isinstance(arg, str):
                        module, _, attr = arg.partition(" ")
                        flow.names[canonical(module, attr)] = None
                    if name == "INST":
                        st.pop_mark()
                    items.append(0)
                elif name in _EXT_OPS:
                    flow.extensions += 1
                    if isinstance(arg, int):
                        flow.names[".".join(extension(arg))] = None
                    items.append(0)
                elif name == "STACK_GLOBAL":
                    attr_id, mod_id = st.pop(), st.pop()
                    mod = st.text.get(mod_id) if mod_id else None
                    att = st.text.get(attr_id) if attr_id else None
                    if mod is not None and att is not None:
                        flow.names[canonical(mod, att)] = None
                    items.append(0)
                elif name == "STOP":
                    st.pop()
                    break
                continue
            popped = st.pop_mark() if mark else []
            for _ in range(below):
                got = st.pop()
                if got is not None:
                    popped.insert(0, got)
            if mutates and popped:
                target = popped[0]
                depth = depths[target]
                for p in popped[1:]:
                    if depths[p] + 1 > depth:
                        depth = depths[p] + 1
                if target:
                    depths[target] = min(depth, 0xFFFF)
                items.append(target)
            elif pushed:
                depth = 1 + max((depths[p] for p in popped), default=0) if popped else 0
                items.append(st.new(depth) if depth else 0)
            else:
                depth = 0
            if depth > flow.depth:
                flow.depth = depth
                if depth > max_depth:
                    flow.stopped = "depth"
                    return flow
            if st.text:
                for p in popped:
                    if p not in st.memoised:
                        st.text.pop(p, None)
    except (ValueError, UnicodeDecodeError) as exc:
        flow.broken = " ".join(str(exc).split())[:200] or type(exc).__name__
        flow.truncated = stream.tell() >= len(data)
    flow.end = stream.tell()
    return flow


_SPECIAL = frozenset(
    {"MARK", "DUP", "STOP", "STACK_GLOBAL"} | _PUT_OPS | _GET_OPS | _GLOBAL_OPS | _EXT_OPS
)
