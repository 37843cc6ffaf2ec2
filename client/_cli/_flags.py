"""``modelhash flag``, ``revoke``, ``dispute`` and ``lookup``: the analyst's commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from modelhash._calls import file_map
from modelhash._cli._app import app, fail
from modelhash._cli._common import ApiKeyOption, JsonOption, RegistryOption, client_for, guarded
from modelhash._cli._common import print_json as _print_json
from modelhash._cli._exit import Exit
from modelhash._scan import fingerprint_for_check
from modelhash.fingerprint import ALGORITHMS, ModelFingerprint, parse_hash
from modelhash.wire import CATEGORIES, SEVERITIES, FlagDetail, LookupResult

__all__ = ["dispute", "flag", "lookup", "revoke"]

ReasonOption = Annotated[
    str,
    typer.Option("--reason", help="Why; recorded in the flag's audit trail.", show_default=False),
]


def local_fingerprint(path: Path) -> ModelFingerprint | dict[str, str]:
    """The fingerprint to submit for one model; exit 2 when there is none.

    Every layer is computed, the sketch included, so that the registry can match
    derivatives of the model. A file that cannot be read as weights (a hostile
    pickle, a broken header) is submitted by its exact bytes only, and a line on
    stderr says so.
    """
    outcomes = fingerprint_for_check(path, layers="all")
    if len(outcomes) != 1:
        fail(f"{path}: holds {len(outcomes)} separate models; give them one by one")
    (o,) = outcomes
    if o.fingerprint is not None and o.error is None:
        return o.fingerprint
    assert o.error is not None
    if len(o.files) != 1:
        fail(o.error.diagnostics())
    sys.stderr.write(
        f"modelhash: {o.error.diagnostics()}; using its exact file hashes only\n"
    )
    return file_map(o.files[0])


def _show_flag(detail: FlagDetail, as_json: bool) -> None:
    if as_json:
        _print_json(detail.model_dump(mode="json"))
        return
    typer.echo(f"flag {detail.id}: {detail.category}, {detail.severity}, {detail.status}")
    for algorithm, values in sorted(detail.fingerprints.items()):
        for v in values:
            typer.echo(f"  {algorithm:18} {v}")


@app.command()
def flag(
    path: Annotated[Path, typer.Argument(help="The weight file or model folder to flag.",
                                         show_default=False)],
    category: Annotated[
        str, typer.Option(help=f"Why it is flagged: {', '.join(CATEGORIES)}.", show_default=False)
    ],
    severity: Annotated[str, typer.Option(help=f"One of {', '.join(SEVERITIES)}.")] = "high",
    note: Annotated[str | None, typer.Option(help="Context for other analysts.")] = None,
    evidence: Annotated[
        str | None, typer.Option(help="A reference to evidence kept elsewhere (a case id).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Admins: flag even if it matches a reference base.")
    ] = False,
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Fingerprint PATH on this machine and submit it to the list (needs a submitter key).

    Only the fingerprint is sent, never the weights. Flagging a model that is already
    flagged returns the existing flag and records your confirmation. Exit 0 on
    success, 2 for an unusable path or option, 3 if the registry refused or failed.
    """
    if category not in CATEGORIES:
        fail(f"--category must be one of {', '.join(CATEGORIES)}, not {category!r}")
    if severity not in SEVERITIES:
        fail(f"--severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    fingerprint = local_fingerprint(path)
    with client_for(registry, api_key) as client:
        detail = guarded(lambda: client.flag(
            fingerprint, category=category, severity=severity, note=note,
            evidence=evidence, force=force,
        ))
    _show_flag(detail, as_json)


def _status_change(action: str, flag_id: str, reason: str, as_json: bool,
                   registry: str | None, api_key: str | None) -> None:
    with client_for(registry, api_key) as client:
        method = getattr(client, action)
        detail: FlagDetail = guarded(lambda: method(flag_id, reason=reason))
    if as_json:
        _print_json(detail.model_dump(mode="json"))
    else:
        typer.echo(f"flag {detail.id} is now {detail.status}")


@app.command()
def revoke(
    flag_id: Annotated[str, typer.Argument(help="The flag's id.", show_default=False)],
    reason: ReasonOption,
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Revoke a flag (needs an admin key): checks stop matching it at once.

    The flag stays visible with status 'revoked'. Exit 3 if the registry refuses
    (unknown flag, already revoked, a key without the role).
    """
    _status_change("revoke", flag_id, reason, as_json, registry, api_key)


@app.command()
def dispute(
    flag_id: Annotated[str, typer.Argument(help="The flag's id.", show_default=False)],
    reason: ReasonOption,
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Dispute a flag (needs a submitter key): it becomes 'disputed' for an admin to review.

    A disputed flag still matches until an admin revokes it.
    """
    _status_change("dispute", flag_id, reason, as_json, registry, api_key)


def _describe(r: LookupResult) -> list[str]:
    alg = ALGORITHMS.get(r.algorithm)
    what = alg.description if alg is not None else r.algorithm
    head = f"{r.algorithm}:{r.value} ({what}; {r.strength} hash)"
    counted = [f for f in r.flags if f.status != "revoked"]
    if r.strength == "weak":
        lines = [head]
        if counted:
            lines.append(f"  {len(counted)} flagged model(s) share this weak hash; it may be a "
                         "chance collision: check the full sha256 before acting")
        else:
            lines.append("  not flagged")
    else:
        lines = [head, "  FLAGGED" if r.flagged else "  not flagged"]
    for f in r.flags:
        lines.append(f"  flag {f.flag_id}: {f.category}, {f.severity}, {f.status}")
    return lines


@app.command()
def lookup(
    hash_: Annotated[
        str,
        typer.Argument(metavar="HASH", help="sha256, blake3, AutoV1/V2/V3, CRC32 or content "
                       "hash; any case, optionally prefixed like 'autov2:'.", show_default=False),
    ],
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Say what a hash is and whether the registry has it flagged.

    Bare hex that fits several algorithms (64 digits: sha256, blake3 or content) is
    looked up as each. The short model-site hashes (CRC32, AutoV1/V2/V3) are weak: a
    hit may be a chance collision, and they never make 'check' match. Exit 0 after a
    lookup, whatever it found; 2 for a malformed hash; 3 if the registry failed.
    """
    digests = guarded(lambda: parse_hash(hash_))
    with client_for(registry, api_key) as client:
        results = guarded(lambda: [client.lookup(d.algorithm, d.hex) for d in digests])
    if as_json:
        payload: dict[str, Any] = {
            "hash": hash_,
            "flagged": any(r.flagged for r in results),
            "results": [r.model_dump(mode="json") for r in results],
        }
        _print_json(payload)
    else:
        for r in results:
            for line in _describe(r):
                typer.echo(line)
    raise typer.Exit(int(Exit.OK))
