"""What every ``fedloom`` command shares: the consoles and the error mapping."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from fedloom.errors import FedloomError

console = Console()
errors = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def friendly(command: F) -> F:
    """fedloom's errors become a message and the error's exit code, never a traceback;
    Ctrl-C exits 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FedloomError as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            errors.print("interrupted: stopped cleanly")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
