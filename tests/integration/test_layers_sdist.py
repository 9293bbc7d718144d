"""Requirements that ship only a source distribution, built in the builder sandbox (issue 17 item 9).

docopt 0.6.2 (an sdist only, on the real registry) end to end; and sdists made here, served from a PEP
503 index over http on 127.0.0.1 that a pip config file (named by PIP_CONFIG_FILE, as the node reads
it) makes the node's index: one that builds, one whose build reaches for other hosts (a 422 naming
them, and nothing reached), one that writes where it may not and far too much.

Their build backends are in-tree (PEP 517 ``backend-path``), so they need nothing from an index but
themselves, and their code runs exactly where a ``setup.py`` would.
"""

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import uuid
from pathlib import Path

import pytest
from test_api import assert_problem, invoke
from test_packages import zipped
from test_security_resolvers import Listener

from nimbus.compiler.base import BuildFailed
from nimbus.compiler.layers import LayerBuilder
from nimbus.compiler.manifests import LayerSpec

pytestmark = pytest.mark.sandbox

# A PEP 517 backend writing a one-module wheel by hand; HOSTILE is what it does first.
BACKEND = '''\
import base64, hashlib, os, socket, sys, zipfile
NAME, VERSION, MODULE = {name!r}, "1.0", {module!r}

def hostile():
{hostile}

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    hostile()
    dist = f"{{MODULE}}-{{VERSION}}"
    files = {{f"{{MODULE}}.py": b"BUILT_IN = 'the builder sandbox'\\n",
             f"{{dist}}.dist-info/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n".encode(),
             f"{{dist}}.dist-info/WHEEL": b"Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}}
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{{path}},sha256={{digest}},{{len(data)}}\\n"
    files[f"{{dist}}.dist-info/RECORD"] = (record + f"{{dist}}.dist-info/RECORD,,\\n").encode()
    wheel = f"{{dist}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel
'''

BENIGN = "    pass"


def reaching_out(host_port: int) -> str:
    """Straight to a port on the host's loopback (another network namespace: refused), then through the proxy
    to that port and to example.com; every failure swallowed, so only the proxy's record can fail the build."""
    return f'''\
    for how, call in (
        ("direct", lambda: socket.create_connection(("127.0.0.1", {host_port}), timeout=5)),
        ("proxied", lambda: __import__("urllib.request").request.urlopen("http://127.0.0.1:{host_port}/", timeout=5)),
        ("example", lambda: __import__("urllib.request").request.urlopen("http://example.com/", timeout=5)),
    ):
        try:
            call()
            print(how, "reached", flush=True)
        except Exception as exc:
            print(how, "failed:", exc.__class__.__name__, flush=True)'''


PLANTING = '''\
    for path in ("/build/src/planted.py", "/build/out/planted.py", "/opt/nimbus/site/planted.py"):
        try:
            open(path, "w").close()
            print("wrote", path, flush=True)
        except OSError as exc:
            print("cannot write", path, exc.__class__.__name__, flush=True)
    sys.exit(3)'''

FILLING = '''\
    chunk = b"x" * (16 << 20)
    with open("/tmp/fill", "wb") as f:
        for _ in range((8 << 30) // len(chunk)):
            f.write(chunk)
            f.flush()'''


def sdist(name: str, hostile: str) -> tuple[str, bytes]:
    """A source distribution of ``name`` 1.0 with an in-tree backend running ``hostile`` first."""
    module = name.replace("-", "_")
    root = f"{module}-1.0"
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        "backend.py": BACKEND.format(name=name, module=module, hostile=hostile),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{root}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return f"{root}.tar.gz", buffer.getvalue()


class Index:
    """A PEP 503 "simple" index over http on 127.0.0.1, serving sdists from a directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        handler = functools.partial(Quiet, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name: str, hostile: str) -> None:
        filename, data = sdist(name, hostile)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "files" / filename).write_bytes(data)
        page = self.root / "simple" / name
        page.mkdir(parents=True)
        digest = hashlib.sha256(data).hexdigest()
        (page / "index.html").write_text(f'<a href="../../files/{filename}#sha256={digest}">{filename}</a>\n')

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def node(make_module_node, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with make_module_node(home, f"sqlite:///{home / 'nimbus.db'}", build_memory_mb=512) as running:
        yield running


@pytest.fixture
def api(node):
    with node.client() as client:
        yield client


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local index made the node's own: the pip config file the node names to its resolvers."""
    served = Index(tmp_path / "index")
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = {served.url}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    yield served
    served.close()


def deploy(api, requirements: str, code: str):
    name = f"sdist-{uuid.uuid4().hex[:8]}"
    resp = api.post("/api/v1/functions", json={
        "name": name, "runtime": "python3", "handler": "app.handler",
        "code_base64": zipped({"app.py": code, "requirements.txt": requirements})}, timeout=600)
    return name, resp


def test_docopt_an_sdist_only_package_from_the_registry_is_built_and_runs(api):
    code = ("from docopt import docopt\n"
            "USAGE = 'Usage: greet <name> [--loud]'\n"
            "def handler(event, context):\n"
            "    args = docopt(USAGE, argv=event['argv'])\n"
            "    return {'name': args['<name>'], 'loud': args['--loud'], 'from': __import__('docopt').__file__}\n")
    name, resp = deploy(api, "docopt==0.6.2\n", code)
    assert resp.status_code == 201, resp.text
    log = resp.json()["layer"]["log"]
    assert "source distributions built there" in log and "docopt-0.6.2.tar.gz" in log, log
    out = invoke(api, name, {"argv": ["nimbus", "--loud"]})
    assert out["status"] == "succeeded", out
    assert out["output"] == {"name": "nimbus", "loud": True, "from": "/opt/layer/docopt.py"}


def test_an_sdist_from_the_configured_http_index_builds_through_the_egress_proxy(api, index):
    index.add("nimbus-probe-ok", BENIGN)
    name, resp = deploy(api, "nimbus-probe-ok==1.0\n",
                        "import nimbus_probe_ok\ndef handler(e, c):\n    return nimbus_probe_ok.BUILT_IN\n")
    assert resp.status_code == 201, resp.text
    assert "Successfully installed nimbus-probe-ok-1.0" in resp.json()["layer"]["log"]
    assert invoke(api, name, {})["output"] == "the builder sandbox"


def test_a_build_that_reaches_for_another_host_is_a_422_naming_it_and_reaches_nothing(api, index, node):
    with Listener() as listener:
        port = int(listener.url.rsplit(":", 1)[1])
        index.add("nimbus-probe-egress", reaching_out(port))
        name, resp = deploy(api, "nimbus-probe-egress==1.0\n", "def handler(e, c):\n    return 1\n")
        problem = assert_problem(resp, 422, f"127.0.0.1:{port}", "example.com:80", "not the package index")
        assert "Successfully installed nimbus-probe-egress-1.0" in problem["detail"]  # it swallowed the errors
        assert listener.hits == []  # neither straight (the sandbox's loopback is its own) nor through the proxy
    assert api.get(f"/api/v1/functions/{name}").status_code == 404


def test_a_build_cannot_write_host_directories_or_the_sandboxs_own_files(api, index):
    index.add("nimbus-probe-planting", PLANTING)
    _, resp = deploy(api, "nimbus-probe-planting==1.0\n", "def handler(e, c):\n    return 1\n")
    detail = assert_problem(resp, 422, "in the builder sandbox")["detail"]
    for path in ("/build/src/planted.py", "/build/out/planted.py", "/opt/nimbus/site/planted.py"):
        assert f"cannot write {path}" in detail, detail
    assert "wrote" not in detail


def test_a_build_that_writes_gigabytes_is_stopped_by_its_memory_limit(api, index, node):
    """/tmp is a tmpfs capped at the build's memory limit (512 MiB here) and counted in its cgroup."""
    index.add("nimbus-probe-filling", FILLING)
    _, resp = deploy(api, "nimbus-probe-filling==1.0\n", "def handler(e, c):\n    return 1\n")
    detail = assert_problem(resp, 422, "in the builder sandbox")["detail"]
    assert "memory limit (512 MiB)" in detail or "No space left" in detail, detail
    builds = Path(node.node.settings.home) / "builds"
    assert not builds.exists() or list(builds.iterdir()) == []  # nothing of the job is left on the host


def test_requirements_with_wheels_resolve_on_the_host_as_before(api):
    """The host's wheel-only resolve stays the path for wheels: the sandbox runs only when it fails."""
    name, resp = deploy(api, "six==1.16.0\n", "import six\ndef handler(e, c):\n    return six.__version__\n")
    assert resp.status_code == 201, resp.text
    assert "builder sandbox" not in resp.json()["layer"]["log"]
    assert invoke(api, name, {})["output"] == "1.16.0"


class Docker:
    """A builder without sealed jobs, as the docker builder is: it must never be asked to run one."""

    name = "docker"

    async def run(self, job):
        raise AssertionError(f"ran {job}")


@pytest.mark.parametrize(("builder", "sdists", "why"), [
    (Docker(), True, "the docker builder cannot build source distributions"),
    (None, False, "source distributions are not built here"),
])
async def test_without_sealed_jobs_or_with_sdists_off_layers_stay_wheels_only(tmp_path, index, builder, sdists, why):
    index.add("nimbus-probe-unbuilt", BENIGN)
    layers = LayerBuilder(tmp_path / "home", builder, sdists=sdists)
    with pytest.raises(BuildFailed) as info:
        await layers.build(LayerSpec("python3", (("requirements.txt", b"nimbus-probe-unbuilt==1.0\n"),)), "k", "p")
    assert why in str(info.value) and "wheels only" in str(info.value) and "builder sandbox" not in str(info.value)
