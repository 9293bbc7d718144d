"""``nimbus publish``, ``nimbus versions`` and ``nimbus alias``: published versions and the aliases that point
at them (``nimbus invoke NAME:QUALIFIER`` runs any of them)."""

from typing import Annotated, Any

import typer

from nimbus.cli.client import DEFAULT_URL, Api, UrlOption
from nimbus.cli.output import note, print_json, table, when

alias_app = typer.Typer(help="Aliases: names that point at a published version (and maybe a weighted second).",
                        no_args_is_help=True)


def publish(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    description: Annotated[str | None, typer.Option(help="The version's description.", show_default=False)] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Publish $LATEST as the next version number (if it is published already, that number)."""
    with Api(url) as api:
        response = api.request("POST", f"/api/v1/functions/{name}/versions",
                               json={"description": description} if description is not None else None)
        if response.is_error:
            api.raise_problem(response)
    version = response.json()
    how = "published" if response.status_code == 201 else "already published"
    typer.echo(f"{how} {name} version {version['version']} (revision {version['revision']}, code sha256 "
               f"{version['code_sha256'][:12]})")


def versions(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List a function's published versions, and the aliases pointing at each."""
    with Api(url) as api:
        found = api.call("GET", f"/api/v1/functions/{name}/versions")["versions"]
        aliases = api.call("GET", f"/api/v1/functions/{name}/aliases")["aliases"]
    if as_json:
        print_json({"versions": found, "aliases": aliases})
        return
    if not found:
        note(f"{name} has no published versions (publish $LATEST with 'nimbus publish {name}')")
        return
    pointing: dict[str, list[str]] = {}
    for alias in aliases:
        pointing.setdefault(alias["version"], []).append(alias["name"])
        for extra, weight in alias["additional"].items():
            pointing.setdefault(extra, []).append(f"{alias['name']} ({weight:.0%})")
    rows = [[v["version"], str(v["revision"]), v["code_sha256"][:12], ", ".join(pointing.get(v["version"], [])),
             v["description"], when(v.get("created_at"))] for v in found]
    typer.echo(table(["VERSION", "REVISION", "CODE", "ALIASES", "DESCRIPTION", "CREATED"], rows))


def _weights(pairs: list[str] | None) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in pairs or []:
        version, sep, weight = pair.partition("=")
        try:
            weights[version] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not version:
            raise typer.BadParameter(f"{pair!r} is not VERSION=WEIGHT (e.g. 4=0.1)", param_hint="'--weight'")
    return weights


@alias_app.command("set")
def alias_set(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    alias: Annotated[str, typer.Argument(help="The alias, e.g. prod.")],
    version: Annotated[str, typer.Argument(help="A published version number, or $LATEST.")],
    weight: Annotated[list[str] | None, typer.Option(
        "--weight", "-w", help="VERSION=WEIGHT: send this share (0 to 1) of the calls to a second version.",
        show_default=False)] = None,
    description: Annotated[str | None, typer.Option(help="The alias's description.", show_default=False)] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Create an alias, or point an existing one at VERSION (a rollback is one of these)."""
    body: dict[str, Any] = {"version": version, "additional": _weights(weight)}
    if description is not None:
        body["description"] = description
    with Api(url) as api:
        response = api.request("POST", f"/api/v1/functions/{name}/aliases", json={"name": alias, **body})
        action = "created"
        if response.status_code == 409:
            response = api.request("PUT", f"/api/v1/functions/{name}/aliases/{alias}", json=body)
            action = "updated"
        if response.is_error:
            api.raise_problem(response)
    made = response.json()
    extra = "".join(f", {w:.0%} to {v}" for v, w in made["additional"].items())
    typer.echo(f"{action} {name}:{made['name']} -> version {made['version']}{extra}")


@alias_app.command("ls")
def alias_ls(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List a function's aliases."""
    with Api(url) as api:
        found = api.call("GET", f"/api/v1/functions/{name}/aliases")["aliases"]
    if as_json:
        print_json({"aliases": found})
        return
    if not found:
        note(f"{name} has no aliases (make one with 'nimbus alias set {name} ALIAS VERSION')")
        return
    rows = [[a["name"], a["version"], ", ".join(f"{v}={w:g}" for v, w in a["additional"].items()) or "-",
             a["description"], when(a.get("updated_at"))] for a in found]
    typer.echo(table(["ALIAS", "VERSION", "WEIGHTED", "DESCRIPTION", "UPDATED"], rows))


@alias_app.command("rm")
def alias_rm(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    alias: Annotated[str, typer.Argument(help="The alias.")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Delete an alias (its versions stay)."""
    with Api(url) as api:
        api.call("DELETE", f"/api/v1/functions/{name}/aliases/{alias}")
    typer.echo(f"deleted {name}:{alias}")
