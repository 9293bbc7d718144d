"""The HAProxy configuration as HAProxy itself reads it (``haproxy -c``), the arguments ``render`` refuses, and
the two CLI commands of a cluster run as a user would (``python -m nimbus.cli``).

Routing behaviour (hashing, health checks, retries) is exercised in tests/integration/test_haproxy_routing.py.
"""

import json
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nimbus.cluster.haproxy import render

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="Debian's haproxy is not installed (make test-tools installs it)"
)
K8S_NAME = "nimbus-nodes.nimbus.svc.cluster.local:8080"


def haproxy_check(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)


@needs_haproxy
@pytest.mark.parametrize("text", [
    render(["http://127.0.0.1:8080"]),
    render(["http://127.0.0.1:8080", "http://localhost:8081/", "http://[::1]:8082"], bind="127.0.0.1:9000"),
    render(dns=K8S_NAME),
    render(dns="nodes.example:80", slots=3, resolver="10.0.0.53:53", bind="[::]:8000"),
], ids=["one-node", "three-nodes", "dns", "dns-resolver"])
def test_haproxy_accepts_the_configuration(tmp_path, text):
    checked = haproxy_check(tmp_path, text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "WARNING" not in checked.stdout + checked.stderr


def test_the_configuration_holds_what_the_cluster_relies_on():
    text = render(["http://10.0.0.1:8080", "http://10.0.0.2:8080"])
    lines = {line.strip() for line in text.splitlines()}
    for line in ["mode http", "hash-type consistent", "balance hash var(txn.function)", "retry-on conn-failure",
                 "option redispatch 1", "http-reuse safe", "http-check expect status 200",
                 "default-server check inter 1s fall 2 rise 2 pool-purge-delay 1s", "timeout server 960s"]:
        assert line in lines
    assert "uri /health" in text
    assert not re.search(r"retry-on .*(empty-response|response-timeout|all-retryable|5\d\d)", text)


def test_dns_mode_fills_slots_from_a_resolvers_section():
    text = render(dns=K8S_NAME, slots=5)
    assert f"server-template node 5 {K8S_NAME} resolvers cluster" in text
    assert "parse-resolv-conf" in text and "\nresolvers cluster\n" in text
    with_resolver = render(dns=K8S_NAME, resolver="10.96.0.10:53")
    assert "nameserver dns 10.96.0.10:53" in with_resolver and "parse-resolv-conf" not in with_resolver


def test_output_is_deterministic_and_ids_follow_addresses():
    urls = ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://node-c.internal:8080"]
    assert render(urls) == render(list(urls))
    assert render(dns=K8S_NAME) == render(dns=K8S_NAME)

    def ids(text: str) -> dict[str, int]:
        return {m[1]: int(m[2]) for m in re.finditer(r"^ +server (\S+) \S+ id (\d+)$", text, re.M)}

    forward, backward = ids(render(urls)), ids(render(urls[::-1]))
    assert forward == backward and len(forward) == 3
    assert ids(render(urls[:2])) == {name: forward[name] for name in ("10.0.0.1:8080", "10.0.0.2:8080")}
    assert len(set(forward.values())) == 3 and all(0 < i < 2**20 for i in forward.values())


@pytest.mark.parametrize("kwargs", [
    {"servers": ["https://10.0.0.1:8080"]},
    {"servers": ["10.0.0.1:8080"]},
    {"servers": ["http://10.0.0.1"]},
    {"servers": ["http://:8080"]},
    {"servers": ["http://10.0.0.1:99999"]},
    {"servers": ["http://10.0.0.1:8080/api"]},
    {"servers": ["http://10.0.0.1:8080?x=1"]},
    {"servers": ["http://user:secret@10.0.0.1:8080"]},
    {"servers": ["http://bad_host!:8080"]},
    {"servers": ["http://10.0.0.1:8080", "http://10.0.0.1:8080/"]},
    {"servers": "http://10.0.0.1:8080"},
    {},
    {"servers": ["http://10.0.0.1:8080"], "dns": K8S_NAME},
    {"dns": "nimbus-nodes"},
    {"dns": "bad name:8080"},
    {"dns": K8S_NAME, "slots": 0},
    {"dns": K8S_NAME, "resolver": "10.0.0.53"},
    {"servers": ["http://10.0.0.1:8080"], "bind": "8000"},
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        render(**kwargs)


def nimbus(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nimbus.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_prints_the_rendered_configuration():
    printed = nimbus("cluster", "haproxy-config", "--node", "http://10.0.0.1:8080", "--node", "http://10.0.0.2:8080",
                     "--bind", "127.0.0.1:8000")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == render(["http://10.0.0.1:8080", "http://10.0.0.2:8080"], bind="127.0.0.1:8000")
    printed = nimbus("cluster", "haproxy-config", "--dns", K8S_NAME, "--slots", "4", "--resolver", "10.96.0.10:53")
    assert printed.stdout == render(dns=K8S_NAME, slots=4, resolver="10.96.0.10:53")


def test_cli_refuses_a_bad_node_as_a_usage_error():
    printed = nimbus("cluster", "haproxy-config", "--node", "https://10.0.0.1:8080")
    assert printed.returncode == 2
    assert printed.stdout == "" and printed.stderr.startswith("error: node URL 'https://10.0.0.1:8080'")


NODES = {"nodes": [
    {"id": "n-7f3a", "address": "http://10.0.0.1:8080", "state": "up", "self": True, "driver": "bwrap",
     "runtimes": ["python3.11", "nodejs20"], "version": "0.9.0", "started_at": "2026-01-02T03:04:05+00:00",
     "heartbeat_at": "2026-01-02T03:10:00+00:00", "heartbeat_age_s": 1.234,
     "capacity": {"workers": 4, "max_machines": 64}, "machines": 12, "in_flight": 3, "queue_depth": 0,
     "pool": {"python3.11": {"blank": 2, "idle": 8, "busy": 2, "booting": 0}}},
    {"id": "n-91bc", "address": "http://10.0.0.2:8080", "state": "draining", "self": False, "driver": "bwrap",
     "runtimes": [], "version": "0.9.0", "started_at": "2026-01-02T03:04:06+00:00",
     "heartbeat_at": "2026-01-02T03:09:58+00:00", "heartbeat_age_s": 3.0,
     "capacity": {"workers": 4, "max_machines": 64}, "machines": 0, "in_flight": 0, "queue_depth": 5, "pool": {}},
]}


@pytest.fixture
def node_api():
    """A local HTTP server answering GET /api/v1/nodes with ``answer["body"]``, recording request headers."""
    answer = {"body": NODES, "seen": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer["seen"].append((self.path, self.headers.get("Authorization")))
            body = json.dumps(answer["body"]).encode() if self.path == "/api/v1/nodes" else b"{}"
            self.send_response(200 if self.path == "/api/v1/nodes" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answer["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield answer
    server.shutdown()
    server.server_close()


def test_nodes_prints_a_table(node_api):
    env = {"PATH": "/usr/bin:/bin", "NIMBUS_URL": node_api["url"], "NIMBUS_API_KEY": "nk_test"}
    printed = nimbus("nodes", env=env)
    assert printed.returncode == 0, printed.stderr
    header, first, second = [line.split() for line in printed.stdout.splitlines()]
    assert header == ["ID", "ADDRESS", "STATE", "HEARTBEAT", "MACHINES", "IN-FLIGHT", "QUEUE", "RUNTIMES"]
    assert first == ["n-7f3a", "http://10.0.0.1:8080", "up", "1.2s", "ago", "12", "3", "0", "python3.11,nodejs20"]
    assert second == ["n-91bc", "http://10.0.0.2:8080", "draining", "3.0s", "ago", "0", "0", "5", "-"]
    assert node_api["seen"] == [("/api/v1/nodes", "Bearer nk_test")]


def test_nodes_json_and_empty(node_api):
    printed = nimbus("nodes", "--json", "--url", node_api["url"])
    assert printed.returncode == 0 and json.loads(printed.stdout) == NODES
    node_api["body"] = {"nodes": []}
    printed = nimbus("nodes", "--url", node_api["url"])
    assert printed.returncode == 0 and printed.stdout == "" and "no nodes" in printed.stderr
