"""The rendered HAProxy configuration routing real requests to three real backends.

Each backend is a stdlib HTTP server in a thread that answers ``/health`` as told and echoes its own name and
the path of everything else; it counts what it received and on how many connections. HAProxy runs in the
foreground on the rendered configuration, plus a second file adding an admin socket, which the tests use to
read counters and server states.
"""

import contextlib
import csv
import json
import shutil
import socket
import struct
import subprocess
import threading
from http.client import HTTPConnection, RemoteDisconnected
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nimbus.cluster.haproxy import render
from waiting import free_port, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="Debian's haproxy is not installed (make test-tools installs it)"
)

ARN = "arn:aws:lambda:us-east-1:000000000000:function:"


def shapes(name: str) -> list[tuple[str, str]]:
    """(method, path) of every way to call ``name``: each API, each qualifier form, raw and %-encoded."""
    return [
        ("POST", f"/api/v1/functions/{name}/invoke"),
        ("POST", f"/api/v1/functions/{name}/async"),
        ("POST", f"/api/v1/functions/{name}:prod/invoke"),
        ("POST", f"/api/v1/functions/{name}%3A7/invoke?wait=1"),
        ("GET", f"/api/v1/functions/{name}"),
        ("POST", f"/2015-03-31/functions/{name}/invocations"),
        ("POST", f"/2015-03-31/functions/{name}%3A%24LATEST/invocations"),
        ("POST", f"/2015-03-31/functions/{ARN}{name}/invocations"),
        ("POST", f"/2015-03-31/functions/{ARN.replace(':', '%3A')}{name}%3A3/invocations"),
        ("POST", f"/2015-03-31/functions/000000000000%3Afunction%3A{name}%3Alive/invocations"),
        ("GET", f"/fn/{name}/"),
        ("POST", f"/fn/{name}:prod/orders/42?x=1"),
        ("GET", f"/fn/{name}%3Aprod"),
    ]


class Backend:
    """One node stand-in. ``health`` is what /health answers; ``drop`` makes it read a call and hang up."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.health = 200
        self.drop = False
        self.calls: list[str] = []
        # Per connection: [calls carried (health checks not counted), whether the balancer has closed it].
        self.connections: list[list] = []
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, port), _Handler)
        self.server.daemon_threads = True
        self.server.backend = self  # type: ignore[attr-defined]
        self.address = f"{host}:{self.server.server_address[1]}"
        self.url = f"http://{self.address}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hang_up_idle(self) -> None:
        """Close every open connection, as a node does with the ones idle past its keep-alive."""
        with self.lock:
            for sock in list(self.sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop, as a node that died: connections are refused from now on, and open ones are cut."""
        self.server.shutdown()
        self.server.server_close()
        self.hang_up_idle()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

    def setup(self) -> None:
        super().setup()
        self.carried = [0, False]
        with self.server.backend.lock:
            self.server.backend.connections.append(self.carried)
            self.server.backend.sockets.add(self.connection)

    def do_GET(self) -> None:
        backend = self.server.backend
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/health":
            self._send(backend.health, b"")
            return
        self.carried[0] += 1
        with backend.lock:
            backend.calls.append(self.path)
        if backend.drop:
            self.close_connection = True  # read, then close without a byte of answer
            return
        self._send(200, json.dumps({"node": backend.name, "path": self.path}).encode())

    def do_POST(self) -> None:
        self.do_GET()

    def finish(self) -> None:
        self.carried[1] = True  # the balancer hung up (handle() ends when the peer closes or resets)
        with self.server.backend.lock:
            self.server.backend.sockets.discard(self.connection)
        super().finish()

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class Balancer:
    """haproxy -db on a rendered configuration, with an admin socket for counters and server states."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.port = free_port()
        self.socket_path = workdir / "admin.sock"
        (workdir / "haproxy.cfg").write_text(config.replace("bind 0.0.0.0:8000", f"bind 127.0.0.1:{self.port}"))
        (workdir / "admin.cfg").write_text(f"global\n    stats socket {self.socket_path} mode 600 level admin\n")
        self.log = (workdir / "haproxy.log").open("wb")
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg"), "-f", str(workdir / "admin.cfg")],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.http = HTTPConnection("127.0.0.1", self.port, timeout=60)

    def admin(self, command: str) -> str:
        wait_until(self.socket_path.exists, what="haproxy's admin socket")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers, by server name."""
        rows = csv.DictReader(self.admin("show stat").lstrip("# ").splitlines())
        return {row["svname"]: row for row in rows if row["pxname"] == "nodes" and row["svname"] != "BACKEND"}

    def wait_checked(self, count: int) -> None:
        """Until ``count`` servers have passed a health check (not merely started up)."""
        wait_until(lambda: sum(s["check_status"] == "L7OK" and s["status"] == "UP"
                               for s in self.servers().values()) == count, what=f"{count} servers UP")

    def call(self, method: str, path: str) -> tuple[int, str | None]:
        """(status, name of the backend that answered, or None) over one kept-alive client connection."""
        self.http.request(method, path, body=b"{}" if method == "POST" else None)
        response = self.http.getresponse()
        body = response.read()
        return response.status, json.loads(body)["node"] if response.status == 200 and body else None

    def node_of(self, name: str) -> str:
        status, node = self.call("POST", f"/api/v1/functions/{name}/invoke")
        assert status == 200
        return node

    def stop(self) -> None:
        self.http.close()
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture
def backends():
    made = [Backend(name) for name in ("a", "b", "c")]
    yield made
    for backend in made:
        if backend.server.socket.fileno() != -1:
            backend.close()


@pytest.fixture
def start(tmp_path):
    started: list[Balancer] = []

    def start_balancer(config: str) -> Balancer:
        workdir = tmp_path / f"haproxy{len(started)}"
        workdir.mkdir()
        balancer = Balancer(workdir, config)
        started.append(balancer)
        return balancer

    yield start_balancer
    for balancer in started:
        balancer.stop()


@pytest.fixture
def balancer(backends, start):
    running = start(render([b.url for b in backends]))
    running.wait_checked(3)
    return running


def names(count: int) -> list[str]:
    return [f"fn-{i}" for i in range(count)]


def test_one_function_reaches_one_node_by_every_path(balancer, backends):
    for name in names(12):
        reached = set()
        for method, path in shapes(name):
            status, node = balancer.call(method, path)
            assert status == 200, (method, path)
            reached.add(node)
        assert len(reached) == 1, f"{name} reached {reached}"
    seen = {path for b in backends for path in b.calls}
    assert f"/fn/{names(1)[0]}:prod/orders/42?x=1" in seen  # the path reaches the node unchanged


def test_names_spread_over_every_node(balancer):
    placement = {name: balancer.node_of(name) for name in names(50)}
    assert set(placement.values()) == {"a", "b", "c"}
    assert placement == {name: balancer.node_of(name) for name in names(50)}  # and stay put


def test_requests_naming_no_function_are_served_by_turns(balancer):
    # HAProxy finds no hash key and falls back to walking the ring: every node gets a turn.
    reached = set()
    for path in ["/api/v1/functions", "/api/v1/functions/", "/api/v1/keys", "/health", "/2015-03-31/functions"] * 12:
        status, node = balancer.call("GET", path)
        if path != "/health":
            assert status == 200
            reached.add(node)
    assert reached == {"a", "b", "c"}


def test_a_console_session_stays_on_one_node(balancer):
    # A deploy's progress lives on the node that runs it: one browser (one session cookie) must keep
    # reaching that node, whatever console page it asks for; different browsers spread.
    placement = {}
    for i in range(30):
        cookie = f"nimbus_console=token{i:02d}"
        reached = set()
        for path in ["/console/", "/console/deploy/jobs/abc", "/console/functions/x", "/console/static/console.css"]:
            balancer.http.request("GET", path, headers={"Cookie": f"other=1; {cookie}"})
            response = balancer.http.getresponse()
            reached.add(json.loads(response.read())["node"])
        assert len(reached) == 1, f"{cookie} reached {reached}"
        placement[cookie] = reached.pop()
    assert set(placement.values()) == {"a", "b", "c"}


def test_the_balancer_knows_the_console_cookie_by_name():
    from nimbus.cluster import haproxy
    from nimbus.console import web

    assert haproxy.CONSOLE_COOKIE == web.COOKIE


def test_a_draining_node_stops_getting_calls_and_comes_back(balancer, backends):
    placement = {name: balancer.node_of(name) for name in names(50)}
    b = backends[1]
    on_b = [name for name, node in placement.items() if node == "b"]
    assert on_b
    b.health = 503
    wait_until(lambda: balancer.servers()[b.address]["status"] == "DOWN", what="b marked down")
    calls_before = len(b.calls)
    moved = {name: balancer.node_of(name) for name in names(50)}
    assert len(b.calls) == calls_before  # no new call reached the draining node
    assert all(moved[name] != "b" for name in on_b)
    assert all(moved[name] == node for name, node in placement.items() if node != "b")  # the others stay put

    b.health = 200
    wait_until(lambda: balancer.servers()[b.address]["status"] == "UP", what="b back up")
    assert {name: balancer.node_of(name) for name in names(50)} == placement


def test_a_refused_connection_is_retried_on_another_node(balancer, backends):
    placement = {name: balancer.node_of(name) for name in names(50)}
    b = backends[1]
    on_b = [name for name, node in placement.items() if node == "b"]
    # Keep HAProxy believing b is up (no health checks), so every call for b really tries it first.
    balancer.admin(f"disable health nodes/{b.address}")
    b.close()
    for name in on_b:
        status, node = balancer.call("POST", f"/api/v1/functions/{name}/invoke")
        assert status == 200 and node in ("a", "c")
    stats = balancer.servers()
    assert stats[b.address]["status"] == "no check"  # still in, unchecked: the connection was really tried
    assert int(stats[b.address]["wredis"]) >= len(on_b)  # each of those calls was redispatched from b
    for name in on_b:  # and ran exactly once
        assert sum(c.calls.count(f"/api/v1/functions/{name}/invoke") for c in backends) == 2


def test_a_call_that_reached_a_node_is_never_sent_again(balancer, backends):
    placement = {name: balancer.node_of(name) for name in names(50)}
    b = backends[1]
    on_b = [name for name, node in placement.items() if node == "b"]
    b.drop = True
    before = {backend.name: len(backend.calls) for backend in backends}

    # The first request of a client connection gets HAProxy's 502.
    fresh = HTTPConnection("127.0.0.1", balancer.port, timeout=60)
    fresh.request("POST", f"/api/v1/functions/{on_b[0]}/invoke", body=b"{}")
    assert fresh.getresponse().status == 502
    fresh.close()
    # A later one on a kept-alive connection: HAProxy closes it without an answer, as the node did (the
    # client learns exactly what a client of the node itself would).
    with pytest.raises(RemoteDisconnected):
        balancer.call("POST", f"/api/v1/functions/{on_b[-1]}/invoke")

    after = {backend.name: len(backend.calls) for backend in backends}
    assert after == {**before, "b": before["b"] + 2}  # b saw each once; no other node saw a copy
    stats = balancer.servers()
    assert int(stats[b.address]["wretr"]) == 0 and int(stats[b.address]["wredis"]) == 0


def test_node_connections_are_reused_and_a_node_closing_idle_ones_fails_no_call(balancer, backends):
    # Kept-alive connections to the nodes carry many calls (a new connection per call cost a third of the
    # throughput). A node closes the ones idle past its keep-alive (uvicorn: NIMBUS_KEEPALIVE_S): HAProxy
    # sees them close and opens new ones, and no call fails for it.
    balancer.call("GET", "/api/v1/functions")
    client_socket = balancer.http.sock
    for name in names(30):
        assert balancer.call("POST", f"/api/v1/functions/{name}/invoke")[0] == 200
    assert balancer.http.sock is client_socket  # one client connection carried every call
    assert sum(len(b.calls) for b in backends) == 31
    carried = [c for b in backends for c in b.connections if c[0]]
    assert any(calls > 1 for calls, _ in carried)  # reused

    for backend in backends:  # as a node's keep-alive running out: it hangs up on its idle connections
        backend.hang_up_idle()
    wait_until(lambda: all(closed for _, closed in carried), what="the idle connections closing")
    for name in names(30):
        assert balancer.call("POST", f"/api/v1/functions/{name}/invoke")[0] == 200
    stats = balancer.servers()
    assert all(int(row["eresp"]) == 0 for row in stats.values()), stats


def test_removing_a_node_moves_only_its_own_functions(backends, start):
    first = start(render([b.url for b in backends]))
    first.wait_checked(3)
    placement = {name: first.node_of(name) for name in names(50)}
    first.stop()

    # Same nodes in another order: the ids come from the addresses, so nothing moves.
    shuffled = start(render([backends[2].url, backends[0].url, backends[1].url]))
    shuffled.wait_checked(3)
    assert {name: shuffled.node_of(name) for name in names(50)} == placement
    shuffled.stop()

    without_b = start(render([backends[0].url, backends[2].url]))
    without_b.wait_checked(2)
    after = {name: without_b.node_of(name) for name in names(50)}
    assert all(after[name] == node for name, node in placement.items() if node != "b")
    assert all(after[name] in ("a", "c") for name, node in placement.items() if node == "b")


class _Dns:
    """A DNS server of one name with A records, on UDP: enough for HAProxy's resolvers."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.lower()
        self.addresses = addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(4096)
                self.sock.sendto(self._answer(query), peer)
            except OSError:  # closed at the end of the test
                return

    def _answer(self, query: bytes) -> bytes:
        labels, offset = [], 12
        while length := query[offset]:
            labels.append(query[offset + 1:offset + 1 + length].decode().lower())
            offset += 1 + length
        qtype = struct.unpack("!H", query[offset + 1:offset + 3])[0]
        question = query[12:offset + 5]
        known = ".".join(labels) == self.name
        records = self.addresses if known and qtype == 1 else []
        answers = b"".join(struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(ip) for ip in records)
        flags = 0x8180 if known else 0x8183  # a response, recursion available; NXDOMAIN for other names
        return query[:2] + struct.pack("!HHHHH", flags, 1, len(records), 0, 0) + question + answers

    def close(self) -> None:
        self.sock.close()


def test_dns_mode_routes_to_the_addresses_of_a_name(start):
    port = free_port()
    made = [Backend(name, host=f"127.0.0.{i}", port=port) for i, name in enumerate(("a", "b", "c"), start=1)]
    dns = _Dns("nimbus-nodes.test", [b.address.rpartition(":")[0] for b in made])
    try:
        balancer = start(render(dns=f"nimbus-nodes.test:{port}", resolver=dns.address, slots=4))
        balancer.wait_checked(3)
        placement = {name: balancer.node_of(name) for name in names(50)}
        assert set(placement.values()) == {"a", "b", "c"}
        for name in names(5):
            assert {balancer.call(method, path)[1] for method, path in shapes(name)} == {placement[name]}
    finally:
        dns.close()
        for backend in made:
            backend.close()
