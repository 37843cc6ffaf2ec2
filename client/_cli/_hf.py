"""``modelhash hf check``: check a Hugging Face Hub model repo."""

from __future__ import annotations

import click

from modelhash._cli._app import guarded
from modelhash._cli._check import exit_for, print_errors, print_results
from modelhash._cli._common import client_for, echo, json_option, print_json, registry_options
from modelhash._cli._progress import make_progress

__all__ = ["hf"]


@click.group(no_args_is_help=True)
def hf() -> None:
    """Hugging Face Hub: check model repos (needs the hf extra)."""


@hf.command("check")
@click.argument("ref", metavar="REPO_ID[@REVISION]")
@click.option("--download/--no-download", default=True, show_default=True,
              help="After a clean metadata check, download the weight files and fingerprint "
              "them with every layer (catches re-saved and converted copies, casts, merges "
              "and LoRAs). --no-download checks the Hub's sha256 only, and says so.")
@click.option("--token", envvar="HF_TOKEN", show_envvar=True,
              help="A Hub token, for private or gated repos.")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fingerprint this many files at once.")
@json_option
@registry_options
def hf_check(ref: str, download: bool, token: str | None, workers: int, as_json: bool,
             registry: str | None, api_key: str | None) -> None:
    """Check a Hub model repo (e.g. 'org/name' or 'org/name@v1.0') against the list.

    Step one checks the sha256 the Hub records for each weight file; a match stops
    there, and the answer says it was checked by metadata only. Otherwise the weight
    files are downloaded into the Hugging Face cache (HF_HOME) and fingerprinted
    with every layer, so derivatives of flagged models are found too. With
    HF_HUB_OFFLINE=1 only the cache is read.

    Exit codes as for 'check': 3 the registry or the Hub failed; 1 a match; 2 a bad
    repo id, a repo or revision that does not exist, or an unreadable file; 0 clean.
    """
    from modelhash._hf import hub_check

    with client_for(registry, api_key) as client:
        report = guarded(lambda: hub_check(ref, client, download=download, token=token,
                                           workers=workers, progress=make_progress(not as_json)))
    if as_json:
        print_errors(report.results)
        print_json(report.to_json())
    else:
        echo(f"{report.repo_id}@{report.revision} (checked by {report.step}, "
             f"{report.layers} layers)")
        print_results(report.results, as_json=False, note=report.note)
    raise SystemExit(int(exit_for(report.results)))
