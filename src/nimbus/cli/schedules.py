"""``nimbus schedule add|ls|rm|pause|resume``: EventBridge-style schedules that queue async invocations."""

import json
from typing import Annotated, Any

import typer

from nimbus.cli.client import DEFAULT_URL, Api, UrlOption
from nimbus.cli.output import note, print_json, table, when

schedule_app = typer.Typer(help="Schedules: rate() and cron() expressions (UTC) that invoke a function.",
                           no_args_is_help=True)
Name = Annotated[str, typer.Argument(help="Function name (or name:qualifier for a version or alias).")]
ScheduleName = Annotated[str, typer.Argument(help="The schedule's name.")]


def _split(target: str) -> tuple[str, str | None]:
    name, sep, qualifier = target.partition(":")
    return name, qualifier if sep else None


@schedule_app.command("add")
def add(
    target: Name,
    schedule: ScheduleName,
    expression: Annotated[str, typer.Argument(help="rate(5 minutes), cron(0 3 * * ? *)…")],
    data: Annotated[str | None, typer.Option("--input", "-d", help="A fixed JSON event instead of the "
                                             "Scheduled Event.", show_default=False)] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Create it paused.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Add a schedule to a function."""
    name, qualifier = _split(target)
    body: dict[str, Any] = {"name": schedule, "expression": expression, "enabled": not disabled}
    if qualifier:
        body["qualifier"] = qualifier
    if data is not None:
        try:
            body["input"] = json.loads(data)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="'--input'") from None
    with Api(url) as api:
        made = api.call("POST", f"/api/v1/functions/{name}/schedules", json=body)
    typer.echo(f"added {name}/{made['name']}: {made['expression']}, next at {made['next_fire_at']}")


@schedule_app.command("ls")
def ls(
    name: Annotated[str, typer.Argument(help="Function name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List a function's schedules."""
    with Api(url) as api:
        found = api.call("GET", f"/api/v1/functions/{name}/schedules")["schedules"]
    if as_json:
        print_json({"schedules": found})
        return
    if not found:
        note(f"{name} has no schedules (add one with 'nimbus schedule add {name} NAME \"rate(1 hour)\"')")
        return
    rows = [[s["name"], s["expression"], s["qualifier"], "on" if s["enabled"] else "paused",
             when(s["next_fire_at"]) if s["enabled"] else "-"] for s in found]
    typer.echo(table(["SCHEDULE", "EXPRESSION", "QUALIFIER", "STATE", "NEXT"], rows))


@schedule_app.command("rm")
def rm(name: Annotated[str, typer.Argument(help="Function name.")], schedule: ScheduleName,
       url: UrlOption = DEFAULT_URL) -> None:
    """Delete a schedule."""
    with Api(url) as api:
        api.call("DELETE", f"/api/v1/functions/{name}/schedules/{schedule}")
    typer.echo(f"deleted {name}/{schedule}")


def _set_enabled(name: str, schedule: str, enabled: bool, url: str) -> None:
    with Api(url) as api:
        api.call("PUT", f"/api/v1/functions/{name}/schedules/{schedule}", json={"enabled": enabled})
    typer.echo(f"{'resumed' if enabled else 'paused'} {name}/{schedule}")


@schedule_app.command("pause")
def pause(name: Annotated[str, typer.Argument(help="Function name.")], schedule: ScheduleName,
          url: UrlOption = DEFAULT_URL) -> None:
    """Stop a schedule firing (its ticks meanwhile are skipped, not made up later)."""
    _set_enabled(name, schedule, False, url)


@schedule_app.command("resume")
def resume(name: Annotated[str, typer.Argument(help="Function name.")], schedule: ScheduleName,
           url: UrlOption = DEFAULT_URL) -> None:
    """Start a paused schedule again, counting from now."""
    _set_enabled(name, schedule, True, url)
