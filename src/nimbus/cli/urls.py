"""``nimbus url``: serve a function (or one alias) as plain HTTP at ``/fn/{name}[:{alias}]/…``, show how it is
served, or stop serving it."""

from typing import Annotated

import typer

from nimbus.cli.client import DEFAULT_URL, Api, UrlOption
from nimbus.cli.output import print_json


def url_command(
    name: Annotated[str, typer.Argument(help="Function name, or NAME:ALIAS for an alias's own URL.")],
    auth: Annotated[str | None, typer.Option(help="none: anyone may call it; key: callers need an API key.",
                                             show_default=False)] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", help="An origin browsers may call it from (repeat; * for any).", show_default=False)] = None,
    cors_method: Annotated[list[str] | None, typer.Option("--cors-method", help="An allowed method (repeat).",
                                                          show_default=False)] = None,
    cors_header: Annotated[list[str] | None, typer.Option("--cors-header", help="An allowed request header (repeat).",
                                                          show_default=False)] = None,
    cors_expose: Annotated[list[str] | None, typer.Option("--cors-expose", help="A header scripts may read (repeat).",
                                                          show_default=False)] = None,
    cors_max_age: Annotated[int | None, typer.Option(help="Seconds a browser may cache a preflight.",
                                                     show_default=False)] = None,
    cors_credentials: Annotated[bool, typer.Option("--cors-credentials", help="Allow cookies and credentials.")]
    = False,
    delete: Annotated[bool, typer.Option("--delete", help="Stop serving it.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Without options, show the function's URL config; with --auth or --cors-*, set it; --delete removes it."""
    base, _, qualifier = name.partition(":")
    path = f"/api/v1/functions/{base}/url"
    params = {"qualifier": qualifier} if qualifier else None
    setting = auth is not None or any((cors_origin, cors_method, cors_header, cors_expose)) or \
        cors_max_age is not None or cors_credentials
    with Api(url) as api:
        if delete:
            response = api.request("DELETE", path, params=params)
            if response.is_error:
                api.raise_problem(response)
            typer.echo(f"{name} is no longer served over HTTP")
            return
        if not setting:
            print_json(api.call("GET", path, params=params))
            return
        cors: dict = {"allow_origins": cors_origin or [], "allow_methods": cors_method or [],
                      "allow_headers": cors_header or [], "expose_headers": cors_expose or [],
                      "allow_credentials": cors_credentials}
        if cors_max_age is not None:
            cors["max_age"] = cors_max_age
        response = api.request("PUT", path, params=params, json={"auth": auth or "key", "cors": cors})
        if response.is_error:
            api.raise_problem(response)
    shown = response.json()
    typer.echo(f"{name} answers at {shown['url']} (auth: {shown['auth']})")
