"""Options and helpers that every registry command shares."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from modelhash._cli._app import exit_code_for, fail
from modelhash._client import RegistryClient
from modelhash._config import DEFAULT_REGISTRY
from modelhash.errors import ModelhashError

__all__ = [
    "ApiKeyOption",
    "JsonOption",
    "RegistryOption",
    "client_for",
    "guarded",
    "print_json",
]

T = TypeVar("T")

RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="MODELHASH_REGISTRY",
        show_envvar=True,
        help=f"Base URL of the registry (default: {DEFAULT_REGISTRY}).",
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="MODELHASH_API_KEY",
        show_envvar=True,
        help="Your API key (prefer the environment variable: a key on the command "
        "line shows up in process lists).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def client_for(registry: str | None, api_key: str | None) -> RegistryClient:
    """A client for the given (or environment's) registry and key; exit 2 on a bad URL."""
    return guarded(lambda: RegistryClient(registry, api_key=api_key))


def guarded(fn: Callable[[], T]) -> T:
    """Run ``fn``; a ModelhashError becomes one line on stderr and its exit code."""
    try:
        return fn()
    except ModelhashError as exc:
        fail(exc.diagnostics(), exit_code_for(exc))


def print_json(value: Any) -> None:
    """JSON on stdout, indented, newline-terminated."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
