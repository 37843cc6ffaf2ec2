"""How the in-memory signature scan scales with the flags on one base.

The registry's candidate retrieval for delta and adapter flags scans every
signature of a bank (see ``registry/crud/sketches.py``). This times ``retrieve()``,
the whole per-bank step a check runs (XOR and popcount over 4096 bits a row, the
cosine and coefficient estimates, both top-k selections), on banks of random
signatures, which is what unrelated flags look like, in this process, on one
thread. For scale, the same run times SHA-256 (hashlib, OpenSSL) over the bank's
bytes once: a scan that costs k times that reads its bank at 1/k of SHA-256's
speed.

    python benchmarks/bench_signature_scan.py [--sizes 10000,100000,1000000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelhash.registry.crud.sketches import SIG_BITS, BankView, Signature, retrieve


def _bank(n: int, rng: np.random.Generator) -> BankView:
    bits = rng.integers(0, 2**63, size=(n, SIG_BITS // 64), dtype=np.uint64)
    norms = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    return BankView(bits, norms, np.arange(n, dtype=np.int64))


def _ms(fn: object, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    query = Signature(rng.integers(0, 256, SIG_BITS // 8, dtype=np.uint8).tobytes(), 1.0)
    print(f"{'flags':>10} {'bank MB':>8} {'scan p50 ms':>12} {'scan max ms':>12} "
          f"{'sha256 p50 ms':>14} {'scan / sha256':>14}")
    for n in (int(x) for x in args.sizes.split(",")):
        bank = _bank(n, rng)
        raw = bank.bits.tobytes()
        retrieve(bank, query)  # warm up
        scan = _ms(lambda bank=bank: retrieve(bank, query), args.repeats)
        sha = _ms(lambda raw=raw: hashlib.sha256(raw).digest(), args.repeats)
        p50, ref = statistics.median(scan), statistics.median(sha)
        print(f"{n:>10} {len(raw) / 1e6:>8.1f} {p50:>12.2f} {max(scan):>12.2f} "
              f"{ref:>14.2f} {p50 / ref:>13.2f}x")


if __name__ == "__main__":
    main()
