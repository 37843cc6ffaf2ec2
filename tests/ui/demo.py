"""A demo registry for the web UI tests and the documentation screenshots.

It holds a small diffusion-like base (UNet blocks with attention and MLP, a text
encoder), a flagged LoRA that touches only the attention of two up blocks, a
checkpoint with that LoRA baked in (the upload the evidence picture is about), and
hash-only flags of every category and status, with opinions and platform reports.
Everything goes through the REST API, as a real registry would be filled.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save_file

from modelhash.fingerprint import fingerprint_path
from modelhash.wire import encode_sketch

StateDict = dict[str, np.ndarray]

_DIM = 64
_UNET = [f"down_blocks.{i}" for i in range(3)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(3)]
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
#: The flagged LoRA's modules: the attention of up blocks 1 and 2.
FLAGGED_BLOCKS = ("up_blocks.1", "up_blocks.2")


def _unet_modules(block: str) -> list[str]:
    stem = f"unet.{block}.attentions.0.transformer_blocks.0"
    out = [f"{stem}.attn{a}.{p}" for a in (1, 2) for p in _ATTN]
    out += [f"{stem}.ff.net.0.proj", f"{stem}.ff.net.2", f"unet.{block}.resnets.0.time_emb_proj"]
    return out


def modules() -> list[str]:
    """Every weight matrix of the demo model, in model order."""
    out = [m for b in _UNET for m in _unet_modules(b)]
    for i in range(6):
        stem = f"text_encoder.text_model.encoder.layers.{i}"
        out += [f"{stem}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        out += [f"{stem}.mlp.fc1", f"{stem}.mlp.fc2"]
    return out


def base_model(seed: int = 7) -> StateDict:
    rng = np.random.default_rng(seed)
    return {
        f"{m}.weight": (rng.standard_normal((_DIM, _DIM)) / np.sqrt(_DIM)).astype(np.float32)
        for m in modules()
    }


def _kohya(module: str) -> str:
    for prefix, to in (("unet.", "lora_unet_"), ("text_encoder.text_model.", "lora_te_")):
        if module.startswith(prefix):
            return to + module.removeprefix(prefix).replace(".", "_")
    raise ValueError(module)


def flagged_lora(base: StateDict, seed: int = 11) -> tuple[StateDict, StateDict]:
    """A rank-4 kohya LoRA on the attention of :data:`FLAGGED_BLOCKS`, and its delta."""
    rng = np.random.default_rng(seed)
    adapter: StateDict = {}
    delta: StateDict = {}
    for m in modules():
        if not any(f".{b}." in m for b in FLAGGED_BLOCKS) or ".attn" not in m:
            continue
        up, down = rng.standard_normal((_DIM, 4)), rng.standard_normal((4, _DIM))
        w = base[f"{m}.weight"]
        up *= np.linalg.norm(w) * 0.05 / np.linalg.norm(up @ down)
        adapter[f"{_kohya(m)}.lora_up.weight"] = up.astype(np.float32)
        adapter[f"{_kohya(m)}.lora_down.weight"] = down.astype(np.float32)
        adapter[f"{_kohya(m)}.alpha"] = np.array(4.0, dtype=np.float32)
        delta[f"{m}.weight"] = (up @ down).astype(np.float32)
    return adapter, delta


def baked(base: StateDict, delta: StateDict, seed: int = 13) -> StateDict:
    """A fine-tune of ``base`` (small dense changes) with the LoRA merged in."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in base.items():
        noise = rng.standard_normal(v.shape)
        noise *= np.linalg.norm(v) * 0.01 / np.linalg.norm(noise)
        out[k] = (v + noise + delta.get(k, 0)).astype(np.float32)
    return out


def _fingerprint(path: Path) -> dict[str, Any]:
    (outcome,) = fingerprint_path(path)
    assert outcome.fingerprint is not None, outcome.error
    fp = outcome.fingerprint
    body: dict[str, Any] = dict(fp.summary())
    if fp.sketch is not None:
        body["sketch"] = encode_sketch(fp.sketch)
    return body


def random_fingerprint() -> dict[str, str]:
    sha = secrets.token_hex(32)
    return {"sha256": sha, "blake3": secrets.token_hex(32), "content": secrets.token_hex(32),
            "autov2": sha[:10], "crc32": secrets.token_hex(4)}


@dataclass
class Demo:
    """What the demo holds: file paths and the ids tests refer to."""

    folder: Path
    upload: Path = field(init=False)
    lora_flag: str = ""
    flags: list[str] = field(default_factory=list)
    disputed: str = ""
    revoked: str = ""


_NOTES = [
    ("csam", "critical", "reported by hotline A; generates abuse imagery on default prompts"),
    ("ncii", "high", "trained on leaked private photos of a named person"),
    ("real-person-likeness", "medium", "likeness of a public figure, no consent"),
    ("other", "low", "re-upload of a removed model; origin unclear"),
]


def seed(url: str, keys: dict[str, str], folder: Path, *, extra_flags: int = 24) -> Demo:
    """Fill the registry at ``url`` with the demo, as its users would."""
    demo = Demo(folder)
    base = base_model()
    adapter, delta = flagged_lora(base)
    save_file(base, str(folder / "demo-base.safetensors"))
    save_file(adapter, str(folder / "flagged-lora.safetensors"))
    demo.upload = folder / "upload-with-lora-baked-in.safetensors"
    save_file(baked(base, delta), str(demo.upload))

    def call(key: str, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(method, url + path, json=body, timeout=60,
                          headers={"Authorization": f"Bearer {keys[key]}"})
        assert r.status_code < 300, (path, r.status_code, r.text)
        return r.json()

    base_fp = _fingerprint(folder / "demo-base.safetensors")
    call("admin", "POST", "/v1/bases", {
        "name": "demo-diffusion-base", "description": "A public base model (demo).",
        "fingerprint": {k: v for k, v in base_fp.items() if k != "sketch"},
        "sketch": base_fp.get("sketch"),
    })
    lora_fp = _fingerprint(folder / "flagged-lora.safetensors")
    flag = call("submitter", "POST", "/v1/flags", {
        "category": "ncii", "severity": "high",
        "note": "LoRA of a real person, shared on two forums", "evidence": "case-2026-0412",
        "fingerprint": {k: v for k, v in lora_fp.items() if k != "sketch"},
        "sketch": lora_fp.get("sketch"),
        "model": {"kind": "lora", "family": "demo diffusion", "rank": 4},
    })
    demo.lora_flag = flag["id"]
    for i in range(extra_flags):
        category, severity, note = _NOTES[i % len(_NOTES)]
        who = "submitter2" if i % 3 == 0 and "submitter2" in keys else "submitter"
        f = call(who, "POST", "/v1/flags", {
            "category": category, "severity": severity, "note": note,
            "evidence": f"case-{1000 + i}", "fingerprint": random_fingerprint(),
        })
        demo.flags.append(f["id"])
    demo.disputed = demo.flags[1]
    call("submitter2" if "submitter2" in keys else "submitter", "POST",
         f"/v1/flags/{demo.disputed}/dispute",
         {"reason": "the uploader showed the training set: licensed stock photos"})
    demo.revoked = demo.flags[2]
    call("admin", "POST", f"/v1/flags/{demo.revoked}/revoke",
         {"reason": "flagged by mistake: hash of the public base"})
    call("reader", "POST", f"/v1/flags/{demo.flags[3]}/reports",
         {"kind": "false-positive", "note": "matched an upload our reviewers found harmless"})
    call("reader", "POST", f"/v1/flags/{demo.lora_flag}/reports",
         {"kind": "confirmed-hit", "note": "upload removed, account suspended"})
    return demo
