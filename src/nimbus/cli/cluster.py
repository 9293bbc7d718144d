"""``nimbus cluster haproxy-config`` writes the load balancer's configuration (no node needed);
``nimbus nodes`` lists the nodes sharing the database of the node at ``--url``."""

from typing import Annotated

import typer

from nimbus.cli.client import DEFAULT_URL, Api, UrlOption, fail
from nimbus.cli.output import note, number, print_json, table

cluster_app = typer.Typer(help="Run several nodes on one PostgreSQL database.", no_args_is_help=True)


@cluster_app.command("haproxy-config")
def haproxy_config(
    node: Annotated[list[str] | None, typer.Option("--node", help="A node's base URL, e.g. http://10.0.0.1:8080 "
                                                   "(repeat for each node).", show_default=False)] = None,
    bind: Annotated[str, typer.Option("--bind", help="Where HAProxy listens, host:port.")] = "0.0.0.0:8000",
    dns: Annotated[str | None, typer.Option("--dns", help="Instead of --node: a DNS name:port whose addresses are "
                                            "the nodes (a Kubernetes headless Service).", show_default=False)] = None,
    slots: Annotated[int, typer.Option("--slots", help="With --dns: the most nodes the name may hold.")] = 8,
    resolver: Annotated[str | None, typer.Option("--resolver", help="With --dns: the DNS server's ip:port "
                                                 "(default: /etc/resolv.conf's).", show_default=False)] = None,
) -> None:
    """Print an haproxy.cfg that hashes calls on the function name, health-checks /health and retries only
    refused connections. Install it as /etc/haproxy/haproxy.cfg (Debian's haproxy package)."""
    from nimbus.cluster.haproxy import render  # only this command needs it

    try:
        text = render(node or (), bind=bind, dns=dns, slots=slots, resolver=resolver)
    except ValueError as exc:
        fail(str(exc), 2)
    typer.echo(text, nl=False)


def nodes(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List the nodes of the cluster (those sharing this node's database), as this node sees them."""
    with Api(url) as api:
        found = api.call("GET", "/api/v1/nodes")["nodes"]
    if as_json:
        print_json({"nodes": found})
        return
    if not found:
        note("no nodes")
        return
    rows = [
        [n["id"], n["address"], n["state"], _age(n.get("heartbeat_age_s")), number(n.get("machines")),
         number(n.get("in_flight")), number(n.get("queue_depth")), ",".join(n.get("runtimes") or []) or "-"]
        for n in found
    ]
    typer.echo(table(["ID", "ADDRESS", "STATE", "HEARTBEAT", "MACHINES", "IN-FLIGHT", "QUEUE", "RUNTIMES"], rows))


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s ago"
