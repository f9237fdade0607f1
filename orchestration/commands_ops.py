"""`discflow` sub-commands for operating the cluster (registered on the shared Typer app when imported)."""
from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Optional

import typer

from orchestration import console as terminal
from orchestration.cli import cli
from workers.app import app, use_broker
from workers.settings import get_settings

FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"
"""Flower reads its basic-auth credentials from here: they stay out of every process's argv (`ps`)."""
FLOWER_OPEN_API_ENV = "FLOWER_UNAUTHENTICATED_API"
"""Would open Flower's HTTP API to anyone; `discflow flower` never passes it on."""


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr, however narrow the terminal, then exit (2: usage)."""
    terminal.console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_basic_auth(credentials: str) -> str:
    """``user:password[,user2:password2]`` with a user and a password in every entry; else ValueError."""
    for entry in credentials.split(","):
        user, colon, password = entry.partition(":")
        if not (colon and user.strip() and password):
            raise ValueError("basic auth must be user:password (several: user:password,user2:password2; "
                             "no comma inside a password)")
    return credentials


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def flower_argv(address: str, port: int) -> list[str]:
    """The `celery flower` arguments; the credentials travel in FLOWER_BASIC_AUTH, not here."""
    return ["flower", f"--address={address}", f"--port={port}", "--persistent=False"]


@cli.command()
def flower(
    address: Annotated[Optional[str], typer.Option(
        help="Address to listen on (default: DISCFLOW_FLOWER_ADDRESS, else 127.0.0.1 — loopback only).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: DISCFLOW_FLOWER_PORT, else 5555).")] = None,
    basic_auth: Annotated[Optional[str], typer.Option(
        help="user:password[,user2:password2] (default: DISCFLOW_FLOWER_BASIC_AUTH). Required.")] = None,
) -> None:
    """Start Flower, the Celery monitor, on discflow's Redis: basic auth required, loopback unless told otherwise.

    Flower shows every task by stage (`discflow.scan.*`, `discflow.transcode.*`, `discflow.media.*`,
    `discflow.store.*`) with its arguments: job ids and batch numbers only, never patient data.
    It sees the tasks whose events it receives while it runs. Its HTTP API (`/api/tasks`,
    `/api/workers`) takes the same basic auth.

    Examples:

        DISCFLOW_BROKER_URL=redis://127.0.0.1:6379/0 DISCFLOW_FLOWER_BASIC_AUTH=desk:s3cret discflow flower

        discflow flower --port 5566 --basic-auth desk:s3cret,night:an0ther     # then open http://127.0.0.1:5566

        discflow flower --address 0.0.0.0 --basic-auth desk:s3cret     # all interfaces (in a container)

        curl -u desk:s3cret http://127.0.0.1:5555/api/tasks?limit=20
    """
    settings = get_settings()
    if not settings.broker_url:
        _fail("set DISCFLOW_BROKER_URL to the Redis the workers share, e.g. redis://127.0.0.1:6379/0")
    credentials = basic_auth or settings.flower_basic_auth
    if not credentials:
        _fail("Flower needs basic auth: give --basic-auth user:password or set DISCFLOW_FLOWER_BASIC_AUTH")
    try:
        check_basic_auth(credentials)
    except ValueError as error:
        _fail(str(error))
    address = address or settings.flower_address
    port = settings.flower_port if port is None else port
    if not 0 < port < 65536:
        _fail(f"--port {port} is not a TCP port")
    if not is_loopback(address):
        terminal.console.print(f"note: Flower listens on {address}, beyond this host; keep it behind a firewall "
                               "or a TLS proxy (basic auth is sent in clear over plain HTTP)",
                               highlight=False, soft_wrap=True)
    os.environ[FLOWER_AUTH_ENV] = credentials
    os.environ.pop(FLOWER_OPEN_API_ENV, None)
    use_broker(settings.broker_url)
    code = app.start(flower_argv(address, port))
    raise typer.Exit(code or 0)
