"""Check many paths: expand folders, fingerprint in parallel, ask the list, keep order.

This is what ``modelhash check`` runs, and what a platform that scans after the fact
calls. Results come back one per model, in the order of the paths given; a file
that cannot be read still gets a result (verdict ``error``), and its exact bytes are
still checked, so a flagged hostile file matches. Every layer is computed and sent
by default, so derivatives of flagged models match too; a caller may ask for the
exact layers only, and each result then says ``layers: "exact"``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from modelhash._calls import Checkable, file_map, with_sketch
from modelhash.errors import ModelhashError
from modelhash.fingerprint import Layers, Outcome, Progress, fingerprint_path
from modelhash.fingerprint._guard import as_error, guarded
from modelhash.fingerprint._limits import MAX_TREE_ENTRIES
from modelhash.wire import CheckResult, Match

__all__ = [
    "Checker",
    "PathResult",
    "check_outcomes",
    "check_paths",
    "expand",
    "fingerprint_all",
    "fingerprint_exact",
    "fingerprint_for_check",
    "layers_for",
]

_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")


_EXACT: dict[str, Any] = (
    {"layers": "exact"} if "layers" in inspect.signature(fingerprint_path).parameters else {}
)


def fingerprint_exact(
    path: str | os.PathLike[str], *, progress: Progress | None = None
) -> list[Outcome]:
    """``fingerprint_path`` limited to the exact layers (what an offline check uses)."""
    return fingerprint_path(path, progress=progress, **_EXACT)


def fingerprint_for_check(
    path: str | os.PathLike[str], *, layers: Layers = "all", progress: Progress | None = None
) -> list[Outcome]:
    """``fingerprint_path`` with ``layers``: ``all`` adds the sketch layer, which lets
    the registry find derivatives (fine-tunes, merges, casts, LoRAs) too."""
    if layers == "exact":
        return fingerprint_exact(path, progress=progress)
    return fingerprint_path(path, progress=progress, layers=layers)


class Checker(Protocol):
    """Anything that checks fingerprints: a :class:`~client.RegistryClient` or an
    offline :class:`~client.MirrorIndex`. A checker that can match the exact layers
    only says so with a ``layers = "exact"`` attribute."""

    def check(self, fingerprints: Iterable[Checkable]) -> list[CheckResult]:
        """One result per fingerprint, in order."""
        ...


@dataclass
class PathResult:
    """The answer for one model: the element of ``check --json``'s ``results``."""

    path: str
    verdict: Literal["match", "clean", "error"]
    fingerprint: dict[str, str]
    matches: list[Match] = field(default_factory=list)
    error: str | None = None
    #: The error's JSON form (``message``, ``kind``, fields of its own), when it came
    #: from a :class:`~modelhash.errors.ModelhashError`.
    error_json: dict[str, Any] | None = None
    layers: Layers = "all"
    """Which layers were checked: ``all``, or ``exact`` (asked for, or offline)."""

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form; ``error`` has the one error shape of every command."""
        error = self.error_json
        if error is None and self.error is not None:
            error = {"message": self.error, "kind": "input"}
        return {
            "path": self.path,
            "verdict": self.verdict,
            "fingerprint": dict(self.fingerprint),
            "matches": [m.model_dump(mode="json") for m in self.matches],
            "error": error,
            "layers": self.layers,
        }


def _is_model_folder(folder: Path) -> bool:
    if (folder / "model_index.json").is_file():
        return True
    if folder.name.startswith("models--") and (folder / "snapshots").is_dir():
        return True
    return any(folder.glob("*.safetensors.index.json")) or any(folder.glob("*.bin.index.json"))


def _walk(top: Path) -> list[Path]:
    """Weight files and model folders below ``top``, depth-first in name order.

    Iterative, so a tree thousands of levels deep is walked like a shallow one; at
    most MAX_TREE_ENTRIES entries are visited (the rest are not walked).
    """
    out: list[Path] = []
    budget = MAX_TREE_ENTRIES
    # Each stack item is a folder still to list, or a path already found.
    stack: list[tuple[Path, bool]] = [(top, False)]
    while stack:
        folder, found = stack.pop()
        if found:
            out.append(folder)
            continue
        try:
            entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except OSError:
            out.append(folder)  # fingerprint_path reports why it cannot be listed
            continue
        budget -= len(entries)
        if budget < 0:
            break
        later: list[tuple[Path, bool]] = [
            (p, True) for p in entries if p.suffix.lower() in _WEIGHT_SUFFIXES and p.is_file()
        ]
        for sub in entries:
            if sub.is_dir() and not sub.is_symlink():
                later.append((sub, _is_model_folder(sub)))
        stack.extend(reversed(later))
    return out


def expand(paths: Sequence[str | os.PathLike[str]], *, recursive: bool = False) -> list[Path]:
    """The paths to fingerprint, in order.

    Without ``recursive`` each path is kept as given (a plain folder is then read by
    the fingerprinter as a collection of its own weight files). With it, a folder
    that is not itself one model is walked: its weight files, then each subfolder
    in name order, a model folder (sharded, diffusers, Hugging Face cache entry)
    counting as one model. Hidden entries and symlinked folders are skipped.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if recursive and p.is_dir() and not _is_model_folder(p):
            found = _walk(p)
            out.extend(found or [p])
        else:
            out.append(p)
    return out


def _size(path: Path) -> int:
    """Bytes under ``path``, for the progress total: regular files only, bounded walk."""
    total = 0
    stack = [path]
    seen = 0
    while stack and seen < MAX_TREE_ENTRIES:
        p = stack.pop()
        seen += 1
        try:
            if p.is_symlink() and p != path:
                continue
            if p.is_file():
                total += p.stat().st_size
            elif p.is_dir():
                stack.extend(p.iterdir())
        except OSError:
            continue
    return total


def _fingerprint_one(path: Path, layers: Layers, progress: Progress | None) -> list[Outcome]:
    """One path's outcomes; whatever goes wrong is that path's error, never the run's."""
    try:
        return guarded(path, lambda: fingerprint_for_check(path, layers=layers, progress=progress))
    except ModelhashError as exc:
        return [Outcome(path=str(path), error=as_error(path, exc))]


def fingerprint_all(
    paths: Sequence[Path],
    *,
    workers: int = 1,
    progress: Progress | None = None,
    layers: Layers = "all",
) -> list[list[Outcome]]:
    """Fingerprint each path (one list of outcomes per path), ``workers`` at a time.

    Threads, not processes: the hashing releases the GIL, and each file's read is
    already fanned out over the cores. ``progress`` hears every byte read, from any
    worker, after one ``start`` with the total size.
    """
    if progress is not None:
        progress.start(f"checking {len(paths)} path(s)", sum(_size(p) for p in paths))
    feed = _Feed(progress) if progress is not None else None
    try:
        if workers <= 1 or len(paths) <= 1:
            return [_fingerprint_one(p, layers, feed) for p in paths]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="modelhash") as pool:
            return list(pool.map(lambda p: _fingerprint_one(p, layers, feed), paths))
    finally:
        if progress is not None:
            progress.finish()


class _Feed:
    """Forwards bytes read to one overall bar; per-file starts and finishes are dropped."""

    def __init__(self, target: Progress) -> None:
        self._target = target

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        self._target.advance(n)

    def finish(self) -> None:
        pass


def layers_for(checker: object, layers: Layers) -> Layers:
    """The layers a check with ``checker`` really covers: ``exact`` if either the
    caller asked for that or the checker cannot match sketches (an offline mirror)."""
    return "exact" if layers == "exact" or getattr(checker, "layers", "all") == "exact" else "all"


def check_maps(o: Outcome) -> tuple[dict[str, str], list[dict[str, str]]]:
    """What to show as the fingerprint, and every map to check for this outcome."""
    if o.fingerprint is not None and o.error is None:
        shown = o.fingerprint.summary()
        files = o.fingerprint.files
        extra = [file_map(f) for f in files] if len(files) > 1 else []
        return shown, [with_sketch(o.fingerprint), *extra]
    maps = [file_map(f) for f in o.files]
    return (maps[0] if len(maps) == 1 else {}), maps


def check_outcomes(
    outcomes: Sequence[Outcome], checker: Checker, *, layers: Layers = "all"
) -> list[PathResult]:
    """Check every outcome in one go (the checker batches); one result per outcome.

    ``layers`` is what the outcomes were computed with, and is recorded in each
    result."""
    plan = [check_maps(o) for o in outcomes]
    flat = [m for _, maps in plan for m in maps]
    answers = checker.check(flat) if flat else []
    out: list[PathResult] = []
    pos = 0
    for o, (shown, maps) in zip(outcomes, plan, strict=True):
        mine = answers[pos : pos + len(maps)]
        pos += len(maps)
        matches: dict[str, Match] = {}
        for r in mine:
            for m in r.matches:
                matches.setdefault(m.flag_id, m)
        matched = any(r.verdict == "match" for r in mine)
        error = o.error.diagnostics() if o.error is not None else None
        verdict: Literal["match", "clean", "error"] = (
            "match" if matched else "error" if error is not None else "clean"
        )
        out.append(PathResult(o.path, verdict, shown, list(matches.values()), error,
                              o.error.to_json() if o.error is not None else None, layers))
    return out


def check_paths(
    paths: Sequence[str | os.PathLike[str]],
    checker: Checker,
    *,
    recursive: bool = False,
    workers: int = 1,
    progress: Progress | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    layers: Layers = "all",
) -> list[PathResult]:
    """Fingerprint and check ``paths``; raises RegistryError if the list cannot answer.

    By default every layer is computed and the sketch layer is sent, so the registry
    also matches derivatives of flagged models (casts, merges, fine-tunes, LoRAs).
    ``layers="exact"`` sends the file and content hashes only (what an offline
    mirror can match); each result then carries ``layers: "exact"``, as it does
    when ``checker`` can match the exact layers only.
    """
    layers = layers_for(checker, layers)
    outcomes = [o for group in fingerprint_all(
        expand(paths, recursive=recursive), workers=workers, progress=progress, layers=layers
    ) for o in group]
    if on_outcome is not None:
        for o in outcomes:
            on_outcome(o)
    return check_outcomes(outcomes, checker, layers=layers)
