"""``modelhash bases`` and ``modelhash keys``: admin commands."""

from __future__ import annotations

from pathlib import Path

import click

from modelhash._cli._app import fail, guarded
from modelhash._cli._common import (
    client_for,
    echo,
    json_option,
    path_argument,
    print_json,
    registry_options,
)
from modelhash._cli._flags import local_fingerprint
from modelhash._cli._server import db_option, server_module

__all__ = ["bases", "keys"]

ROLES = ("reader", "submitter", "admin")


@click.group(no_args_is_help=True)
def bases() -> None:
    """Reference bases: public models that are never flagged, that deltas are measured against."""


@bases.command("add")
@path_argument("path")
@click.option("--name", required=True, help="Its public name, e.g. 'stable-diffusion-v1-5'.")
@click.option("--description", help="Where it comes from.")
@json_option
@registry_options
def bases_add(path: Path, name: str, description: str | None, as_json: bool,
              registry: str | None, api_key: str | None) -> None:
    """Register PATH as a reference base, or as a public fine-tune or LoRA of one (admin key).

    PATH is the base model's weight file or folder; or a public fine-tune or LoRA of a
    registered base, kept as a known-innocent reference.
    """
    fingerprint = local_fingerprint(path)
    with client_for(registry, api_key) as client:
        base = guarded(lambda: client.add_base(fingerprint, name=name, description=description))
    if as_json:
        print_json(base.model_dump(mode="json"))
    else:
        echo(f"base {base.id}: {base.name}")


@bases.command("list")
@json_option
@registry_options
def bases_list(as_json: bool, registry: str | None, api_key: str | None) -> None:
    """List the reference bases."""
    with client_for(registry, api_key) as client:
        listed = guarded(client.list_bases)
    if as_json:
        print_json([b.model_dump(mode="json") for b in listed])
    else:
        for b in listed:
            role = "  (reference adapter)" if b.sketch_kind == "lora" else ""
            echo(f"{b.id}  {b.name}{role}")


@click.group(no_args_is_help=True)
def keys() -> None:
    """API keys: made in the database (create), or managed over REST (list, revoke)."""


@keys.command("create")
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the key may do.")
@click.option("--name", help="A label for the key.")
@db_option
@click.option("--create", is_flag=True,
              help="Make a new SQLite database when there is none (else that is an error).")
@json_option
def keys_create(role: str, name: str | None, db: str | None, create: bool,
                as_json: bool) -> None:
    """Make an API key straight in the database; the key is the last line printed.

    Only its hash is stored: keep the key now, it cannot be shown again. The
    database's absolute path goes to stderr.
    """
    server = server_module()
    made = guarded(lambda: server.keys_create(role=role, name=name, db=db, create=create))
    if as_json:
        print_json(made)
    else:
        echo(str(made["key"]))


@keys.command("list")
@json_option
@registry_options
def keys_list(as_json: bool, registry: str | None, api_key: str | None) -> None:
    """List the registry's API keys over REST (admin key); never their secrets."""
    with client_for(registry, api_key) as client:
        listed = guarded(client.list_keys)
    if as_json:
        print_json([k.model_dump(mode="json") for k in listed])
    else:
        for k in listed:
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            echo(f"{k.id:>5}  {k.prefix:12}  {k.role:9}  {state:18}  {k.name or ''}")


@keys.command("revoke")
@click.argument("key_id", type=int)
@json_option
@registry_options
def keys_revoke(key_id: int, as_json: bool, registry: str | None, api_key: str | None) -> None:
    """Revoke the API key KEY_ID ('keys list' shows ids) at once over REST (admin key)."""
    if key_id < 1:
        fail(f"KEY_ID must be a positive key id, not {key_id}")
    with client_for(registry, api_key) as client:
        key = guarded(lambda: client.revoke_key(key_id))
    if as_json:
        print_json(key.model_dump(mode="json"))
    else:
        echo(f"key {key.id} ({key.prefix}) revoked")
