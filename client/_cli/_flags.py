"""``modelhash flag``, ``revoke``, ``dispute`` and ``lookup``: the analyst's commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from modelhash._calls import file_map
from modelhash._cli._app import fail, guarded
from modelhash._cli._common import (
    client_for,
    echo,
    json_option,
    path_argument,
    print_json,
    registry_options,
)
from modelhash._cli._exit import Exit
from modelhash._scan import fingerprint_for_check
from modelhash.fingerprint import ALGORITHMS, ModelFingerprint, parse_hash
from modelhash.wire import CATEGORIES, SEVERITIES, FlagDetail, LookupResult

__all__ = ["dispute", "flag", "local_fingerprint", "lookup", "revoke"]

reason_option = click.option("--reason", required=True,
                             help="Why; recorded in the flag's audit trail.")
flag_id_argument = click.argument("flag_id")


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
        print_json(detail.model_dump(mode="json"))
        return
    echo(f"flag {detail.id}: {detail.category}, {detail.severity}, {detail.status}")
    for algorithm, values in sorted(detail.fingerprints.items()):
        for v in values:
            echo(f"  {algorithm:18} {v}")


@click.command()
@path_argument("path")
@click.option("--category", required=True, type=click.Choice(CATEGORIES),
              help="Why it is flagged.")
@click.option("--severity", default="high", show_default=True, type=click.Choice(SEVERITIES))
@click.option("--note", help="Context for other analysts.")
@click.option("--evidence", help="A reference to evidence kept elsewhere (a case id).")
@click.option("--force", is_flag=True, help="Admins: flag even if it matches a reference base.")
@json_option
@registry_options
def flag(path: Path, category: str, severity: str, note: str | None, evidence: str | None,
         force: bool, as_json: bool, registry: str | None, api_key: str | None) -> None:
    """Fingerprint PATH on this machine and submit it to the list (needs a submitter key).

    Only the fingerprint is sent, never the weights. Flagging a model that is already
    flagged returns the existing flag and records your confirmation. Exit 0 on
    success, 2 for an unusable path or option, 3 if the registry refused or failed.
    """
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
        print_json(detail.model_dump(mode="json"))
    else:
        echo(f"flag {detail.id} is now {detail.status}")


@click.command()
@flag_id_argument
@reason_option
@json_option
@registry_options
def revoke(flag_id: str, reason: str, as_json: bool, registry: str | None,
           api_key: str | None) -> None:
    """Revoke flag FLAG_ID (needs an admin key): checks stop matching it at once.

    The flag stays visible with status 'revoked'. Exit 3 if the registry refuses
    (unknown flag, already revoked, a key without the role).
    """
    _status_change("revoke", flag_id, reason, as_json, registry, api_key)


@click.command()
@flag_id_argument
@reason_option
@json_option
@registry_options
def dispute(flag_id: str, reason: str, as_json: bool, registry: str | None,
            api_key: str | None) -> None:
    """Dispute flag FLAG_ID (needs a submitter key): it becomes 'disputed' for review.

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


def _hashes(given: tuple[str, ...]) -> list[str]:
    """The hashes named; ``-`` reads one a line from stdin (skipping blanks and # comments)."""
    out: list[str] = []
    for h in given:
        if h != "-":
            out.append(h)
            continue
        for line in sys.stdin:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    if not out:
        fail("no hash given (stdin was empty)")
    return out


@click.command()
@click.argument("hashes", nargs=-1, required=True, metavar="HASH...")
@json_option
@registry_options
def lookup(hashes: tuple[str, ...], as_json: bool, registry: str | None,
           api_key: str | None) -> None:
    """Say what each HASH is and whether the registry has it flagged ('-' reads stdin).

    A HASH is a sha256, blake3, AutoV1/V2/V3, CRC32 or content hash; any case,
    optionally prefixed like 'autov2:'. Bare hex that fits several algorithms (64
    digits: sha256, blake3 or content) is looked up as each. The short model-site
    hashes (CRC32, AutoV1/V2/V3) are weak: a hit may be a chance collision, and
    they never make 'check' match.

    With several HASHes (or '-'), --json prints {"flagged", "lookups": [...]}, one
    lookup per HASH in order; with one, that lookup alone.

    Exit 1 when any full-strength HASH is flagged (as 'check' matches), 0 otherwise,
    a weak hit included; 2 for a malformed hash (nothing is looked up); 3 if the
    registry failed.
    """
    named = _hashes(hashes)
    parsed = guarded(lambda: [(h, parse_hash(h)) for h in named])
    answers: list[dict[str, Any]] = []
    certain = False
    with client_for(registry, api_key) as client:
        for h, digests in parsed:
            results = guarded(
                lambda: [client.lookup(d.algorithm, d.hex) for d in digests]  # noqa: B023
            )
            answers.append({"hash": h, "flagged": any(r.flagged for r in results),
                            "results": [r.model_dump(mode="json") for r in results]})
            certain = certain or any(r.flagged and not r.ambiguous for r in results)
            if not as_json:
                for r in results:
                    for line in _describe(r):
                        echo(line)
    if as_json:
        if len(answers) == 1:
            print_json(answers[0])
        else:
            print_json({"flagged": any(a["flagged"] for a in answers), "lookups": answers})
    raise SystemExit(int(Exit.MATCH if certain else Exit.OK))
