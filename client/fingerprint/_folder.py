"""Model folders: which files make one model, and which folders hold several.

A folder is read as one model when its layout says so: a sharded checkpoint with
an ``*.index.json``, a diffusers pipeline with ``model_index.json`` (each component
folder is read as a model, names prefixed by the component), or a Hugging Face
cache entry (``models--org--name``, resolved to the snapshot ``refs/main`` names).
Any other folder is a collection: each weight file in it is its own model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from modelhash.errors import MalformedFileError, UnsupportedFormatError
from modelhash.fingerprint._formats import WEIGHT_SUFFIXES
from modelhash.fingerprint._limits import MAX_SIDECAR_BYTES, load_json, read_sidecar

__all__ = ["Unit", "resolve"]

MAX_INDEX_BYTES = MAX_SIDECAR_BYTES
MAX_REF_BYTES = 4096
MAX_MODEL_INDEX_BYTES = 1024 * 1024
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
    """The models at ``path``: one for a file or a model folder, one per file otherwise.

    Every file of a folder's models lies inside that folder once symlinks are
    resolved (inside the cache entry, for a Hugging Face snapshot): a layout file
    cannot point the reader elsewhere on the machine.
    """
    if not path.exists():
        return [MalformedFileError(path, "no such file or folder")]
    if not path.is_dir():
        return [Unit(path, None, [("", path)])]
    try:
        root = _containment_root(path)
        units = _folder_units(path)
        for unit in units:
            for _, f in unit.files:
                _check_inside(root, f)
    except (MalformedFileError, UnsupportedFormatError) as exc:
        return [exc]
    return list(units)


def _folder_units(path: Path) -> list[Unit]:
    path = _hf_cache_snapshot(path)
    if (path / "model_index.json").is_file():
        return [_diffusers(path)]
    sharded = _sharded(path)
    if sharded is not None:
        return [sharded]
    files = _weight_files(path)
    if not files:
        raise UnsupportedFormatError(path, "folder holds no weight files")
    return [Unit(f, None, [("", f)]) for f in files]


def _containment_root(folder: Path) -> Path:
    """The folder every file must resolve into: the named folder, or for a snapshot
    folder of a Hugging Face cache its cache entry (snapshots link into ``blobs``)."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(
        ("models--", "datasets--")
    ):
        return real.parent.parent
    return real


def _check_inside(root: Path, f: Path) -> None:
    try:
        f.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):
        raise MalformedFileError(f, "resolves outside the folder being read") from None


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
    """``models--org--name`` in a Hugging Face cache -> its ``refs/main`` snapshot.

    ``refs/main`` must be a small regular file naming a snapshot folder directly
    under ``snapshots``: a path such as ``../../elsewhere`` is refused.
    """
    snaps = folder / "snapshots"
    if not (folder.name.startswith(("models--", "datasets--")) and snaps.is_dir()):
        return folder
    ref = folder / "refs" / "main"
    if ref.exists():
        rev = read_sidecar(ref, MAX_REF_BYTES).decode("utf-8", errors="replace").strip()
        if not rev or rev in (".", "..") or "/" in rev or "\\" in rev or "\0" in rev:
            raise MalformedFileError(ref, f"refs/main does not name a snapshot: {rev[:80]!r}")
        if (snaps / rev).is_dir():
            return snaps / rev
    revs = [p for p in snaps.iterdir() if p.is_dir()]
    if len(revs) == 1:
        return revs[0]
    raise MalformedFileError(folder, "cache entry has several snapshots and no refs/main")


def _read_json(path: Path, limit: int = MAX_INDEX_BYTES) -> object:
    return load_json(path, read_sidecar(path, limit), path.name)


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
    index = _read_json(folder / "model_index.json", MAX_MODEL_INDEX_BYTES)
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
