"""`discflow` sub-commands for the HTTP API and statistics (registered on the shared Typer app when imported)."""
from __future__ import annotations

from orchestration.cli import cli  # noqa: F401 — decorate commands with @cli.command()
