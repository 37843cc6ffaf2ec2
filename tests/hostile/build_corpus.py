"""Build the hostile-input corpus: one small folder per case, each with what to expect.

Run ``python -m tests.hostile.build_corpus OUT`` to write it to OUT (a manifest,
``cases.json``, lists every case), or import :func:`build`. Every file is made here,
byte by byte, without torch: the cases cover each class of hostile input the reader
must survive (names and numbers, deep nesting, hidden tensors, memory, time,
things that are not files, bad adapter factors, printed names, deep trees, pickles
that hide what they run), plus files just inside each limit, which must still be
read. The cases are generic constructions of each class, not replays of one report.

Expectations:

- ``error``: exit 2 and exactly one stderr line for each bad path;
- ``unsafe``: the same, and the line says "unsafe pickle";
- ``ok``: exit 0, fingerprinted.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.fixtures.torch_pickles import (
    EMPTY_TUPLE,
    NONE,
    STOP,
    binbytes,
    call,
    dct,
    glob,
    integer,
    legacy_bytes,
    ordered_dict,
    pickled,
    proto,
    tensor,
    text,
    torch_zip,
)

__all__ = ["Case", "build", "main", "remove_tree"]


@dataclass
class Case:
    """One hostile input: its class, the paths to give, and what must happen."""

    name: str
    kind: str
    paths: list[str]
    expect: str = "error"
    command: str = "fingerprint"
    notes: str = ""
    bad: int = field(default=1)


# -- writers -------------------------------------------------------------------


def safetensors(header: dict[str, object] | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def st_tensors(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    header: dict[str, object] = {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return safetensors(header, data)


def f32(n: int, value: float = 0.5) -> bytes:
    return struct.pack("<f", value) * n


def gguf_str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def gguf(infos: list[tuple[str | bytes, list[int], int, int]], data: bytes, n_tensors: int | None = None) -> bytes:
    """GGUF v3: (name, ne, ggml type, offset) infos, then data at 32-byte alignment."""
    parts = [b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors, 0)]
    for name, ne, typ, off in infos:
        parts.append(gguf_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne))
        parts.append(struct.pack("<IQ", typ, off))
    head = b"".join(parts)
    head += b"\0" * (-len(head) % 32)
    return head + data


def good_weights(path: Path) -> None:
    path.write_bytes(st_tensors({"layer.weight": ("F32", [16, 16], f32(256))}))


# -- the cases -----------------------------------------------------------------


def _names(out: Path, add: Callable[..., None]) -> None:
    p = out / "surrogate.safetensors"
    p.write_bytes(safetensors(json.dumps({"\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(), f32(1)))
    add("lone surrogate tensor name", "names", [p])
    p = out / "dim64.safetensors"
    p.write_bytes(safetensors({"a": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}}))
    add("zero-size tensor with a dimension of 2**64", "names", [p])
    p = out / "dim63.safetensors"
    p.write_bytes(safetensors({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}))
    add("zero-size tensor whose dimensions multiply past 2**64", "names", [p], expect="ok")
    p = out / "longname.safetensors"
    p.write_bytes(st_tensors({"w" * 70_000: ("F32", [16, 16], f32(256))}))
    add("tensor name of 70,000 bytes", "names", [p])
    p = out / "longname.gguf"
    p.write_bytes(gguf([("n" * 70_000, [32, 16], 0, 0)], f32(512)))
    add("GGUF tensor name of 70,000 bytes", "names", [p])
    surrogate = "\udcff".encode("utf-8", "surrogatepass")  # pickle decodes with surrogatepass
    body = dct((b"X" + struct.pack("<I", len(surrogate)) + surrogate, tensor("0", [16, 16])))
    p = torch_zip(out / "surrogate.pt", pickled(body), {"0": f32(256)})
    add("pickle key with a lone surrogate", "names", [p])
    p = out / "negdim.gguf"
    p.write_bytes(gguf([("a", [2**63, 0], 0, 0)], b""))
    add("GGUF dimension of 2**63", "names", [p])


def _nesting(out: Path, add: Callable[..., None]) -> None:
    depth = 1_000_000
    key = NONE + b"\x85" * depth  # TUPLE1, a million deep
    p = torch_zip(out / "deepkey.pt", proto(2) + b"}" + key + NONE + b"s" + STOP, {})
    add("dict key: a tuple nested a million deep", "nesting", [p])
    p = torch_zip(out / "deeplist.pt", proto(2) + b"]" * depth + b"a" * (depth - 1) + STOP, {})
    add("list nested a million deep", "nesting", [p])
    fs = glob("builtins", "frozenset")
    inner = NONE
    for _ in range(2000):
        inner = fs + b"(" + b"]" + inner + b"a" + b"tR"
    p = torch_zip(out / "deepfrozenset.pt", proto(2) + b"}" + inner + NONE + b"s" + STOP, {})
    add("frozenset key nested 2,000 deep", "nesting", [p])
    # A list memoised shallow, then deepened through the memo, then hashed inside
    # a frozenset key: its depth must follow the list, not the memo entry.
    deep = NONE + b"\x85" * 5000
    body = b"]q\x00" + b"0" + b"h\x00" + deep + b"a" + b"0" + fs + b"(h\x00tR" + NONE + b"s"
    p = torch_zip(out / "memo-deepened.pt", proto(2) + b"}" + body + STOP, {})
    add("memoised list deepened after memoising, then hashed", "nesting", [p])
    p = out / "deep.safetensors"
    p.write_bytes(safetensors(b"[" * 100_000 + b"]" * 100_000))
    add("safetensors header nested 100,000 deep", "nesting", [p])
    d = out / "deepindex"
    d.mkdir()
    good_weights(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_bytes(b'{"weight_map":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    add("index.json nested 200,000 deep", "nesting", [d])


def _hidden(out: Path, add: Callable[..., None]) -> None:
    decoy = dct((text("decoy.weight"), tensor("1", [16, 16])))
    # OrderedDict() with SETITEMS of the real tensors, then BUILD {"items": decoy}.
    body = ordered_dict() + b"(" + text("real.weight") + tensor("0", [16, 16]) + b"u"
    body += dct((text("items"), ordered_dict() + b"(" + text("decoy.weight") + tensor("1", [16, 16]) + b"u")) + b"b"
    p = torch_zip(out / "items-shadow.pt", pickled(body), {"0": f32(256), "1": f32(256, 1.0)})
    add("OrderedDict given state that shadows items()", "hidden tensors", [p])
    body = ordered_dict() + b"(" + text("real.weight") + tensor("0", [16, 16]) + b"u"
    body += b"N" + dct((text("keys"), decoy)) + b"\x86b"
    p = torch_zip(out / "slotstate.pt", pickled(body), {"0": f32(256), "1": f32(256, 1.0)})
    add("OrderedDict given (state, slotstate)", "hidden tensors", [p])


def _memory(out: Path, add: Callable[..., None]) -> None:
    n = 20_000_000 // 3
    p = out / "emptylists.safetensors"
    p.write_bytes(safetensors(b'{"__metadata__":{},"x":[' + b"[]," * n + b"[]]}"))
    add("safetensors header of 6.7M empty lists (20 MB)", "memory", [p])
    p = out / "manytensors.gguf"
    infos = [(f"t{i}".encode(), [0], 0, 0) for i in range(1_000_000)]
    p.write_bytes(gguf(infos, b""))
    add("GGUF with a million empty tensors", "memory", [p])
    p = out / "manytensors.safetensors"
    header = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(400_000)) + b"}"
    p.write_bytes(safetensors(header))
    add("safetensors with 400,000 empty tensors", "memory", [p])
    p = out / "limit-tensors.safetensors"
    header = b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(100_000)) + b"}"
    p.write_bytes(safetensors(header))
    add("safetensors with 100,000 empty tensors (the limit)", "memory", [p], expect="ok")
    p = out / "limit-tensors.gguf"
    infos = [(f"t{i}".encode(), [0], 0, 0) for i in range(100_000)]
    p.write_bytes(gguf(infos, b""))
    add("GGUF with 100,000 empty tensors (the limit)", "memory", [p], expect="ok")
    p = out / "limit-values.safetensors"
    entry = b'"t%d":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[%d,%d]}'
    header = b"{" + b",".join(entry % (i, 4 * i, 4 * i + 4) for i in range(100_000)) + b"}"
    p.write_bytes(safetensors(header, f32(100_000)))
    add("safetensors: 100,000 tensors of 16 dims (2.2M JSON values, near the limit)", "memory",
        [p], expect="ok")
    p = out / "limit-sketched.safetensors"
    entry = b'"t%d.weight":{"dtype":"F32","shape":[16,16],"data_offsets":[%d,%d]}'
    n = 100_000
    header = b"{" + b",".join(entry % (i, 1024 * i, 1024 * i + 1024) for i in range(n)) + b"}"
    p.write_bytes(safetensors(header, f32(256 * n)))
    add("safetensors: 100,000 sketchable 16 x 16 matrices (100 MB)", "memory", [p], expect="ok")
    p = torch_zip(out / "opcodes.pt", proto(2) + b"](" + b"}" * 3_900_000 + b"e" + STOP, {})
    add("pickle of 3.9M empty dicts (just under the opcode limit)", "memory", [p])
    p = torch_zip(out / "bigpickle.pt", proto(3) + binbytes(b"z" * 60_000_000) + STOP, {})
    add("data.pkl of 60 MB (just under the pickle size limit)", "memory", [p])
    for label, cols in (("too wide to sketch", 9_728_000), ("just inside the sketch limit", 2_000_000)):
        p = out / f"wide-{cols}.gguf"
        p.write_bytes(gguf([("wide.weight", [cols, 2], 2, 0)], bytes(2 * cols // 32 * 18)))
        add(f"GGUF Q4_0 tensor 2 x {cols:,} ({label})", "memory", [p], expect="ok")
    p = out / "wide.safetensors"
    p.write_bytes(st_tensors({"wide.weight": ("BF16", [2, 3_000_000], bytes(12_000_000))}))
    add("safetensors BF16 tensor 2 x 3M (too wide to sketch)", "memory", [p], expect="ok")
    # bytearray / _codecs.encode amplification: one 1 MiB string copied 1,000 times.
    blob = binbytes(b"x" * (1 << 20)) + b"q\x00"
    body = b"]" + blob + b"0(" + b"".join(call(glob("builtins", "bytearray"), b"h\x00") for _ in range(1000)) + b"e"
    p = torch_zip(out / "bytearray.pt", pickled(body, 3), {})
    add("bytearray of one 1 MiB bytes, 1,000 times", "memory", [p])
    s = text("y" * (1 << 20)) + b"q\x00"
    body = b"]" + s + b"0(" + b"".join(call(glob("_codecs", "encode"), b"h\x00", text("latin1")) for _ in range(1000)) + b"e"
    p = torch_zip(out / "codecs.pt", pickled(body, 3), {})
    add("_codecs.encode of one 1 MiB string, 1,000 times", "memory", [p])
    items = lst_of_ints(100_000) + b"q\x00"
    body = b"]" + items + b"0(" + b"".join(call(glob("builtins", "set"), b"h\x00") for _ in range(200)) + b"e"
    p = torch_zip(out / "sets.pt", pickled(body, 3), {})
    add("set() of one 100,000-item list, 200 times", "memory", [p])
    _lora_memory(out, add)
    _zip64(out, add)


def lst_of_ints(n: int) -> bytes:
    return b"](" + b"".join(integer(i) for i in range(n)) + b"e"


def _lora_memory(out: Path, add: Callable[..., None]) -> None:
    m = n = 65_536
    t = {
        "lora_unet_x.hada_w1_a": ("F32", [m, 1], f32(m)),
        "lora_unet_x.hada_w1_b": ("F32", [1, n], f32(n)),
        "lora_unet_x.hada_w2_a": ("F32", [m, 1], f32(m)),
        "lora_unet_x.hada_w2_b": ("F32", [1, n], f32(n)),
        "lora_unet_x.alpha": ("F32", [], f32(1)),
    }
    p = out / "loha-huge.safetensors"
    p.write_bytes(st_tensors(t))
    add("LoHa whose dense delta is 65536 x 65536 (32 GB as float64)", "memory", [p], expect="ok")
    t = {
        "lora_unet_y.lokr_w1": ("F32", [256, 256], f32(65536)),
        "lora_unet_y.lokr_w2": ("F32", [256, 256], f32(65536)),
    }
    p = out / "lokr-huge.safetensors"
    p.write_bytes(st_tensors(t))
    add("LoKr whose Kronecker product is 65536 x 65536", "memory", [p], expect="ok")


def _zip64(out: Path, add: Callable[..., None]) -> None:
    p = torch_zip(out / "zip64.pt", pickled(dct((text("w"), tensor("0", [16, 16])))), {"0": f32(256)})
    raw = bytearray(p.read_bytes())
    eocd = raw.rfind(b"PK\x05\x06")
    end = raw[eocd:]
    cd_size, cd_offset = struct.unpack_from("<II", end, 12)
    # A truthful-looking zip64 record that the locator points at, and a huge one
    # just before the locator (where zipfile reads it).
    decoy = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 3, 3, cd_size, cd_offset)
    huge = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 3, 3, 2**40, cd_offset)
    decoy_at = eocd
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, decoy_at, 1)
    raw[eocd:] = decoy + huge + locator + end
    p.write_bytes(bytes(raw))
    add("zip64 locator pointing at a decoy record", "memory", [p])


def _time(out: Path, add: Callable[..., None]) -> None:
    n = 6000
    items = [(text(f"t{i}"), tensor("0", [1], offset=i, numel=n, storage_type="ByteStorage")) for i in range(n)]
    p = torch_zip(out / "inflate.pt", pickled(dct(*items)), {"0": bytes(range(256)) * (n // 256) + bytes(n % 256)}, compress=True)
    add("6,000 one-byte tensors of one deflated storage", "time", [p], expect="ok")


    p = out / "vocab.gguf"
    count = 3_900_000
    kv = b"".join([gguf_str("tokenizer.list"), struct.pack("<IIQ", 9, 8, count)]
                  + [gguf_str("a")] * count)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv
    head += gguf_str("w") + struct.pack("<IQQIQ", 2, 16, 16, 0, 0)
    p.write_bytes(head + b"\0" * (-len(head) % 32) + f32(256))
    add("GGUF array of 3.9M strings (just under the item limit)", "time", [p], expect="ok")


def _non_files(out: Path, add: Callable[..., None]) -> None:
    fifo = out / "fifo.safetensors"
    os.mkfifo(fifo)
    add("FIFO as a weight file", "non-files", [fifo])
    d = out / "fifoindex"
    d.mkdir()
    good_weights(d / "model.safetensors")
    os.mkfifo(d / "model.safetensors.index.json")
    add("FIFO as *.index.json", "non-files", [d])
    for dev in ("/dev/zero", "/dev/urandom"):
        name = Path(dev).name
        d = out / f"index-{name}"
        d.mkdir()
        good_weights(d / "model.safetensors")
        os.symlink(dev, d / "model.safetensors.index.json")
        add(f"index.json symlinked to {dev}", "non-files", [d])
        link = out / f"{name}.safetensors"
        os.symlink(dev, link)
        add(f"weight file symlinked to {dev}", "non-files", [link])
    d = out / "modelindex-zero"
    d.mkdir()
    os.symlink("/dev/zero", d / "model_index.json")
    (d / "unet").mkdir()
    good_weights(d / "unet" / "model.safetensors")
    add("model_index.json symlinked to /dev/zero", "non-files", [d],
        notes="not a regular file, so not a diffusers layout: an empty collection")
    sysfs = next((Path(p) for p in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/power/state", "/proc/self/status") if Path(p).exists()), None)
    if sysfs is not None:
        link = out / "sysfs.safetensors"
        os.symlink(sysfs, link)
        add("weight file symlinked to a sysfs/procfs file (size is a lie)", "non-files", [link])
    entry = out / "models--org--sparse"
    (entry / "snapshots" / "abc").mkdir(parents=True)
    (entry / "refs").mkdir()
    good_weights(entry / "snapshots" / "abc" / "model.safetensors")
    with open(entry / "refs" / "main", "wb") as fh:
        fh.truncate(3 * 1024**3)
    add("refs/main a 3 GiB sparse file", "non-files", [entry])
    entry = out / "models--org--escape"
    (entry / "snapshots" / "abc").mkdir(parents=True)
    (entry / "refs").mkdir()
    good_weights(entry / "snapshots" / "abc" / "model.safetensors")
    elsewhere = out / "elsewhere"
    elsewhere.mkdir()
    good_weights(elsewhere / "secret.safetensors")
    (entry / "refs" / "main").write_text("../../elsewhere\n")
    add("refs/main naming ../../elsewhere", "non-files", [entry])
    d = out / "symlink-out"
    d.mkdir()
    os.symlink(elsewhere / "secret.safetensors", d / "model.safetensors")
    add("folder whose weight file links outside it", "non-files", [d])
    d = out / "diffusers-out"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({"unet": ["x", "y"]}))
    os.symlink(elsewhere, d / "unet")
    add("diffusers component folder linking outside", "non-files", [d])
    d = out / "shard-dotdot"
    d.mkdir()
    good_weights(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere/secret.safetensors"}}))
    add("index naming a shard outside the folder", "non-files", [d])


def _lora_factors(out: Path, add: Callable[..., None]) -> None:
    cases = {
        "0-d factor": {"m.lora_up.weight": ("F32", [], f32(1)), "m.lora_down.weight": ("F32", [4, 64], f32(256))},
        "zero-size factor": {"m.lora_up.weight": ("F32", [64, 0], b""), "m.lora_down.weight": ("F32", [0, 64], b"")},
        "mismatched rank": {"m.lora_up.weight": ("F32", [64, 4], f32(256)), "m.lora_down.weight": ("F32", [8, 64], f32(512))},
        "1-d factor": {"m.lora_up.weight": ("F32", [64], f32(64)), "m.lora_down.weight": ("F32", [1, 64], f32(64))},
        "LoHa mismatched": {
            "m.hada_w1_a": ("F32", [64, 4], f32(256)), "m.hada_w1_b": ("F32", [4, 64], f32(256)),
            "m.hada_w2_a": ("F32", [32, 4], f32(128)), "m.hada_w2_b": ("F32", [4, 64], f32(256)),
        },
        "LoHa 0-d": {
            "m.hada_w1_a": ("F32", [], f32(1)), "m.hada_w1_b": ("F32", [4, 64], f32(256)),
            "m.hada_w2_a": ("F32", [64, 4], f32(256)), "m.hada_w2_b": ("F32", [4, 64], f32(256)),
        },
        "LoKr zero-size": {"m.lokr_w1": ("F32", [0, 4], b""), "m.lokr_w2": ("F32", [16, 16], f32(256))},
        "LoKr mismatched product": {
            "m.lokr_w1": ("F32", [4, 4], f32(16)),
            "m.lokr_w2_a": ("F32", [16, 2], f32(32)), "m.lokr_w2_b": ("F32", [3, 16], f32(48)),
        },
    }
    for name, tensors in cases.items():
        p = out / f"lora-{name.replace(' ', '-')}.safetensors"
        p.write_bytes(st_tensors(tensors))
        add(f"LoRA: {name}", "bad LoRA factors", [p])


def _printed(out: Path, add: Callable[..., None]) -> None:
    for label, name in (("newline", "bad\nname.safetensors"), ("ANSI escape", "bad\x1b[31mred\x1b[0m.safetensors"), ("carriage return", "bad\rname.safetensors")):
        p = out / name
        p.write_bytes(b"\0" * 64)
        add(f"file name with a {label}", "printed names", [p])
    d = out / "shard-newline"
    d.mkdir()
    good_weights(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model\n\x1b[2J.safetensors"}}))
    add("index naming a shard with a newline and an ANSI escape", "printed names", [d])
    p = out / "tensorname-escape.safetensors"
    p.write_bytes(safetensors({"a\n\x1b[31m": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, f32(3)))
    add("malformed tensor whose name holds control characters", "printed names", [p])


def _deep_tree(out: Path, add: Callable[..., None]) -> None:
    top = out / "deeptree"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(1200):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        bottom = os.open("bad.safetensors", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(bottom, b"\0" * 64)
        os.close(bottom)
    finally:
        os.close(fd)
    add("check -r over a tree 1,200 levels deep, a bad file at the bottom", "deep trees", [top], command="walk")


def _pickles(out: Path, add: Callable[..., None]) -> None:
    cmd = text("touch /tmp/modelhash-hostile-PWNED")
    # STACK_GLOBAL after pushing junk that POP removes: the scan must not desync.
    sg = text("os") + text("system") + text("junk") + b"0" + b"\x93"
    broken = proto(4) + sg + b"(" + cmd + b"tR" + b"\xff"
    p = out / "pop-desync.pt"
    p.write_bytes(broken)
    add("broken pickle, STACK_GLOBAL after POP", "pickles", [p], expect="unsafe")
    sg = text("os") + text("system") + b"(" + text("a") + text("b") + b"1" + b"\x93"
    p = out / "popmark-desync.pt"
    p.write_bytes(proto(4) + sg + b"(" + cmd + b"tR" + b"\xff")
    add("broken pickle, STACK_GLOBAL after POP_MARK", "pickles", [p], expect="unsafe")
    sg = text("os") + b"q\x01" + text("system") + b"q\x02" + b"0" + b"0" + b"h\x01h\x02\x93"
    p = out / "memo-desync.pt"
    p.write_bytes(proto(4) + sg + b"(" + cmd + b"tR" + b"\xff")
    add("broken pickle, STACK_GLOBAL from the memo after POPs", "pickles", [p], expect="unsafe")
    p = out / "proto0.pt"
    p.write_bytes(b"cos\nsystem\n(S'touch /tmp/modelhash-hostile-PWNED'\ntR.")
    add("protocol 0 pickle calling os.system", "pickles", [p], expect="unsafe")
    p = out / "proto1.pt"
    p.write_bytes(b"cos\nsystem\nq\x00(X\x05\x00\x00\x00touchtR.")
    add("protocol 1 pickle calling os.system", "pickles", [p], expect="unsafe")
    p = out / "proto0-broken.pt"
    p.write_bytes(b"cposix\nsystem\n(S'touch /tmp/x'\ntR\xff")
    add("broken protocol 0 pickle naming posix.system", "pickles", [p], expect="unsafe")
    main = tensor("k0", [4, 4], legacy=True).replace(b"\x89", b"I00\n")
    body = b"}(" + text("w") + main + b"u."
    p = out / "legacy-proto1.pt"
    p.write_bytes(legacy_bytes(body, [("k0", 16, f32(16))]).replace(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(0x1950A86A20F9469CFC6C, protocol=1), 1))
    add("legacy checkpoint whose pickles are protocol 1 (no PROTO)", "pickles", [p], expect="ok")
    p = out / "extension.pt"
    p.write_bytes(proto(2) + b"\x82\x01" + EMPTY_TUPLE + b"R" + STOP)
    add("EXT1 opcode (copyreg extension code)", "pickles", [p], expect="unsafe")


BUILDERS = (_names, _nesting, _hidden, _memory, _time, _non_files, _lora_factors, _printed, _deep_tree, _pickles)


def build(out: Path, builders: tuple[Callable[..., None], ...] = BUILDERS) -> list[Case]:
    """Write the corpus (or the classes ``builders`` make) under ``out``, which must
    not exist, and return its cases."""
    out.mkdir(parents=True)
    good_weights(out / "good.safetensors")
    cases: list[Case] = []

    def add(name: str, kind: str, paths: list[Path], expect: str = "error", command: str = "fingerprint", notes: str = "") -> None:
        bad = 0 if expect == "ok" else len(paths)
        cases.append(Case(name, kind, [str(p) for p in paths], expect, command, notes, bad))

    for builder in builders:
        sub = out / builder.__name__.strip("_")
        sub.mkdir()
        builder(sub, add)
    (out / "cases.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    return cases


def corpus_bytes(out: Path) -> int:
    """Bytes the corpus's regular files take on disk (sparse files as stored)."""
    total = 0
    stack = [str(out)]
    while stack:  # iterative: the deep tree is deeper than Python's recursion limit
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def main() -> None:
    out = Path(sys.argv[1])
    cases = build(out)
    kinds = sorted({c.kind for c in cases})
    print(f"{len(cases)} cases in {len(kinds)} classes, {corpus_bytes(out):,} bytes on disk: {out}")


if __name__ == "__main__":
    main()


def remove_tree(top: Path) -> None:
    """Remove a folder tree of any depth (shutil.rmtree recurses, so it cannot)."""
    stack = [str(top)]
    while stack:
        current = stack[-1]
        subdirs = []
        with os.scandir(current) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                else:
                    os.unlink(entry.path)
        if subdirs:
            stack.extend(subdirs)
        else:
            os.rmdir(current)
            stack.pop()
