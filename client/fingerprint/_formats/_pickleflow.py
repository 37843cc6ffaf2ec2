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
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Flow", "follow"]

_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_GLOBAL_OPS = frozenset({"GLOBAL", "INST"})
_EXT_OPS = frozenset({"EXT1", "EXT2", "EXT4"})
_MARK = -1
_MAX_NAME = 256


@dataclass
class Flow:
    """What following the stack found: globals named, deepest nesting, and where
    it stopped (``broken`` is the reason if the opcodes broke, else None)."""

    names: dict[str, None] = field(default_factory=dict)
    depth: int = 0
    broken: str | None = None
    too_deep: bool = False


class _Stack:
    """Object ids on the stack; depths in a compact array indexed by id (2 bytes per
    object), strings only while on the stack or in the memo."""

    def __init__(self) -> None:
        self.items: list[int] = []  # object ids, or _MARK
        self.depth = array("H", [0])
        self.text: dict[int, str] = {}
        self.memo: dict[int, int] = {}
        self.memoised: set[int] = set()

    def new(self, depth: int, text: str | None = None) -> int:
        self.depth.append(min(depth, 0xFFFF))
        ident = len(self.depth) - 1
        if text is not None and len(text) <= _MAX_NAME:
            self.text[ident] = text
        return ident

    def deepen(self, ident: int, depth: int) -> None:
        self.depth[ident] = min(depth, 0xFFFF)

    def consumed(self, ident: int) -> None:
        if ident not in self.memoised:
            self.text.pop(ident, None)

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


def follow(
    data: bytes,
    max_depth: int,
    extension: Callable[[int], tuple[str, str]],
    canonical: Callable[[str, str], str],
) -> Flow:
    """Follow the opcodes of the pickle at the start of ``data`` (see the module doc).

    Stops early, with ``too_deep`` set, as soon as a value nests deeper than
    ``max_depth``.
    """
    flow = Flow()
    st = _Stack()
    memo_count = 0
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name == "MARK":
                st.items.append(_MARK)
                continue
            if name in _PUT_OPS:
                if st.items and st.items[-1] != _MARK:
                    st.memo[arg if isinstance(arg, int) else memo_count] = st.items[-1]
                    st.memoised.add(st.items[-1])
                memo_count += 1
                continue
            if name in _GET_OPS:
                found = st.memo.get(arg) if isinstance(arg, int) else None
                st.items.append(found if found is not None else 0)
                continue
            if name == "DUP":
                if st.items:
                    st.items.append(st.items[-1])
                continue
            popped = _take(st, op)
            if name in _GLOBAL_OPS and isinstance(arg, str):
                module, _, attr = arg.partition(" ")
                flow.names[canonical(module, attr)] = None
            elif name == "STACK_GLOBAL" and len(popped) == 2:
                mod, att = (st.text.get(i) for i in popped)
                if mod is not None and att is not None:
                    flow.names[canonical(mod, att)] = None
            elif name in _EXT_OPS and isinstance(arg, int):
                flow.names[".".join(extension(arg))] = None
            deepest = _push(st, op, popped, arg)
            for ident in popped:
                st.consumed(ident)
            if deepest > flow.depth:
                flow.depth = deepest
                if deepest > max_depth:
                    flow.too_deep = True
                    return flow
            if name == "STOP":
                break
    except (ValueError, UnicodeDecodeError) as exc:
        flow.broken = " ".join(str(exc).split())[:200] or type(exc).__name__
    return flow


def _take(st: _Stack, op: pickletools.OpcodeInfo) -> list[int]:
    """Pop what ``op`` consumes: a mark-delimited slice, then the items below the mark."""
    before = op.stack_before
    popped: list[int] = []
    if pickletools.markobject in before:
        popped = st.pop_mark()
        before = before[: before.index(pickletools.markobject)]
    for _ in before:
        got = st.pop()
        if got is not None:
            popped.insert(0, got)
    return popped


def _push(st: _Stack, op: pickletools.OpcodeInfo, popped: list[int], arg: object) -> int:
    """Push what ``op`` produces; return the depth of what it made or changed."""
    if not op.stack_after:
        return 0
    if op.name in _MUTATORS and popped:
        target, parts = popped[0], popped[1:]
        depth = max([st.depth[target]] + [st.depth[p] + 1 for p in parts])
        if target:
            st.deepen(target, depth)
        st.items.append(target)
        popped.pop(0)  # the target stays on the stack
        return depth
    if popped:
        depth = 1 + max(st.depth[p] for p in popped)
    else:
        depth = 1 if op.name.startswith("EMPTY_") else 0
    for _ in op.stack_after:
        st.items.append(st.new(depth, arg if isinstance(arg, str) else None))
    return depth
