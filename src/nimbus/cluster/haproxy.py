"""The HAProxy configuration of a cluster: sync calls hashed on the function's name, so that one function's
calls meet the warm machines of one node.

HAProxy does the routing, health checks and retries itself; this module only writes its configuration, from
node URLs or from one DNS name (a Kubernetes headless Service). The text is deterministic, since deployments
embed it verbatim and tests compare it, and it explains itself, since operators read it.
"""

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

HEALTH_PATH = "/health"
CONSOLE_COOKIE = "nimbus_console"  # console/web.py's session cookie
LONGEST_CALL_S = 900  # a function's largest timeout; the balancer must not cut a call the node still runs
BACKEND = "nodes"

# HAProxy puts each server on its hash ring at points derived from its numeric id (id x 4096 + n, in 32 bits),
# so ids stay below 2**20 to give distinct servers distinct points.
_ID_SPACE = (1 << 20) - 1
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def render(
    servers: Sequence[str] = (),
    *,
    bind: str = "0.0.0.0:8000",
    dns: str | None = None,
    slots: int = 8,
    resolver: str | None = None,
) -> str:
    """haproxy.cfg for nodes at ``servers`` (base URLs), or at the addresses ``dns`` (``name:port``) resolves
    to, filling up to ``slots`` servers. ``ValueError`` names what is wrong with an argument."""
    if isinstance(servers, str):
        raise ValueError("servers is a list of node URLs, not one string")
    if bool(servers) == bool(dns):
        raise ValueError("give either node URLs or one DNS name, not both and not neither")
    _address(bind, "bind address")
    if dns:
        host, port = _address(dns, "DNS name")
        if not _HOST.fullmatch(host):
            raise ValueError(f"DNS name {dns!r}: {host!r} is not a host name")
        if not 1 <= slots <= 1024:
            raise ValueError(f"slots must be between 1 and 1024 (got {slots})")
        if resolver is not None:
            _address(resolver, "resolver")
        lines = _head(bind) + _backend() + _dns_servers(host, port, slots) + _resolvers(resolver)
    else:
        lines = _head(bind) + _backend() + _servers([_node(url) for url in servers])
    return "\n".join(lines) + "\n"


def _node(url: str) -> tuple[str, int]:
    """(host, port) of a node's base URL: plain http, a host and a port, nothing else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"node URL {url!r}: {exc}") from None
    if parts.scheme != "http":
        raise ValueError(f"node URL {url!r}: nodes speak plain http:// behind the balancer")
    if not parts.hostname or port is None:
        raise ValueError(f"node URL {url!r} needs a host and a port, e.g. http://10.0.0.1:8080")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"node URL {url!r}: only scheme, host and port, e.g. http://10.0.0.1:8080")
    if not _is_ip(parts.hostname) and not _HOST.fullmatch(parts.hostname):
        raise ValueError(f"node URL {url!r}: {parts.hostname!r} is not a host name or IP address")
    return parts.hostname, port


def _address(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{what} {value!r} must be host:port, with a port from 1 to 65535")
    host = host.removeprefix("[").removesuffix("]")
    if not host or any(char.isspace() for char in host):
        raise ValueError(f"{what} {value!r} must be host:port")
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _server_id(name: str, taken: set[int]) -> int:
    # Derived from the address, not the position: a node keeps its place on the ring when others are removed,
    # and every balancer given the same nodes routes alike.
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    server_id = digest % _ID_SPACE + 1
    while server_id in taken:
        server_id = server_id % _ID_SPACE + 1
    taken.add(server_id)
    return server_id


def _head(bind: str) -> list[str]:
    return f"""\
# Nimbus cluster load balancer, written by 'nimbus cluster haproxy-config'. Change the command's options
# rather than this text: the two must not drift apart.
#
# Sync calls may arrive at any node. Hashing on the function's name sends all of a function's calls to one
# node, where its warm machines are; the name is the same for every path that calls it and every version
# or alias, so they all meet there.

global
    # Logs on stdout: containers and journald keep them without a syslog daemon.
    log stdout format raw local0
    # Every call in flight holds two descriptors (client and node side); raise with the open-file limit.
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    # Reaching a node on the cluster's network is quick, or the node is not there: fail fast and retry.
    timeout connect 2s
    # A call may run for a function's longest timeout ({LONGEST_CALL_S} s) before its answer starts. Wait that
    # long plus a margin, on both sides, so the balancer never cuts a call the node is still running.
    timeout server {LONGEST_CALL_S + 60}s
    timeout client {LONGEST_CALL_S + 60}s
    timeout http-request 30s
    timeout http-keep-alive 30s
    # A node's {HEALTH_PATH} waits up to 2 s for its database before answering 503; let it answer.
    timeout check 3s

frontend nimbus
    bind {bind}
    default_backend {BACKEND}

""".splitlines()


def _backend() -> list[str]:
    return f"""\
backend {BACKEND}
    # The hash key: the function's name, from the path of each way to call it (the raw segment here):
    #   /api/v1/functions/NAME[:QUALIFIER]/...        the REST API (invoke, async, and the rest)
    #   /2015-03-31/functions/FUNCTION/invocations     the Lambda API; FUNCTION may be NAME, NAME:QUALIFIER
    #                                                  or an ARN ...:function:NAME[:QUALIFIER], %-encoded
    #   /fn/NAME[:QUALIFIER]/...                       function URLs
    http-request set-var(txn.function,ifnotempty) path,field(5,/) if {{ path_beg /api/v1/functions/ }}
    http-request set-var(txn.function,ifnotempty) path,field(4,/) if {{ path_beg /2015-03-31/functions/ }}
    http-request set-var(txn.function,ifnotempty) path,field(3,/) if {{ path_beg /fn/ }}
    # The console: by its session cookie, so a browser stays on one node (a deploy's progress lives there).
    http-request set-var(txn.function,ifnotempty) req.cook({CONSOLE_COOKIE}) if {{ path_beg /console/ }}
    # Then decoded, without an ARN's prefix and without the qualifier (names hold no ':'): each version and
    # alias of a function shares its node.
    http-request set-var(txn.function,ifnotempty) var(txn.function),url_dec,regsub('^.*:function:',''),field(1,:)
    # Consistent hashing: a node joining or leaving moves only the functions on its own share of the ring.
    # Requests naming no function (listing, creating, keys, {HEALTH_PATH}) have no key: HAProxy takes turns.
    balance hash var(txn.function)
    hash-type consistent

    # A node is in while GET {HEALTH_PATH} answers 200; a draining node answers 503 and leaves within about
    # two seconds (fall 2 x inter 1s), a dead one likewise; two good answers bring it back.
    option httpchk
    http-check send meth GET uri {HEALTH_PATH} ver HTTP/1.1 hdr Host nimbus-haproxy
    http-check expect status 200
    # Surplus idle connections to a node are closed soon after a burst (pool-purge-delay); the rest wait for
    # the next calls. A node closes one only after NIMBUS_KEEPALIVE_S (30 s) idle, and HAProxy sees it close.
    default-server check inter 1s fall 2 rise 2 pool-purge-delay 1s

    # Retry a call on another node only when no connection could be made to the first: then the node never
    # saw it. A request that reached a node is never sent again (not after an empty answer, a timeout or a
    # 5xx), so no call runs twice.
    retries 3
    retry-on conn-failure
    option redispatch 1
    # Connections to nodes are kept alive and reused (a new connection per call cost a third of the
    # throughput here). "safe": a client's first call goes on a connection of its own, as with plain
    # keep-alive. Were a node to close a reused connection as a call is written onto it, the node has not
    # read the call: it is answered with an error and not re-sent, so it still never runs twice.
    http-reuse safe
""".splitlines()


def _servers(nodes: list[tuple[str, int]]) -> list[str]:
    lines = ["    # Each node's id is derived from its address: removing a node leaves the others' functions put."]
    taken: set[int] = set()
    seen: set[str] = set()
    for host, port in nodes:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        name = f"{host.lower()}:{port}"
        if name in seen:
            raise ValueError(f"node {address} is given twice")
        seen.add(name)
        label = re.sub(r"[^A-Za-z0-9_.:-]", "_", name)
        lines.append(f"    server {label} {address} id {_server_id(name, taken)}")
    return lines


def _dns_servers(host: str, port: int, slots: int) -> list[str]:
    return f"""\
    # Nodes are the addresses {host} resolves to (a headless Service), re-resolved every second. Each
    # address takes a free slot of {slots} and keeps it while it stays in the answer, so a function stays on its
    # node as other nodes come and go. Slots start empty (init-addr none), so the balancer starts before DNS
    # answers; more nodes than slots are not used.
    server-template node {slots} {host}:{port} resolvers cluster resolve-prefer ipv4 init-addr none
""".splitlines()


def _resolvers(resolver: str | None) -> list[str]:
    source = "parse-resolv-conf" if resolver is None else f"nameserver dns {resolver}"
    return f"""\

resolvers cluster
    {source}
    # Ask again every second, so new nodes join and removed ones leave within seconds.
    timeout resolve 1s
    timeout retry 1s
    # A DNS server failing for a while does not empty the backend: the last good answer holds for 30 s.
    hold other 30s
    hold refused 30s
    hold timeout 30s
    hold nx 30s
    hold valid 10s
""".splitlines()
