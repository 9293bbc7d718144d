"""``nimbus keys``: create, list and revoke API keys through the node (an admin key is needed)."""

from typing import Annotated

import typer

from nimbus.cli.client import DEFAULT_URL, Api, UrlOption
from nimbus.cli.output import note, print_json, table, when

keys_app = typer.Typer(
    help="Manage API keys (needs an admin key in NIMBUS_API_KEY and a node with auth on).",
    no_args_is_help=True,
)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant the key acts for.")],
    name: Annotated[str, typer.Option("--name", "-n", help="A label for people.")] = "",
    admin: Annotated[bool, typer.Option("--admin", help="The key may manage the keys of every tenant.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON (with the key).")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Create a key; the key is printed on stdout, once (the node keeps only its hash); the Lambda API's
    access key id and secret (for boto3 and the AWS CLI) on stderr, also once."""
    with Api(url) as api:
        key = api.call("POST", "/api/v1/keys", json={"tenant": tenant, "name": name, "admin": admin})
    if as_json:
        print_json(key)
        return
    typer.echo(key["key"])  # stdout holds the key alone: KEY=$(nimbus keys create ...) keeps working
    note(f"for boto3 and the AWS CLI (the Lambda API, SigV4):\n"
         f"  AWS_ACCESS_KEY_ID={key['access_key_id']}\n  AWS_SECRET_ACCESS_KEY={key['secret_access_key']}")
    kind = "admin key" if key["admin"] else "key"
    note(f"created {kind} {key['id']} ({key['prefix']}...) for tenant {key['tenant']}; "
          "it is shown only now: store it (e.g. export NIMBUS_API_KEY=...)")


@keys_app.command("ls")
def keys_ls(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant's keys.",
                                                  show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List keys (revoked ones too), oldest first; a key shows only its first characters."""
    with Api(url) as api:
        found = api.call("GET", "/api/v1/keys", params={"tenant": tenant} if tenant else None)["keys"]
    if as_json:
        print_json({"keys": found})
        return
    if not found:
        note("no keys")
        return
    rows = [
        [k["id"], k["prefix"] + "...", k["tenant"], k["name"] or "-", "yes" if k["admin"] else "no",
         when(k.get("created_at")), when(k.get("revoked_at")) if k.get("revoked_at") else "-"]
        for k in found
    ]
    typer.echo(table(["ID", "PREFIX", "TENANT", "NAME", "ADMIN", "CREATED", "REVOKED"], rows))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from 'nimbus keys ls').")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Revoke a key: it stops working at once on this node, within NIMBUS_AUTH_CACHE_S on the others."""
    with Api(url) as api:
        key = api.call("DELETE", f"/api/v1/keys/{key_id}")
    typer.echo(f"revoked {key['id']} ({key['prefix']}...) of tenant {key['tenant']}")
