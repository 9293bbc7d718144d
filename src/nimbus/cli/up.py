"""``nimbus up`` (alias ``serve``): the one command that runs a node rather than talking to one.

Options become ``Settings`` overrides; the server and the drivers are imported only once they are valid.
"""

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from nimbus.cli.client import fail


class AuthMode(str, Enum):
    """``nimbus up --auth``: the values of NIMBUS_AUTH."""

    on = "on"
    off = "off"


def up(
    host: Annotated[str | None, typer.Option(help="Address to bind (NIMBUS_HOST).", show_default=False)] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (NIMBUS_PORT).", show_default=False)] = None,
    home: Annotated[
        Path | None,
        typer.Option(help="Directory for the database, artifacts and sockets (NIMBUS_HOME).", show_default=False),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", exists=True, dir_okay=False, readable=True,
            help="nimbus.toml to read (NIMBUS_CONFIG; default $NIMBUS_HOME/nimbus.toml).", show_default=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="sqlite:///path or postgresql://... (NIMBUS_DATABASE_URL).", show_default=False),
    ] = None,
    auth: Annotated[
        AuthMode | None,
        typer.Option(show_default=False, case_sensitive=False,
                     help="on: every API call needs an API key; the first start prints an admin key once "
                          "(NIMBUS_AUTH; default off, which only a loopback address allows)."),
    ] = None,
    rate_limit: Annotated[
        float | None,
        typer.Option(min=0, show_default=False, help="Requests/s per API key, 0 for none (NIMBUS_RATE_LIMIT)."),
    ] = None,
    rate_burst: Annotated[
        int | None,
        typer.Option(min=0, show_default=False,
                     help="Requests at once above the rate; 0: one second's worth (NIMBUS_RATE_BURST)."),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(min=1, show_default=False,
                     help="Worker processes, each a whole node on the same port and store, to use several "
                          "cores (NIMBUS_PROCESSES; default 1)."),
    ] = None,
) -> None:
    """Start a node (gateway, scheduler, machine pool) in the foreground; Ctrl-C stops it.

    On a loopback address auth stays off unless asked for (--auth on); any other address needs it on.
    """
    from pydantic import ValidationError

    from nimbus.config import Settings

    # The TOML file is found through the environment, so the options that locate it go there too.
    if config is not None:
        os.environ["NIMBUS_CONFIG"] = str(config.resolve())
    if home is not None:
        os.environ["NIMBUS_HOME"] = str(home)
    overrides = {
        key: value
        for key, value in {"host": host, "port": port, "home": home, "database_url": database_url,
                           "auth": auth.value if auth else None,
                           "rate_limit": rate_limit, "rate_burst": rate_burst, "processes": processes}.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        fail(f"invalid configuration: {_settings_problems(exc)}", 2)
    except (ValueError, OSError) as exc:  # an unreadable or malformed nimbus.toml
        fail(f"cannot read the configuration: {exc}", 2)
    from nimbus.machines import DRIVERS

    if settings.driver not in DRIVERS:
        fail(f"NIMBUS_DRIVER={settings.driver}: that driver is not available in this version of Nimbus "
             f"(available: {', '.join(sorted(DRIVERS))}); see the README, 'Running on KVM hosts'", 2)
    if settings.driver == "firecracker":
        _preflight_firecracker(settings)

    if settings.processes > 1:
        from nimbus.processes import supervise

        raise typer.Exit(supervise(settings))
    from nimbus.app import serve

    serve(settings)


def _preflight_firecracker(settings) -> None:
    """Refuse to start a firecracker node that could not start one machine, saying what is missing."""
    from nimbus.app import _driver_options
    from nimbus.machines.firecracker import FirecrackerDriver

    driver = FirecrackerDriver(settings.home.resolve(), **_driver_options(settings))
    problems = driver.problems(settings.runtimes)
    if problems:
        fail("NIMBUS_DRIVER=firecracker cannot start machines on this host:\n  - " + "\n  - ".join(problems)
             + "\nsee the README, 'Running on KVM hosts' (or run with NIMBUS_DRIVER=bwrap)", 2)


def _settings_problems(exc) -> str:
    parts = []
    for problem in exc.errors():
        message = str(problem.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(part) for part in problem.get("loc", ()))
        parts.append(f"NIMBUS_{loc.upper()}: {message}" if loc else message)
    return "; ".join(parts)
