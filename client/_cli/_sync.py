"""``modelhash sync``: refresh the offline cache from the registry's signed export."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from modelhash._cache import OfflineCache
from modelhash._cli._app import fail, guarded
from modelhash._cli._check import cache_option
from modelhash._cli._common import client_for, echo, json_option, registry_options
from modelhash._cli._common import print_json as _print_json

__all__ = ["sync"]


@click.command()
@click.option("--public-key", type=click.Path(path_type=Path),
              help="The registry's export signing key (PEM) to pin, as published by its "
              "operator. Without it, the key pinned earlier is used, or on the first sync "
              "the registry's own is fetched and pinned.")
@click.option("--full", is_flag=True, help="Fetch and verify a whole new export instead of "
              "only the changes since the last sync.")
@cache_option
@json_option
@registry_options
def sync(public_key: Path | None, full: bool, cache: Path | None, as_json: bool,
         registry: str | None, api_key: str | None) -> None:
    """Download the list into the offline cache, for 'modelhash check --offline'.

    The export and every change-feed page are verified with the pinned ed25519
    key; one that fails (tampered, or signed by another key), or an export older
    than the cached list (a replay or rollback), is refused and the cache left as
    it was: exit 3. Exit 2 for an unreadable --public-key file.
    """
    pem = None
    if public_key is not None:
        try:
            pem = public_key.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"{public_key}: cannot read: {exc}")
    store = OfflineCache(cache)
    with client_for(registry, api_key) as client:
        report = guarded(lambda: store.sync(client, public_key=pem, full=full))
        where = client.registry
    if report.pinned_now:
        sys.stderr.write(
            f"modelhash: pinned {where}'s signing key {report.key_id} on first use; "
            "check it against the key id its operator publishes\n"
        )
    if as_json:
        _print_json({
            "registry": where,
            "cache": str(store.directory),
            "flags": report.flags,
            "changes": report.changes,
            "cursor": report.cursor,
            "key_id": report.key_id,
            "pinned_now": report.pinned_now,
            "full": report.full,
        })
    else:
        kind = "full export" if report.full else "changes"
        echo(f"synced {report.flags} flags from {where} ({kind}, {report.changes} "
                   f"change(s) applied, cursor {report.cursor}) into {store.directory}")
