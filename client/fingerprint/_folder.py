"""Model folders: which files make one model, and which folders hold several.

A folder is read as one model when its layout says so: a sharded checkpoint with
an ``*.index.json``, a diffusers pipeline with ``model_index.json`` (each component
folder is read as a model, names prefixed by the component), or a Hugging Face
cache entry (``models--org--name``, resolved to the snapshot ``refs/main`` names).
Any other folder is a collection: each weight file in it is its own model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from modelhash.errors import MalformedFileError, UnsupportedFormatError
from modelhash.fingerprint._formats import WEIGHT_SUFFIXES

__all__ = ["Unit", "resolve"]

MAX_INDEX_BYTES = 64 * 1024 * 1024
_VARIANT = re.compile(r"\.(fp16|fp32|bf16|ema|non_ema|noema|fp8)\.", re.IGNORECASE)
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclass
class Unit:
    """One model to fingerprint: its files, each with the name prefix of its part."""

    path: Path
    format: str | None
    files: list[tuple[str, Path]]
    notes: list[str] = field(default_factory=list)
    weight_map: dict[str, str] | None = None
    """For a sharded checkpoint: which shard file each tensor name must be in."""


def resolve(path: Path) -> list[Unit | MalformedFileError | UnsupportedFormatError]:
    """The models at ``path``: one for a file or a model folder, one per file otherwise."""
    if not path.exists():
        return [MalformedFileError(path, "no such file or folder")]
    if not path.is_dir():
        return [Unit(path, None, [("", path)])]
    try:
        path = _hf_cache_snapshot(path)
        if (path / "model_index.json").is_file():
            return [_diffusers(path)]
        sharded = _sharded(path)
        if sharded is not None:
            return [sharded]
        files = _weight_files(path)
    except (MalformedFileError, UnsupportedFormatError) as exc:
        return [exc]
    if not files:
        return [UnsupportedFormatError(path, "folder holds no weight files")]
    return [Unit(f, None, [("", f)]) for f in files]


def _weight_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise MalformedFileError(folder, f"cannot list: {exc.strerror or exc}") from None
    return [
        p
        for p in entries
        if p.suffix.lower() in WEIGHT_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]


def _hf_cache_snapshot(folder: Path) -> Path:
    """``models--org--name`` in a Hugging Face cache -> its ``refs/main`` snapshot."""
    snaps = folder / "snapshots"
    if not (folder.name.startswith(("models--", "datasets--")) and snaps.is_dir()):
        return folder
    ref = folder / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text(encoding="utf-8", errors="replace").strip()
        if (snaps / rev).is_dir():
            return snaps / rev
    revs = [p for p in snaps.iterdir() if p.is_dir()]
    if len(revs) == 1:
        return revs[0]
    raise MalformedFileError(folder, "cache entry has several snapshots and no refs/main")


def _read_json(path: Path) -> object:
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise MalformedFileError(path, "index file larger than 64 MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedFileError(path, f"unreadable JSON: {str(exc)[:200]}") from None


def _sharded(folder: Path) -> Unit | None:
    """A sharded checkpoint, preferring safetensors and the non-variant index."""
    indexes = sorted(folder.glob("*.safetensors.index.json")) or sorted(
        folder.glob("*.bin.index.json")
    )
    if not indexes:
        return None
    indexes.sort(key=lambda p: (bool(_VARIANT.search(p.name)), p.name))
    index = indexes[0]
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MalformedFileError(index, "index has no weight_map")
    names: list[str] = []
    for shard in weight_map.values():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
            raise MalformedFileError(index, f"weight_map names a bad shard {shard!r}"[:200])
        if shard not in names:
            names.append(shard)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise MalformedFileError(index, f"shard missing: {missing[0]}")
    is_st = index.name.endswith(".safetensors.index.json")
    fmt = "safetensors-sharded" if is_st else "torch-sharded"
    unit = Unit(
        folder,
        fmt,
        [("", folder / n) for n in sorted(names)],
        weight_map={str(k): str(v) for k, v in weight_map.items()},
    )
    unit.notes.append(f"read {len(names)} shards listed in {index.name}")
    return unit


def _component_files(folder: Path) -> list[Path]:
    """The one weight set in a diffusers component folder."""
    sharded = _sharded(folder)
    if sharded is not None:
        return [p for _, p in sharded.files]
    files = _weight_files(folder)
    if not files:
        return []
    files.sort(
        key=lambda p: (
            p.suffix.lower() in _PICKLE_SUFFIXES,
            bool(_VARIANT.search(p.name)),
            p.name,
        )
    )
    return [files[0]]


def _diffusers(folder: Path) -> Unit:
    index = _read_json(folder / "model_index.json")
    if not isinstance(index, dict):
        raise MalformedFileError(folder / "model_index.json", "not a JSON object")
    unit = Unit(folder, "diffusers", [])
    for name in sorted(index):
        if name.startswith("_") or "/" in name or name.startswith("."):
            continue
        sub = folder / name
        if not sub.is_dir():
            continue
        for f in _component_files(sub):
            unit.files.append((f"{name}/", f))
    if not unit.files:
        raise UnsupportedFormatError(folder, "diffusers folder has no component weights")
    return unit
