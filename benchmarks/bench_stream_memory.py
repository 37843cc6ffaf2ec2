"""Peak memory of fingerprinting an upload body, every layer, as it streams in.

Generates an SDXL-shaped safetensors body on the fly (fp16; the UNet's
transformer blocks, resnets and the two text encoders, at their real shapes;
transformer blocks are added until the body reaches --size-gb; the text encoders
alone make 1.8 GB, the least it can be) and feeds it in
1 MiB chunks to the same code ``scan_upload`` runs (``Body`` + ``fingerprint_body``,
all layers, no registry). Nothing is written to disk. Each size runs in a fresh
process, whose peak RSS (ru_maxrss) is printed next to that of a process that only
imports modelhash and numpy: the difference is what fingerprinting the body took.

    python benchmarks/bench_stream_memory.py --size-gb 2 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

Shape = tuple[int, ...]


def _transformer(prefix: str, c: int, ctx: int = 2048) -> list[tuple[str, Shape]]:
    return [
        *((f"{prefix}.attn1.to_{p}.weight", (c, c)) for p in ("q", "k", "v")),
        (f"{prefix}.attn1.to_out.0.weight", (c, c)), (f"{prefix}.attn1.to_out.0.bias", (c,)),
        (f"{prefix}.attn2.to_q.weight", (c, c)),
        (f"{prefix}.attn2.to_k.weight", (c, ctx)), (f"{prefix}.attn2.to_v.weight", (c, ctx)),
        (f"{prefix}.attn2.to_out.0.weight", (c, c)), (f"{prefix}.attn2.to_out.0.bias", (c,)),
        (f"{prefix}.ff.net.0.proj.weight", (8 * c, c)), (f"{prefix}.ff.net.0.proj.bias", (8 * c,)),
        (f"{prefix}.ff.net.2.weight", (c, 4 * c)), (f"{prefix}.ff.net.2.bias", (c,)),
        *((f"{prefix}.norm{i}.{w}", (c,)) for i in (1, 2, 3) for w in ("weight", "bias")),
    ]


def _resnet(prefix: str, c: int) -> list[tuple[str, Shape]]:
    return [
        (f"{prefix}.in_layers.2.weight", (c, c, 3, 3)), (f"{prefix}.in_layers.2.bias", (c,)),
        (f"{prefix}.emb_layers.1.weight", (c, 1280)), (f"{prefix}.emb_layers.1.bias", (c,)),
        (f"{prefix}.out_layers.3.weight", (c, c, 3, 3)), (f"{prefix}.out_layers.3.bias", (c,)),
    ]


def _text_encoders() -> list[tuple[str, Shape]]:
    out: list[tuple[str, Shape]] = [
        ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
         (49408, 768)),
        ("conditioner.embedders.1.model.token_embedding.weight", (49408, 1280)),
        ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
    ]
    for i in range(12):
        p = f"conditioner.embedders.0.transformer.text_model.encoder.layers.{i}"
        out += [(f"{p}.self_attn.{x}_proj.weight", (768, 768)) for x in ("q", "k", "v", "out")]
        out += [(f"{p}.mlp.fc1.weight", (3072, 768)), (f"{p}.mlp.fc2.weight", (768, 3072))]
    for i in range(32):
        p = f"conditioner.embedders.1.model.transformer.resblocks.{i}"
        out += [(f"{p}.attn.in_proj_weight", (3840, 1280)), (f"{p}.attn.out_proj.weight", (1280, 1280)),
                (f"{p}.mlp.c_fc.weight", (5120, 1280)), (f"{p}.mlp.c_proj.weight", (1280, 5120)),
                (f"{p}.ln_1.weight", (1280,)), (f"{p}.ln_2.weight", (1280,))]
    return out


def sdxl_tensors(target: int) -> list[tuple[str, Shape]]:
    """SDXL-shaped tensors whose fp16 bytes reach about ``target``."""
    out = _text_encoders()
    out += [(f"model.diffusion_model.input_blocks.{i}.0", (320, 320, 3, 3)) for i in (1, 2)]
    for i in range(4):
        out += _resnet(f"model.diffusion_model.input_blocks.{4 + i}.0", 640)
        out += _transformer(f"model.diffusion_model.input_blocks.{4 + i}.1.transformer_blocks.0", 640)
    k = 0
    while sum(2 * int(np.prod(s)) for _, s in out) < target:
        block = f"model.diffusion_model.output_blocks.{k // 10}.1.transformer_blocks.{k % 10}"
        out += _transformer(block, 1280)
        if k % 10 == 9:
            out += _resnet(f"model.diffusion_model.output_blocks.{k // 10}.0", 1280)
        k += 1
    return out


def body(target: int, chunk: int = 1 << 20) -> Iterator[memoryview]:
    """The safetensors body, header first, in ``chunk``-byte pieces, made as it goes."""
    tensors = sdxl_tensors(target)
    header: dict[str, object] = {"__metadata__": {"modelspec.architecture": "stable-diffusion-xl-v1-base"}}
    off = 0
    for name, shape in tensors:
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    yield memoryview(struct.pack("<Q", len(raw)) + raw)
    # Weights-like values: finite fp16, 16 MiB of them used over and over (made 2 MiB
    # at a time, so the generator itself adds little to the peak).
    rng = np.random.default_rng(0)
    pool = memoryview(b"".join(
        (rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(np.float16).tobytes()
        for _ in range(8)
    ))
    sent = 0
    while sent < off:
        n = min(chunk, off - sent)
        start = (sent * 7919) % (len(pool) - chunk)
        yield pool[start : start + n]
        sent += n


CHILD = "child"


def child(target: int) -> None:
    from modelhash._stream import Body, fingerprint_body

    t0 = time.perf_counter()
    b = Body(body(target), "sdxl.safetensors", 1 << 50)
    out = fingerprint_body(b, layers="all")
    wall = time.perf_counter() - t0
    assert out.error is None and out.fingerprint is not None, out.error
    sketch = out.fingerprint.sketch
    assert sketch is not None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cpu = time.process_time()
    print(json.dumps({"bytes": b.received, "tensors": len(out.fingerprint.tensors),
                      "sketched": len(sketch), "seconds": wall, "cpu": cpu, "peak_rss": rss}))


def baseline() -> None:
    import numpy  # noqa: F401

    import modelhash._stream
    import modelhash.fingerprint._sketcher  # noqa: F401

    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == CHILD:
        (baseline if sys.argv[2] == "0" else lambda: child(int(sys.argv[2])))()
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, nargs="+", default=[2.0, 5.0])
    args = ap.parse_args()

    def run(target: int) -> dict[str, float]:
        out = subprocess.run([sys.executable, __file__, CHILD, str(target)], capture_output=True,
                             text=True, check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    base = run(0)["peak_rss"]
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}")
    print(f"baseline (imports only): peak RSS {base / 1e6:.1f} MB")
    print(f"{'body GB':>8} {'tensors':>8} {'seconds':>8} {'MB/s':>6} {'CPU s':>7} "
          f"{'peak RSS MB':>12} {'over baseline MB':>17}")
    for gb in args.size_gb:
        r = run(int(gb * 1e9))
        print(f"{r['bytes'] / 1e9:8.2f} {int(r['tensors']):8d} {r['seconds']:8.1f} "
              f"{r['bytes'] / r['seconds'] / 1e6:6.0f} {r['cpu']:7.1f} {r['peak_rss'] / 1e6:12.1f} "
              f"{(r['peak_rss'] - base) / 1e6:17.1f}")


if __name__ == "__main__":
    main()
