"""Time `modelhash fingerprint` against one `openssl dgst -sha256` pass on the same file.

Writes a safetensors file of --size-gib (default 1 GiB) of random fp16 weights in
--workdir, warms the page cache, then runs each command --repeat times and prints
the best wall time, throughput, peak RSS and the ratio to openssl. The same bytes
are also fingerprinted as an upload body (all layers, read in 1 MiB chunks from a
pipe-like iterator, as ``scan_upload`` does, without a registry). Also reports
MB/s for a sharded folder and, when torch is importable (or --torch-python names an
interpreter that has it), for a PyTorch zip checkpoint.

    python benchmarks/bench_fingerprint.py --size-gib 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TENSOR_MIB = 64


def write_safetensors(path: Path, total_bytes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = max(1, total_bytes // (TENSOR_MIB << 20))
    sd = {}
    for i in range(n):
        # Finite fp16 values, as real weights are: the sketch layer decodes every one.
        words = rng.standard_normal((TENSOR_MIB << 20) // 2, dtype=np.float32) * 0.02
        sd[f"model.layers.{i}.mlp.weight"] = words.astype(np.float16).reshape(-1, 1024)
    save_file(sd, str(path))


def write_sharded(folder: Path, src: Path, shards: int = 4) -> None:
    from safetensors import safe_open

    folder.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src), framework="numpy") as f:
        names = sorted(f.keys())
        weight_map = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            part = names[s * per : (s + 1) * per]
            if not part:
                continue
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: f.get_tensor(k) for k in part}, str(folder / fname))
            weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


TORCH_WRITER = """
import sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1]), sys.argv[2])
"""


def write_torch_zip(dst: Path, src: Path, torch_python: str | None) -> bool:
    python = torch_python or sys.executable
    try:
        subprocess.run([python, "-c", TORCH_WRITER, str(src), str(dst)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False
    return True


# Peak RSS is read by a small wrapper process: a child's ru_maxrss also counts the
# memory of whichever process forked it, and this script holds large arrays.
RSS_WRAPPER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
err = p.stderr.read().decode()
cpu = usage.ru_utime + usage.ru_stime
print(os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024, cpu, err.strip()[:500], sep="\\t")
"""


# The upload path: the body arrives as 1 MiB chunks of an iterator (never as a file),
# and every layer is computed, exactly as scan_upload does before asking the registry.
STREAM_DRIVER = """
import sys
from modelhash._stream import Body, fingerprint_body
def body(path):
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(1 << 20):
            yield block
out = fingerprint_body(Body(body(sys.argv[1]), "upload.safetensors", 1 << 50), layers="all")
assert out.error is None and out.fingerprint is not None and out.fingerprint.sketch is not None, out.error
print(out.fingerprint.content.hex)
"""


# On a loaded machine the wall time of a multi-threaded pass says little about an idle
# one. This measures, in one process, the CPU time of each lane of the read pass and
# of the reading thread: on idle cores the pass takes about as long as the busiest.
# It also sums the CPU time of each kind of work item over the lanes (the file's
# SHA-256, AutoV3's, BLAKE3, the per-tensor BLAKE3, the sketch's stripes, ...).
LANES_DRIVER = """
import json, sys, time, threading
from pathlib import Path
import modelhash.fingerprint._pass as p
from modelhash._stream import Body, fingerprint_body
from modelhash.fingerprint import fingerprint_path
busy = {}
kinds = {}
lock = threading.Lock()
pack = p._pack
def kind(fn):
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return type(fn).__name__ if name == "__call__" else name
def timed(fn):
    key = kind(fn)
    def run(off, view):
        t0 = time.thread_time()
        fn(off, view)
        dt = time.thread_time() - t0
        with lock:
            kinds[key] = kinds.get(key, 0.0) + dt
    return run
def timed_pack(works, lanes):
    out = []
    works = [p.Work(timed(w.fn), w.cost) for w in works]
    for i, lane in enumerate(pack(works, lanes)):
        def run(off, view, lane=lane, i=i):
            t0 = time.thread_time()
            lane(off, view)
            with lock:
                busy[i] = busy.get(i, 0.0) + time.thread_time() - t0
        out.append(run)
    return out
p._pack = timed_pack
def body(path):
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(1 << 20):
            yield block
mode, path = sys.argv[1], sys.argv[2]
t0 = time.thread_time()
if mode == "stream":
    out = fingerprint_body(Body(body(path), "upload.safetensors", 1 << 50), layers="all")
else:
    (out,) = fingerprint_path(Path(path), layers=mode)
assert out.error is None, out.error
print(json.dumps({"reader": time.thread_time() - t0, "lanes": sorted(busy.values()),
                  "kinds": kinds}))
"""


# What the exact layers cannot avoid: two SHA-256 passes (the file, and AutoV3's
# slice after the header), two BLAKE3 passes (the file, and the content layer's
# per-tensor hashes) and a CRC32, each timed alone, single-threaded, over the
# file's bytes in memory. Spread perfectly over every core, with the interpreter's
# start-up on top, that is the fastest any reading of the file could be here.
FLOOR_DRIVER = """
import hashlib, json, mmap, sys, time
import blake3
try:
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32
with open(sys.argv[1], "rb") as fh:
    m = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
view = memoryview(m)
for i in range(0, len(view), 1 << 24):  # fault the pages in first, untimed
    hashlib.sha256(view[i : i + (1 << 22)])
out = {}
for name, make in (("sha256", hashlib.sha256), ("blake3", lambda: blake3.blake3(max_threads=1))):
    h = make()
    t0 = time.thread_time()
    for i in range(0, len(view), 1 << 23):
        h.update(view[i : i + (1 << 23)])
    out[name] = time.thread_time() - t0
c = 0
t0 = time.thread_time()
for i in range(0, len(view), 1 << 23):
    c = crc32(view[i : i + (1 << 23)], c)
out["crc32"] = time.thread_time() - t0
print(json.dumps(out))
"""


def floor(path: Path, modelhash: str, tiny: Path) -> tuple[dict[str, float], float]:
    """CPU seconds of each unavoidable primitive over ``path``, and the wall time of
    the CLI on a tiny file (its start-up), best of three."""
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", FLOOR_DRIVER, str(path)],
                             capture_output=True, text=True, check=True, env=ENV)
        runs.append(json.loads(out.stdout))
    prims = {k: min(r[k] for r in runs) for k in runs[0]}
    start = min(run([modelhash, "fingerprint", "--layers", "exact", "--json", "--no-progress",
                     str(tiny)])[0] for _ in range(3))
    return prims, start


def lanes(mode: str, path: Path) -> tuple[float, list[float], dict[str, float]]:
    out = subprocess.run([sys.executable, "-c", LANES_DRIVER, mode, str(path)],
                         capture_output=True, text=True, check=True, env=ENV)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    kinds = {str(k): float(v) for k, v in data["kinds"].items()}
    return float(data["reader"]), [float(x) for x in data["lanes"]], kinds


# Work items by the name lanes() reports them under.
KINDS = {"sha": "SHA-256", "autov3": "AutoV3 SHA-256", "b3": "BLAKE3", "SpanHasher":
         "tensor BLAKE3", "crc": "CRC32", "SketchWork": "sketch", "SpanCopier": "kept spans"}


# An installed package has its bytecode compiled (pip does it); an editable checkout
# gets it on first import, unless the environment forbids writing it. Start-up is
# part of what is measured, so the commands run as an installed package would.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of one run."""
    out = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], capture_output=True,
                         text=True, check=True, env=ENV)
    code, wall, rss, cpu, err = out.stdout.rstrip("\n").split("\t", 4)
    if int(code) != 0:
        raise SystemExit(f"{cmd[0]} failed: {err}")
    return float(wall), int(rss), float(cpu)


def best(cmd: list[str], repeat: int) -> tuple[float, int, float]:
    """Best wall time, highest peak RSS and least CPU time over ``repeat`` runs.

    The commands are run in turn (not all repeats of one, then the next), by the
    caller, so a change in machine load hits every row alike."""
    runs = [run(cmd) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)


def tree_size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def warm(p: Path) -> None:
    for f in [p] if p.is_file() else sorted(p.rglob("*")):
        if f.is_file():
            with f.open("rb") as fh:
                while fh.read(16 << 20):
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("benchmarks/_work"))
    ap.add_argument("--modelhash", default=shutil.which("modelhash") or "modelhash")
    ap.add_argument("--torch-python", default=None, help="an interpreter with torch, for the zip checkpoint row")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--file", type=Path, default=None,
                    help="time this safetensors file instead of writing one (for real shapes: "
                    "the invariant layer measures only matrices within its size limits)")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    st = args.file or args.workdir / "bench.safetensors"
    size = st.stat().st_size if args.file else int(args.size_gib * (1 << 30))
    if not st.exists() or abs(st.stat().st_size - size) > (TENSOR_MIB << 20):
        print(f"writing {size / 2**30:.2f} GiB safetensors ...", file=sys.stderr)
        write_safetensors(st, size)
    warm(st)
    load = f"{os.getloadavg()[0]:.2f}"
    nbytes = st.stat().st_size
    mh = [args.modelhash, "fingerprint", "--layers", "exact", "--json", "--no-progress"]
    mh_all = [args.modelhash, "fingerprint", "--layers", "all", "--json", "--no-progress"]

    cmds = {
        "openssl dgst -sha256 (1 pass)": ["openssl", "dgst", "-sha256", str(st)],
        "modelhash fingerprint --layers exact": [*mh, str(st)],
        "modelhash fingerprint --layers all": [*mh_all, str(st)],
        "upload body streamed, all layers": [sys.executable, "-c", STREAM_DRIVER, str(st)],
    }
    runs: dict[str, list[tuple[float, int, float]]] = {k: [] for k in cmds}
    for cmd in cmds.values():  # untimed: compiles bytecode, warms the libraries' pages
        run(cmd)
    for _ in range(args.repeat):  # interleaved, so load changes hit every command alike
        for name, cmd in cmds.items():
            runs[name].append(run(cmd))
    stats = {k: (min(r[0] for r in v), max(r[1] for r in v), min(r[2] for r in v))
             for k, v in runs.items()}
    (ref_t, _, ref_cpu), (mh_t, _, mh_cpu), (all_t, _, all_cpu), (stream_t, _, stream_cpu) = (
        stats.values())
    ref_rate = nbytes / ref_t / 1e6
    rows = [(name, t, rss, nbytes, cpu) for name, (t, rss, cpu) in stats.items()]

    print("busiest lane of the read pass, CPU seconds (what bounds it on idle cores):")
    for mode, label in (("exact", "file, exact layers"), ("all", "file, all layers"),
                        ("stream", "upload body streamed, all layers")):
        reader, busy, kinds = min((lanes(mode, st) for _ in range(args.repeat)),
                                  key=lambda r: max([r[0], *r[1]]))
        crit = max([reader, *busy])
        print(f"  {label:34} lanes {', '.join(f'{b:.2f}' for b in busy)}; reading thread "
              f"{reader:.2f}; busiest / openssl CPU: {crit / ref_cpu:.2f}x")
        shown = sorted(((KINDS.get(k, k), v) for k, v in kinds.items() if v >= 0.005),
                       key=lambda kv: -kv[1])
        print(f"  {'':34} of which {', '.join(f'{k} {v:.2f}' for k, v in shown)}")

    tiny = args.workdir / "tiny.safetensors"
    save_file({"w": np.zeros((4, 4), dtype=np.float16)}, str(tiny))
    prims, start = floor(st, args.modelhash, tiny)
    cores = os.cpu_count() or 1
    need = 2 * prims["sha256"] + 2 * prims["blake3"] + prims["crc32"]
    least = need / cores + start
    print(f"unavoidable work of the exact layers, CPU s over this file: SHA-256 "
          f"{prims['sha256']:.2f} (x2), BLAKE3 {prims['blake3']:.2f} (x2), CRC32 "
          f"{prims['crc32']:.2f}; start-up {start:.2f} s wall")
    print(f"  floor for the exact layers on {cores} cores: {least:.3f} s = "
          f"{least / ref_t:.2f}x openssl (spread perfectly, no copy, no overhead)")

    sharded = args.workdir / "sharded"
    if not sharded.exists():
        write_sharded(sharded, st)
    warm(sharded)
    t, rss, cpu = best([*mh, str(sharded)], args.repeat)
    rows.append(("modelhash, sharded folder (4 shards)", t, rss, tree_size(sharded), cpu))

    pt = args.workdir / "bench.pt"
    if pt.exists() or write_torch_zip(pt, st, args.torch_python):
        warm(pt)
        t, rss, cpu = best([*mh, str(pt)], args.repeat)
        rows.append(("modelhash, PyTorch zip checkpoint", t, rss, tree_size(pt), cpu))
    else:
        print("(no torch available: skipped the PyTorch zip checkpoint row)", file=sys.stderr)

    print(f"file: {nbytes / 2**30:.2f} GiB, warm page cache, best of {args.repeat}, {os.cpu_count()} cores")
    print(f"load average before: {load}; after: {os.getloadavg()[0]:.2f}")
    print(f"{'command':42} {'seconds':>8} {'MB/s':>8} {'peak RSS MB':>12} {'x openssl':>10} "
          f"{'CPU s':>7} {'CPU x':>6}")
    for name, secs, rss, n, cpu in rows:
        scale = nbytes / n
        print(f"{name:42} {secs:8.3f} {n / secs / 1e6:8.0f} {rss / 1e6:12.1f} "
              f"{secs / ref_t * scale:10.2f} {cpu:7.2f} {cpu / ref_cpu * scale:6.2f}")
    print(f"ratio (exact layers / one openssl SHA-256 pass): {mh_t / ref_t:.2f}x wall, "
          f"{mh_cpu / ref_cpu:.2f}x CPU; openssl: {ref_rate:.0f} MB/s")
    print(f"ratio (all layers, sketch included / one openssl SHA-256 pass): {all_t / ref_t:.2f}x "
          f"wall, {all_cpu / ref_cpu:.2f}x CPU")
    print(f"ratio (streamed upload body, all layers / one openssl SHA-256 pass): "
          f"{stream_t / ref_t:.2f}x wall, {stream_cpu / ref_cpu:.2f}x CPU")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
