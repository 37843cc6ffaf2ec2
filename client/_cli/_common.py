"""Options and helpers that the registry commands share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from modelhash._cli._app import guarded
from modelhash._cli._options import echo, json_option, path_argument, print_json, progress_option
from modelhash._client import RegistryClient
from modelhash._config import DEFAULT_REGISTRY

__all__ = [
    "client_for",
    "echo",
    "json_option",
    "path_argument",
    "print_json",
    "progress_option",
    "registry_options",
]

F = TypeVar("F", bound=Callable[..., Any])

def registry_options(f: F) -> F:
    """``--registry`` and ``--api-key``, each also read from its environment variable."""
    f = click.option(
        "--api-key",
        envvar="MODELHASH_API_KEY",
        show_envvar=True,
        help="Your API key (prefer the environment variable: a key on the command "
        "line shows up in process lists).",
    )(f)
    f = click.option(
        "--registry",
        envvar="MODELHASH_REGISTRY",
        show_envvar=True,
        help=f"Base URL of the registry [default: {DEFAULT_REGISTRY}].",
    )(f)
    return f


def client_for(registry: str | None, api_key: str | None) -> RegistryClient:
    """A client for the given (or environment's) registry and key; exit 2 on a bad URL."""
    return guarded(lambda: RegistryClient(registry, api_key=api_key))


