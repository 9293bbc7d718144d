"""The ``nimbus`` command: ``up`` starts a node; every other command is a client of its REST API.

Client commands talk to ``NIMBUS_URL`` (or ``--url``) and send ``Authorization: Bearer $NIMBUS_API_KEY``
when that variable is set. Exit codes: 0 done, 1 the request or the function failed, 2 a usage error
(bad option, invalid ``--data``, invalid configuration).

This module only assembles the app from the command modules (client.py is the one that talks HTTP,
output.py the one that prints); httpx, the server and doctor's probes are imported inside the commands
that need them, so that ``nimbus --help`` and shell completion stay fast.
"""

from typing import Annotated

import typer

from nimbus import __version__
from nimbus.cli import cluster, doctor, functions, images, keys, schedules, sdk, up, urls, versions
from nimbus.cli.client import CliError

app = typer.Typer(
    name="nimbus",
    help="Nimbus: self-hosted serverless functions in sandboxed machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nimbus {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Nimbus: self-hosted serverless functions in sandboxed machines.

    Start a node with 'nimbus up', then deploy and invoke functions against it (NIMBUS_URL,
    default http://127.0.0.1:8080; NIMBUS_API_KEY when the node has auth on).
    """


# In the order 'nimbus --help' lists them.
app.command("up")(up.up)
app.command("serve", help="Alias of 'up': start a node in the foreground.")(up.up)
app.command("deploy")(functions.deploy)
app.command("invoke")(functions.invoke)
app.command("ls")(functions.list_functions)
app.command("layers")(functions.list_layers)
app.command("gc")(functions.gc)
app.command("get")(functions.get)
app.command("rm")(functions.rm)
app.command("publish")(versions.publish)
app.command("versions")(versions.versions)
app.add_typer(versions.alias_app, name="alias")
app.command("url")(urls.url_command)
app.add_typer(schedules.schedule_app, name="schedule")
app.command("invocations")(functions.invocations)
app.command("logs")(functions.logs)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(images.images_app, name="images")
app.add_typer(cluster.cluster_app, name="cluster")
app.command("nodes")(cluster.nodes)
app.command("sdk")(sdk.sdk)
app.command("doctor")(doctor.doctor)


def main() -> int:
    """The console script: run the app, turning ``CliError`` into ``error: ...`` and its exit code."""
    try:
        app(prog_name="nimbus")
    except CliError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.code
    except KeyboardInterrupt:
        typer.echo("", err=True)
        return 130
    return 0

