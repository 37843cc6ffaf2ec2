"""``modelhash completion SHELL``: print the shell's completion script."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

__all__ = ["completion"]

_SHELLS = ("bash", "zsh", "fish")


@click.command()
@click.argument("shell", type=click.Choice(_SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL.

    \b
    bash:  eval "$(modelhash completion bash)"    (e.g. in ~/.bashrc)
    zsh:   eval "$(modelhash completion zsh)"     (e.g. in ~/.zshrc)
    fish:  modelhash completion fish > ~/.config/fish/completions/modelhash.fish
    """
    from modelhash._cli._app import cli

    shell_class = get_completion_class(shell)
    if shell_class is None:  # pragma: no cover - click ships all three
        raise click.UsageError(f"no completion for {shell}")
    click.echo(shell_class(cli, {}, "modelhash", "_MODELHASH_COMPLETE").source())
