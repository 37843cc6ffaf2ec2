"""``modelhash hf check``: check a Hugging Face Hub model repo."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from modelhash._cli._app import app, exit_code_for, fail
from modelhash._cli._check import exit_for
from modelhash._cli._common import ApiKeyOption, JsonOption, RegistryOption, client_for, print_json
from modelhash._cli._progress import make_progress
from modelhash._hf import hub_check
from modelhash.errors import ModelhashError

__all__ = ["hf_check"]

hf_app = typer.Typer(help="Hugging Face Hub: check model repos.", no_args_is_help=True)
app.add_typer(hf_app, name="hf")


@hf_app.command("check")
def hf_check(
    ref: Annotated[str, typer.Argument(
        metavar="REPO_ID[@REVISION]",
        help="A model repo, e.g. 'org/name' or 'org/name@v1.0' (branch, tag or commit).",
        show_default=False,
    )],
    download: Annotated[bool, typer.Option(
        "--download/--no-download",
        help="After the metadata check, download the weight files and fingerprint them "
        "fully (catches re-saved and converted copies).",
    )] = True,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="HF_TOKEN", show_envvar=True,
        help="A Hub token, for private or gated repos.",
    )] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1,
                                         help="Fingerprint this many files at once.")] = 1,
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Check a Hub model repo against the list, first without downloading anything.

    Step one checks the sha256 the Hub records for each weight file; a match stops
    there. Then the weight files are downloaded into the Hugging Face cache
    (HF_HOME) and fingerprinted. With HF_HUB_OFFLINE=1 only the cache is read.

    Exit codes as for 'check': 3 the registry or the Hub failed; 1 a match; 2 a bad
    repo id, a repo or revision that does not exist, or an unreadable file; 0 clean.
    """
    try:
        with client_for(registry, api_key) as client:
            report = hub_check(ref, client, download=download, token=token, workers=workers,
                               progress=make_progress(not as_json))
    except ModelhashError as exc:
        fail(exc.diagnostics(), exit_code_for(exc))
    for r in report.results:
        if r.error is not None:
            sys.stderr.write(f"modelhash: {r.error}\n")
    if as_json:
        print_json(report.to_json())
    else:
        typer.echo(f"{report.repo_id}@{report.revision} (checked by {report.step})")
        for r in report.results:
            if r.verdict == "match":
                flags = ", ".join(f"flag {m.flag_id} ({m.category}, {m.match})"
                                  for m in r.matches if m.status != "revoked")
                typer.echo(f"MATCH  {r.path}: {flags}")
            elif r.verdict == "clean":
                typer.echo(f"clean  {r.path}")
    raise typer.Exit(int(exit_for(report.results)))
