"""``modelhash bases`` and the REST side of ``modelhash keys``: admin commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelhash._cli._app import app, keys_app
from modelhash._cli._common import ApiKeyOption, JsonOption, RegistryOption, client_for, guarded
from modelhash._cli._common import print_json as _print_json
from modelhash._cli._flags import local_fingerprint

__all__ = ["bases_add", "bases_list", "keys_list", "keys_revoke"]

bases_app = typer.Typer(
    help="Reference bases: public models that are never flagged, that deltas are measured "
    "against.",
    no_args_is_help=True,
)
app.add_typer(bases_app, name="bases")


@bases_app.command("add")
def bases_add(
    path: Annotated[Path, typer.Argument(
        help="The base model's weight file or folder; or a public fine-tune or LoRA of a "
        "registered base, as a known-innocent reference.", show_default=False)],
    name: Annotated[str, typer.Option(help="Its public name, e.g. 'stable-diffusion-v1-5'.",
                                      show_default=False)],
    description: Annotated[str | None, typer.Option(help="Where it comes from.")] = None,
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Register a reference base, or a public fine-tune or LoRA of one (admin key)."""
    fingerprint = local_fingerprint(path)
    with client_for(registry, api_key) as client:
        base = guarded(lambda: client.add_base(fingerprint, name=name, description=description))
    if as_json:
        _print_json(base.model_dump(mode="json"))
    else:
        typer.echo(f"base {base.id}: {base.name}")


@bases_app.command("list")
def bases_list(
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List the reference bases."""
    with client_for(registry, api_key) as client:
        bases = guarded(client.list_bases)
    if as_json:
        _print_json([b.model_dump(mode="json") for b in bases])
    else:
        for b in bases:
            role = "  (reference adapter)" if b.sketch_kind == "lora" else ""
            typer.echo(f"{b.id}  {b.name}{role}")


@keys_app.command("list")
def keys_list(
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """List the registry's API keys over REST (needs an admin key); never their secrets."""
    with client_for(registry, api_key) as client:
        keys = guarded(client.list_keys)
    if as_json:
        _print_json([k.model_dump(mode="json") for k in keys])
    else:
        for k in keys:
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            typer.echo(f"{k.id:>5}  {k.prefix:12}  {k.role:9}  {state:18}  {k.name or ''}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's numeric id ('keys list').",
                                          show_default=False)],
    as_json: JsonOption = False,
    registry: RegistryOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Revoke an API key at once over REST (needs an admin key)."""
    with client_for(registry, api_key) as client:
        key = guarded(lambda: client.revoke_key(key_id))
    if as_json:
        _print_json(key.model_dump(mode="json"))
    else:
        typer.echo(f"key {key.id} ({key.prefix}) revoked")
