"""Check a Hugging Face Hub model repo: first from the Hub's metadata, then its files.

Step one asks the Hub for the repo's file list with each LFS file's sha256 and
checks those hashes, with nothing downloaded: a re-upload of a flagged file is
caught at the cost of one metadata request. If nothing matched, step two downloads
the weight files (through ``huggingface_hub``, so ``HF_HOME``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE`` apply, and files already in the cache are reused) and
fingerprints them with every layer, which catches re-saved and converted copies
and derivatives (casts, merges, fine-tunes, LoRAs, baked LoRAs) too.

A flag found by step one ends the check there: the report says it was checked by
metadata only (``checked_by: "metadata"``, ``layers: "exact"``, and a ``note``).
With ``HF_HUB_OFFLINE=1`` step one is skipped and step two reads the local cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelhash._scan import Checker, PathResult, check_paths
from modelhash.errors import HubError, HubNotFoundError, InputError, ModelhashError
from modelhash.fingerprint import Layers, Progress

__all__ = ["HubReport", "hub_check", "parse_repo_ref"]

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
_LAYOUT_FILES = ("model_index.json",)
_LAYOUT_SUFFIXES = (".index.json",)


@dataclass
class HubReport:
    """The results for one repo revision, in ``check --json``'s shape plus the repo."""

    repo_id: str
    revision: str
    results: list[PathResult] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    step: str = "metadata"
    layers: Layers = "exact"
    """``all`` once the files were fingerprinted with every layer; ``exact`` when only
    the Hub's sha256 (or exact layers, asked for) were checked."""
    note: str = ""
    """Why the check stopped where it did, when that was short of a full check."""

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo_id,
            "revision": self.revision,
            "checked_by": self.step,
            "layers": self.layers,
            "note": self.note,
            "downloaded": list(self.downloaded),
            "results": [r.to_json() for r in self.results],
        }


def parse_repo_ref(text: str) -> tuple[str, str | None]:
    """``org/name`` or ``org/name@revision`` (a branch, tag or commit; may hold slashes)."""
    repo_id, _, revision = text.strip().partition("@")
    parts = repo_id.split("/")
    if not repo_id or len(parts) > 2 or not all(parts) or any(p in (".", "..") for p in parts):
        raise InputError(f"{text!r} is not a Hub repo id (expected 'org/name[@revision]')")
    if "@" in text and not revision:
        raise InputError(f"{text!r}: empty revision after '@'")
    return repo_id, revision or None


def _flag_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str | None:
    """Read at call time, so a process can point HF_HOME elsewhere after import."""
    explicit = os.environ.get("HF_HUB_CACHE", "").strip()
    if explicit:
        return explicit
    home = os.environ.get("HF_HOME", "").strip()
    return str(Path(home) / "hub") if home else None


def _require_hub() -> None:
    """Fail with the extra to install when huggingface_hub is missing."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise InputError(
            "checking Hugging Face repos needs the hf extra: pip install 'modelhash[hf]'"
        ) from None


def _translate(exc: Exception, what: str) -> ModelhashError:
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.LocalEntryNotFoundError | hf.OfflineModeIsEnabled):
        return HubNotFoundError(
            f"{what}: not in the local Hugging Face cache, and the Hub may not be asked "
            "(HF_HUB_OFFLINE)"
        )
    if isinstance(exc, hf.GatedRepoError):
        return HubNotFoundError(f"{what}: the repo is gated and this token has no access")
    if isinstance(exc, hf.RepositoryNotFoundError | hf.RevisionNotFoundError |
                  hf.EntryNotFoundError):
        return HubNotFoundError(f"{what}: not found on the Hub ({type(exc).__name__})")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return HubError(f"{what}: the Hub failed: {type(exc).__name__}: {first}")


def hub_check(
    ref: str,
    checker: Checker,
    *,
    download: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    workers: int = 1,
    progress: Progress | None = None,
    layers: Layers = "all",
) -> HubReport:
    """Check the model repo ``ref`` (``org/name[@revision]``) against ``checker``.

    A match on the Hub's own sha256 ends the check with no download, and the report
    says it is metadata-only. Otherwise the weight files are downloaded and
    fingerprinted with ``layers`` (every layer by default). Raises
    HubNotFoundError for a missing or gated repo, HubError when the Hub fails, and
    RegistryError when the list cannot answer.
    """
    _require_hub()
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    repo_id, revision = parse_repo_ref(ref)
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    cache_dir = _cache_dir()
    offline = _flag_env("HF_HUB_OFFLINE")
    if offline:
        try:
            snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                              local_files_only=True))
        except Exception as exc:
            raise _translate(exc, ref) from None
        report = HubReport(repo_id, snapshot.name, step="files (offline cache)", layers=layers)
        report.results = _check_folder(snapshot, report, checker, workers, progress, layers)
        return report

    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # huggingface_hub raises httpx, OSError and its own errors
        raise _translate(exc, ref) from None
    sha = info.sha or revision or "main"
    report = HubReport(repo_id, sha)
    siblings = sorted(info.siblings or [], key=lambda s: s.rfilename)
    weights = [s for s in siblings if s.rfilename.lower().endswith(WEIGHT_SUFFIXES)]
    hashed = [s for s in weights if s.lfs is not None and s.lfs.sha256]
    first = checker.check([{"sha256": s.lfs.sha256} for s in hashed if s.lfs is not None])
    by_name = dict(zip((s.rfilename for s in hashed), first, strict=True))
    results = []
    for s in weights:
        r = by_name.get(s.rfilename)
        path = f"{repo_id}@{sha}/{s.rfilename}"
        if r is None:
            results.append(PathResult(path, "error", {},
                                      error=f"{path}: the Hub gives no sha256 for it"))
        else:
            shown = {"sha256": s.lfs.sha256} if s.lfs is not None else {}
            results.append(PathResult(path, r.verdict, shown, list(r.matches)))
    if not weights:
        results.append(PathResult(f"{repo_id}@{sha}", "error", {},
                                  error=f"{repo_id}@{sha}: the repo holds no weight files"))
    for pr in results:
        pr.layers = "exact"
    report.results = results
    if any(r.verdict == "match" for r in results):
        report.note = ("metadata only: a file's sha256 on the Hub is flagged, so nothing was "
                       "downloaded")
        return report
    if not weights:
        report.note = "the repo holds no weight files"
        return report
    if not download:
        report.note = ("metadata only (download not asked for): exact hashes checked, "
                       "derivatives of flagged models are not detected")
        return report

    wanted = [s.rfilename for s in siblings if s.rfilename.lower().endswith(WEIGHT_SUFFIXES)
              or s.rfilename.endswith(_LAYOUT_SUFFIXES)
              or s.rfilename.rsplit("/", 1)[-1] in _LAYOUT_FILES]
    folder: Path | None = None
    for name in wanted:
        try:
            # By the name asked for (a branch by default), so the cache records the ref
            # and an offline check later finds this snapshot.
            local = hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                                    endpoint=endpoint, token=token)
        except Exception as exc:
            raise _translate(exc, f"{repo_id}@{sha}/{name}") from None
        report.downloaded.append(name)
        folder = Path(local).parents[len(Path(name).parts) - 1]
    assert folder is not None
    report.revision = folder.name  # the commit the files came from
    report.step = "files"
    report.layers = layers
    report.results = _check_folder(folder, report, checker, workers, progress, layers)
    return report


def _check_folder(
    folder: Path,
    report: HubReport,
    checker: Checker,
    workers: int,
    progress: Progress | None,
    layers: Layers,
) -> list[PathResult]:
    results = check_paths([folder], checker, recursive=True, workers=workers, progress=progress,
                          layers=layers)
    if results:
        report.layers = results[0].layers
    prefix = f"{report.repo_id}@{report.revision}"
    for r in results:
        try:
            rel = Path(r.path).relative_to(folder).as_posix()
        except ValueError:
            continue
        r.path = prefix if rel == "." else f"{prefix}/{rel}"
    return results
