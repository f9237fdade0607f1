"""`discflow api` and `discflow stats` (registered on the shared Typer app when imported).

FastAPI, uvicorn and matplotlib are imported inside the commands: every other command starts
faster without them, and ``orchestration.http_api`` imports ``orchestration.cli`` itself (this module
is imported while ``orchestration.cli`` is still loading).
"""
from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from orchestration.cli import _fail, cli
from orchestration.statistics import PERIODS, ledger_statistics, statistics_tables
from workers.settings import get_settings

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@cli.command()
def api(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default: settings api_host, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: settings api_port, 8700).")] = None,
) -> None:
    """Serve the HTTP API (submit, status, report, cancel, resume) for a RIS or a front-desk page.

    Needs a token (DISCFLOW_API_TOKEN) and the shared broker the workers use (DISCFLOW_BROKER_URL).
    The OpenAPI schema is at /openapi.json, interactive docs at /docs.

    Examples:

        DISCFLOW_API_TOKEN=$(openssl rand -hex 24) DISCFLOW_BROKER_URL=redis://127.0.0.1:6379/0 discflow api

        curl -H "Authorization: Bearer $DISCFLOW_API_TOKEN" http://127.0.0.1:8700/jobs
    """
    settings = get_settings()
    if not settings.api_token:
        _fail("set DISCFLOW_API_TOKEN (or settings api_token): the API needs a token")
    if not settings.broker_url:
        _fail("set DISCFLOW_BROKER_URL: the API submits to the workers' shared Redis")
    import uvicorn

    from orchestration.http_api import create_api
    host = host or settings.api_host
    if host not in LOOPBACK:  # the token crosses the network in clear text unless a proxy adds TLS
        Console(stderr=True).print(f"serving on {host}: put a TLS-terminating proxy in front", highlight=False)
    uvicorn.run(create_api(settings.api_token), host=host, port=port or settings.api_port)


@cli.command()
def stats(
    by: Annotated[str, typer.Option(help="Period: month or year.")] = "month",
    since: Annotated[Optional[str], typer.Option(help="Only jobs created on or after this day, YYYY-MM-DD.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object: periods, syntaxes, stage_times.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the statistics as a PNG chart.")] = None,
) -> None:
    """Exports and imports per period, transfer syntaxes on imported media, and mean / p95 seconds
    per job and stage by kind and syntax policy, from the job ledger.

    Examples:

        discflow stats                             # per month, every job in the ledger

        discflow stats --by year --since 2025-01-01 --json

        discflow stats --plot department.png
    """
    if by not in PERIODS:
        _fail(f"unknown --by {by!r}; choose month or year")
    if plot and not plot.parent.is_dir():
        _fail(f"folder for --plot not found: {plot.parent}")
    statistics = ledger_statistics(by=by, since=_day(since))
    if as_json:
        typer.echo(json.dumps(statistics, indent=2))
    elif not statistics["periods"]:
        typer.echo("no jobs in the ledger" + (f" since {since}" if since else ""))
    else:
        for table in statistics_tables(statistics, by):
            Console().print(table)
    if plot:
        _draw(statistics, plot, by)


def _draw(statistics: dict, plot: Path, by: str) -> None:
    from orchestration.statistics_plot import plot_statistics
    try:
        plot_statistics(statistics, plot, by)
    except OSError as error:
        _fail(f"cannot write {plot}: {error.strerror or error}", 1)
    Console(stderr=True).print(f"wrote {plot}", highlight=False)


def _day(text: Optional[str]) -> Optional[date]:
    if text is None:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        _fail(f"--since wants a day as YYYY-MM-DD, not {text!r}")
