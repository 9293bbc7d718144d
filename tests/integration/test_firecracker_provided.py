"""The ``provided`` runtime (Lambda's custom runtimes) on the Firecracker driver: its guest image, and its
machines made, initialised and called through the driver, against the TEST STAND-INS of tests/standin.

The image's tree is run as a guest would run it, minus the kernel: as the root of a bwrap sandbox with a
network namespace of its own (so ``lo`` is the guest's loopback), its /sbin/init as PID 1 started with an
empty environment (as the kernel starts init, without PATH), serving a bash bootstrap that loops over
curl as AWS's tutorial does. The driver tests run the stand-in Firecracker, whose "guest" is the real
agent in a network namespace of its own (so each machine's Runtime API is its own 127.0.0.1:9001) on this
host's userland: their bootstraps are POSIX sh, since this host's /bin/sh is dash.

Everything that runs a bootstrap needs the guest agent's ``provided`` runtime (``nimbus.agent.provided``);
the node test also needs the host to know the runtime (``nimbus.runtimes``, the pool's loading).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from test_firecracker_driver import short_dir  # noqa: F401 - a fixture

from nimbus import packages, protocol
from nimbus.agent.contract import SANDBOX_ENV
from nimbus.machines import layout
from nimbus.machines.base import MachineSpec
from nimbus.machines.bwrap import find_bwrap
from nimbus.machines.firecracker import FirecrackerConfig, FirecrackerDriver, images, userland
from nimbus.machines.firecracker import driver as fc_driver

pytestmark = pytest.mark.firecracker

WAIT_S = 60.0  # bounds a broken guest; never asserted on
GUEST_PYTHON = f"/usr/local/bin/python{sys.version_info.major}.{sys.version_info.minor}"
RUNTIME_API = "127.0.0.1:9001"

# AWS's tutorial bootstrap (developer guide, "Building a custom runtime"), its handler inlined: bash features
# (pipefail, here-strings, [[ ]]), mktemp, grep, tr, cut and curl. Each response says who answered.
TUTORIAL_BOOTSTRAP = r"""#!/bin/sh
set -euo pipefail
handler() {
  echo "{\"echo\": $1, \"pid\": $$, \"api\": \"$AWS_LAMBDA_RUNTIME_API\", \"path\": \"$PATH\", \"handler\": \"$_HANDLER\"}"
}
while true
do
  HEADERS="$(mktemp)"
  EVENT_DATA=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  if [[ "$EVENT_DATA" == *fail* ]]; then
    curl -sS -o /dev/null "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/error" \
      -d '{"errorMessage": "asked to fail", "errorType": "Tutorial.Failed", "stackTrace": ["bootstrap"]}'
    continue
  fi
  echo "handling $REQUEST_ID"
  RESPONSE=$(handler "$EVENT_DATA")
  curl -sS -o /dev/null "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" \
    -d "$RESPONSE"
done
"""

# The same loop in POSIX sh, for the stand-in's guest (this host's userland, where /bin/sh is dash). It reports
# its network namespace, which tells one machine's loopback from another's.
SH_BOOTSTRAP = r"""#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
NETNS=$(readlink /proc/self/ns/net)
while true
do
  HEADERS="$(mktemp)"
  EVENT=$(curl -sS -D "$HEADERS" "$API/invocation/next")
  ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  rm -f "$HEADERS"
  case "$EVENT" in
    *fail*)
      curl -sS -o /dev/null -H 'Lambda-Runtime-Function-Error-Type: Shell.Failed' "$API/invocation/$ID/error" \
        -d '{"errorMessage": "asked to fail", "errorType": "Shell.Failed", "stackTrace": ["bootstrap line 13"]}'
      continue ;;
  esac
  echo "handling $ID"
  curl -sS -o /dev/null "$API/invocation/$ID/response" \
    -d "{\"echo\": $EVENT, \"pid\": $$, \"api\": \"$AWS_LAMBDA_RUNTIME_API\", \"netns\": \"$NETNS\"}"
done
"""

INIT_ERROR_BOOTSTRAP = r"""#!/bin/sh
curl -sS -o /dev/null "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/init/error" \
  -d '{"errorMessage": "no configuration", "errorType": "Config.Missing", "stackTrace": []}'
exit 1
"""


def init_header(**fields) -> dict:
    return {"type": "init", "runtime": "provided", "handler": "function.handler", "filename": "bootstrap",
            "env": {}, "memory_mb": 128, "timeout_s": 20.0, "function_name": "custom", "function_version": "1",
            **fields}


def exec_header(number: int = 1) -> dict:
    return {"type": "exec", "invocation_id": f"inv-{number}", "deadline_ms": 20000}


def _need_host_userland() -> None:
    for tool in ("curl", "mktemp", "readlink"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed on this host: the stand-in's guest runs this host's userland")


# ---------------------------------------------------------------- the image


@pytest.fixture(scope="module")
def provided_tree(tmp_path_factory) -> tuple[Path, dict]:
    if not (userland.DPKG_INFO / "curl.list").is_file():
        pytest.skip("curl is not installed on this host (apt-get install curl): no provided tree image")
    root = tmp_path_factory.mktemp("tree-provided") / "root"
    return root, images.build_tree("provided", root)


def _sandbox(root: Path, *argv: str, pass_fds=(), env: dict | None = None) -> subprocess.Popen:
    """``argv`` with ``root`` as /, in new pid and network namespaces (bwrap brings the new ``lo`` up)."""
    command = [find_bwrap(), "--unshare-pid", "--unshare-net", "--as-pid-1", "--die-with-parent",
               "--ro-bind", str(root), "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
               "--tmpfs", "/var/task", "--", *argv]
    return subprocess.Popen(command, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={} if env is None else env)


def test_the_tree_is_python3_s_plus_a_shell_userland(provided_tree, tmp_path_factory):
    root, record = provided_tree
    assert os.readlink(root / "bin") == "usr/bin" and os.readlink(root / "usr/bin/sh") == "bash"
    for name in ("bash", "env", "cat", "mktemp", "cut", "tr", "head", "grep", "sed", "curl"):
        path = root / "usr/bin" / name
        assert path.is_file() and os.access(path, os.X_OK), name
    assert os.readlink(root / "usr/bin/python3") == GUEST_PYTHON
    assert os.readlink(root / layout.PYTHON_LINK.lstrip("/")) == GUEST_PYTHON
    libraries = images._needed_libraries([Path(os.path.realpath(shutil.which("curl")))])
    for name in libraries:
        guest = root / name.lstrip("/") if name.startswith("/") else root / "lib/x86_64-linux-gnu" / name
        assert guest.is_file(), f"curl needs {name}, which the tree lacks"
    assert not (root / "usr/bin/node").exists()
    assert (record["runtime"], record["base"]) == ("provided", "tree")
    assert record["content_hash"] == images.content_hash("provided") != images.content_hash("python3")
    host = userland.dpkg_versions(Path("/"), ("bash", "coreutils", "curl"))
    assert record["tools"]["sh"] == {"version": f"bash {host['bash']}", "path": "/bin/sh"}
    assert record["tools"]["curl"] == {"version": host["curl"], "path": "/usr/bin/curl"}
    assert record["tools"]["coreutils"]["version"] == host["coreutils"]
    assert json.loads((root / "etc/nimbus-image.json").read_text()) == record
    # Every file of the python3 image is here too (the record aside).
    base = tmp_path_factory.mktemp("tree-python3") / "root"
    images.build_tree("python3", base)
    base_files = {p.relative_to(base) for p in base.rglob("*")} - {Path("etc/nimbus-image.json")}
    files = {p.relative_to(root) for p in root.rglob("*") if not p.is_relative_to(root / "bin")}
    assert base_files <= files, sorted(base_files - files)[:5]


def test_the_userland_runs_from_the_tree_alone(provided_tree):
    root, _ = provided_tree
    script = ('set -euo pipefail; echo "bash $BASH_VERSION"; '
              'curl --version | head -n 1; T=$(mktemp); echo a.b.c > "$T"; cut -d. -f2 "$T"; '
              'PATH=/usr/bin:/bin env python3 -c "import sys; print(sys.prefix)"; '
              'curl -sS -o /dev/null http://127.0.0.1:9/ 2>&1 || echo "curl exit $?"')
    proc = _sandbox(root, "/bin/sh", "-c", script)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("bash 5")  # /bin/sh is bash: pipefail and [[ ]] work
    assert lines[1].startswith("curl ") and lines[2:4] == ["b", "/usr/local"]
    assert "Couldn't connect to server" in lines[4] and lines[5] == "curl exit 7"  # a loopback, nothing on :9


def _serve(root: Path, init: dict, code: bytes, events: list) -> tuple[dict, list[tuple[dict, bytes]]]:
    """The tree's /sbin/init as PID 1, started with no environment: ping, ``init``, one exec per event."""
    host, guest = socket.socketpair()
    proc = _sandbox(root, "/sbin/init", "--no-mounts", "--no-poweroff", "--", "--fd", str(guest.fileno()),
                    "--task-dir", "/var/task", pass_fds=(guest.fileno(),))
    guest.close()
    host.settimeout(WAIT_S)
    replies = []
    try:
        protocol.send_frame(host, {"type": "ping", "id": 1})
        reply, _ = protocol.recv_frame(host, protocol.GUEST_TYPES)
        assert (reply["type"], reply["id"]) == ("pong", 1)
        protocol.send_frame(host, {**init_header(**init), "id": 2}, code)
        loaded, _ = protocol.recv_frame(host, protocol.GUEST_TYPES)
        if loaded["type"] == "init_ok":
            for number, event in enumerate(events, start=3):
                protocol.send_frame(host, {**exec_header(number), "id": number}, json.dumps(event).encode())
                replies.append(protocol.recv_frame(host, protocol.GUEST_TYPES))
    finally:
        host.close()
        try:
            _, err = proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    return loaded, replies


def test_init_serves_aws_s_tutorial_bootstrap_with_curl(provided_tree):
    root, _ = provided_tree
    loaded, replies = _serve(root, {}, TUTORIAL_BOOTSTRAP.encode(), [{"n": 1}, {"n": 2}, "fail", {"n": 3}])
    assert loaded["type"] == "init_ok", loaded
    first, second, failed, third = replies
    outputs = []
    for reply, blob in (first, second, third):
        assert reply["type"] == "result", reply
        assert "handling " in reply["logs"]
        outputs.append(json.loads(blob))
    assert [o["echo"] for o in outputs] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert len({o["pid"] for o in outputs}) == 1  # one bootstrap for every call: hot calls reuse it
    assert outputs[0]["api"] == RUNTIME_API and outputs[0]["handler"] == "function.handler"
    # The agent's PATH is bwrap's, from the image's init (the kernel gives none), the node's python3 first.
    assert outputs[0]["path"] == f"{layout.PYTHON_LINK.rsplit('/', 1)[0]}:{SANDBOX_ENV['PATH']}"
    reply, _ = failed
    assert reply["type"] == "error", reply
    assert (reply["error"]["type"], reply["error"]["message"]) == ("Tutorial.Failed", "asked to fail")


def test_init_reports_a_bootstrap_that_is_not_there(provided_tree):
    root, _ = provided_tree
    archive = BytesIO()
    with zipfile.ZipFile(archive, "w") as package:
        package.writestr("function.sh", "echo not a bootstrap\n")
    loaded, _ = _serve(root, {"filename": protocol.TREE_FILENAME}, packages.to_tree(archive.getvalue()), [])
    assert loaded["type"] == "error" and loaded["error"]["type"] == "Runtime.InvalidEntrypoint", loaded


def test_debootstrap_recipe_for_provided(tmp_path):
    command = images.debootstrap_command("provided", tmp_path / "t", "bookworm", "http://m.example/debian")
    assert command[2] == "--include=python3,curl"
    entries = {e.path: e for e in images.debootstrap_entries("provided")}
    assert entries["/usr/bin/sh"].link == "bash" and entries[layout.PYTHON_LINK].link == images.DEBIAN_PYTHON
    assert "/usr/bin/sh" not in {e.path for e in images.debootstrap_entries("python3")}
    assert images.debootstrap_hash("provided", "bookworm", "http://m.example/debian") != images.debootstrap_hash(
        "python3", "bookworm", "http://m.example/debian")


@pytest.mark.skipif(os.environ.get("NIMBUS_TEST_DEBOOTSTRAP") == "0",
                    reason="NIMBUS_TEST_DEBOOTSTRAP=0: the debootstrap image (a minute, network) is left out")
def test_debootstrap_image_serves_the_tutorial_bootstrap(tmp_path):
    """A minbase bookworm with python3 and curl: bash is its /bin/sh, and the tutorial's bootstrap runs."""
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    if not os.path.exists(debugfs):
        pytest.skip("debugfs is not installed (e2fsprogs)")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root")
    import urllib.request

    url = f"{images.host_mirror().rstrip('/')}/dists/{images.DEFAULT_SUITE}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=15):
            pass
    except OSError as exc:
        pytest.skip(f"the Debian mirror does not answer: {url}: {exc}")
    image = images.build_image(tmp_path, "provided", base="debootstrap")
    assert images.parse_image_name(image) == images.ImageName("provided", "debootstrap", image.stem.split("-")[-1])
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run([debugfs, "-R", f"rdump / {root}", str(image)], capture_output=True, check=True)
    assert os.readlink(root / "usr/bin/sh") == "bash" and (root / "usr/bin/curl").is_file()
    record = json.loads((root / "etc/nimbus-image.json").read_text())
    assert record["packages"] == ["python3", "curl"] and record["tools"]["curl"]["version"] != "unknown"
    assert record["tools"]["sh"]["version"].startswith("bash 5")
    loaded, [(reply, blob)] = _serve(root, {}, TUTORIAL_BOOTSTRAP.encode(), [{"n": 7}])
    assert loaded["type"] == "init_ok", loaded
    assert reply["type"] == "result", reply
    assert json.loads(blob)["echo"] == {"n": 7}


# ---------------------------------------------------------------- machines, through the driver and the stand-in


@pytest.fixture(scope="module")
def image_home(tmp_path_factory) -> Path:
    """A node home with a provided guest image (the stand-in boots none, but the driver must find it)."""
    if not (userland.DPKG_INFO / "curl.list").is_file():
        pytest.skip("curl is not installed on this host (apt-get install curl): no provided image")
    home = tmp_path_factory.mktemp("fc-provided-home")
    images.build_image(home, "provided")
    return home


@pytest.fixture
async def make_driver(image_home, short_dir):
    from standin import install

    _need_host_userland()
    installed = install(short_dir)
    kernel = short_dir / "vmlinux-standin"
    kernel.write_bytes(b"\x7fELF stand-in kernel: never booted")  # the stand-in only checks it exists
    drivers = []

    def make(jailed: bool = True, **overrides) -> FirecrackerDriver:
        values = dict(firecracker=installed.firecracker, jailer=installed.jailer if jailed else None,
                      chroot_base=short_dir / "jail", uid=os.getuid(), gid=os.getgid(), kernel=kernel,
                      run_dir=short_dir / "vms", start_timeout_s=20.0)
        driver = FirecrackerDriver(image_home, FirecrackerConfig(**{**values, **overrides}))
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()
    shutil.rmtree(image_home / fc_driver.SNAPSHOTS_DIR, ignore_errors=True)


async def init_and_call(machine, events: list, code: bytes = SH_BOOTSTRAP.encode()) -> list[tuple[dict, bytes]]:
    reply, _ = await machine.request(init_header(), code, timeout=WAIT_S)
    assert reply["type"] == "init_ok", reply
    return [await machine.request(exec_header(n), json.dumps(event).encode(), timeout=WAIT_S)
            for n, event in enumerate(events)]


async def test_a_provided_machine_runs_its_bootstrap_on_its_own_loopback(make_driver):
    driver = make_driver(jailed=True)
    machine = await driver.create(MachineSpec(runtime="provided"))
    assert machine.image.name.startswith("provided-") and images.parse_image_name(machine.image).runtime == "provided"
    replies = await init_and_call(machine, [{"n": 1}, {"n": 2}, "fail"])
    (first, one), (second, two), (failed, _) = replies
    assert first["type"] == second["type"] == "result", (first, second)
    one, two = json.loads(one), json.loads(two)
    assert (one["echo"], two["echo"]) == ({"n": 1}, {"n": 2})
    assert one["pid"] == two["pid"]  # the bootstrap started once, at init; the hot call reused it
    assert one["api"] == RUNTIME_API  # the port Lambda's is: the guest's loopback is its own
    assert one["netns"] != os.readlink("/proc/self/ns/net")
    assert failed["type"] == "error" and failed["error"]["type"] == "Shell.Failed", failed
    assert machine.uses == 3 and await machine.ping()
    await machine.stop()


async def test_machines_side_by_side_each_serve_127_0_0_1_9001(make_driver):
    driver = make_driver(jailed=False)
    machines = await asyncio.gather(*(driver.create(MachineSpec(runtime="provided")) for _ in range(2)))
    answers = await asyncio.gather(*(init_and_call(m, [{"n": i}]) for i, m in enumerate(machines)))
    outputs = []
    for [(reply, blob)] in answers:
        assert reply["type"] == "result", reply
        outputs.append(json.loads(blob))
    assert [o["echo"] for o in outputs] == [{"n": 0}, {"n": 1}]
    assert {o["api"] for o in outputs} == {RUNTIME_API}
    assert len({o["netns"] for o in outputs}) == 2
    await driver.close()


async def test_init_errors_come_back_through_the_driver(make_driver):
    driver = make_driver(jailed=False)
    machine = await driver.create(MachineSpec(runtime="provided"))
    reply, _ = await machine.request(init_header(), INIT_ERROR_BOOTSTRAP.encode(), timeout=WAIT_S)
    assert reply["type"] == "error" and reply["error"]["type"] == "Config.Missing", reply
    assert reply["error"]["message"] == "no configuration"
    await driver.close()


async def test_a_restored_provided_machine_loads_its_bootstrap(make_driver):
    driver = make_driver(jailed=True, snapshots=True)
    booted = await driver.create(MachineSpec(runtime="provided"))
    restored = await driver.create(MachineSpec(runtime="provided"))
    assert not booted.restored and restored.restored
    for machine in (booted, restored):
        [(reply, blob)] = await init_and_call(machine, [{"n": 5}])
        assert reply["type"] == "result" and json.loads(blob)["echo"] == {"n": 5}, reply
    await driver.close()


def test_a_node_serves_a_provided_function_on_firecracker(make_node, image_home, short_dir):
    from standin import install

    _need_host_userland()
    installed = install(short_dir)
    kernel = short_dir / "vmlinux-standin"
    kernel.write_bytes(b"\x7fELF stand-in kernel: never booted")
    database = f"sqlite:///{short_dir / 'nimbus.db'}"
    with make_node(image_home, database, driver="firecracker", firecracker_bin=installed.firecracker,
                   jailer="off", kernel=kernel, runtimes=["provided"]) as running, running.client() as api:
        created = api.post("/api/v1/functions", json={"name": "fc-custom", "runtime": "provided.al2023",
                                                      "code": SH_BOOTSTRAP, "handler": "function.handler"})
        assert created.status_code == 201, created.text
        bodies = [api.post("/api/v1/functions/fc-custom/invoke", json={"n": n}).json() for n in range(2)]
        for n, body in enumerate(bodies):
            assert body["status"] == "succeeded" and body["output"]["echo"] == {"n": n}, body
        assert bodies[1]["start"] == "hot" and bodies[0]["output"]["pid"] == bodies[1]["output"]["pid"]
        failed = api.post("/api/v1/functions/fc-custom/invoke", json="fail").json()
        assert failed["status"] == "failed" and failed["error"]["type"] == "Shell.Failed", failed
        assert running.node.driver.name == "firecracker"


# ---------------------------------------------------------------- on a KVM host, for real


@pytest.mark.skipif(os.environ.get("NIMBUS_TEST_KVM") != "1",
                    reason="needs a KVM host that boots Firecracker guests, the firecracker and jailer binaries, a "
                           "guest kernel and a provided image (set NIMBUS_TEST_KVM=1 there); this host has a PVM "
                           "nested /dev/kvm and no firecracker binary")
async def test_kvm_boots_a_provided_vm_and_runs_the_tutorial_bootstrap():
    driver = FirecrackerDriver(Path(os.environ.get("NIMBUS_HOME", ".nimbus")), FirecrackerConfig())
    problems = driver.problems(["provided"])
    assert not problems, problems
    try:
        machine = await driver.create(MachineSpec(runtime="provided"))
        replies = await init_and_call(machine, [{"n": 1}, {"n": 2}], code=TUTORIAL_BOOTSTRAP.encode())
        outputs = [json.loads(blob) for _, blob in replies]
        assert [o["echo"] for o in outputs] == [{"n": 1}, {"n": 2}] and outputs[0]["pid"] == outputs[1]["pid"]
        assert outputs[0]["api"] == RUNTIME_API
    finally:
        await driver.close()
