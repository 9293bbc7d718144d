"""Every kind of bwrap machine has a loopback of its own, up: the `provided` runtime's Runtime API needs it.

A custom runtime's bootstrap talks to the agent on 127.0.0.1:9001 inside its machine. bwrap's own
``--unshare-net`` brings ``lo`` up; a machine forked from a runtime template, or from a function
template, makes its network namespace itself and must bring ``lo`` up too. Each machine kind must let
a function bind 127.0.0.1:9001 and talk to itself there, and no machine may reach another's loopback.
"""

import logging
import uuid

import pytest
from test_bwrap import assert_quiet
from test_templates import call

from nimbus.machines import bwrap
from nimbus.machines.base import MachineSpec

pytestmark = pytest.mark.sandbox

LONG = 60.0
PORT = 9001

# "serve": bind 127.0.0.1:9001 (kept open between calls), then connect to it and echo a token through
# the accepted connection; "probe": only try to connect, as a neighbour would.
LOOPBACK_PY = r'''
import fcntl, socket, struct

PORT = 9001

held = []

def _lo_flags():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)))[1]

def handler(event, context=None):
    found = {"lo_flags": _lo_flags()}
    if event["what"] == "serve":
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", PORT))
        server.listen()
        held.append(server)
        client = socket.create_connection(("127.0.0.1", PORT), timeout=5)
        conn, _ = server.accept()
        client.sendall(event["token"].encode())
        found["echo"] = conn.recv(100).decode()
        conn.close()
        client.close()
        return found
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", PORT))
        found["reached"] = True
    except OSError as exc:
        found["reached"] = exc.strerror
    finally:
        s.close()
    return found
'''

HEADER = {"type": "init", "runtime": "python3", "handler": "main.handler", "filename": "main.py", "env": {},
          "memory_mb": 128, "timeout_s": 30, "function_name": "t", "function_version": "1"}


@pytest.fixture(params=["booted", "template"])
async def driver(request, tmp_path, caplog):
    d = bwrap.BwrapDriver(tmp_path / "home", use_templates=request.param == "template")
    if request.param == "template" and not d.templates_on:
        await d.close()
        pytest.skip(f"no template machines here: {d.templates_note}")
    caplog.set_level(logging.WARNING)
    try:
        yield d
    finally:
        await d.close()
    assert_quiet(caplog)


async def loaded(driver, forkable: bool = False):
    machine = await driver.create(MachineSpec(runtime="python3"), forkable=forkable)
    reply, _ = await machine.request(dict(HEADER), LOOPBACK_PY.encode(), timeout=LONG)
    assert reply["type"] == "init_ok", reply
    return machine


async def assert_own_loopback(a, b) -> None:
    """``a`` and ``b`` each serve on their own 127.0.0.1:9001; a third look from each reaches only itself."""
    for machine in (a, b):
        token = uuid.uuid4().hex
        found = await call(machine, {"what": "serve", "token": token})
        assert found["lo_flags"] & 1, found  # IFF_UP
        assert found["echo"] == token, found
    assert (await call(a, {"what": "probe"}))["reached"] is True


async def test_booted_and_template_machines_have_their_own_loopback(driver):
    a, b = await loaded(driver), await loaded(driver)
    try:
        if driver.templates_on:
            assert type(a).__name__ == type(b).__name__ == "TemplateMachine"
        # Both bind the same port: had they shared a namespace, the second bind would fail.
        await assert_own_loopback(a, b)
    finally:
        await a.kill()
        await b.kill()


async def test_a_machine_does_not_reach_another_machines_loopback(driver):
    a, b = await loaded(driver), await loaded(driver)
    try:
        await call(a, {"what": "serve", "token": "x"})
        found = await call(b, {"what": "probe"})
        assert found["lo_flags"] & 1 and found["reached"] == "Connection refused", found
    finally:
        await a.kill()
        await b.kill()


async def test_function_template_forks_have_their_own_loopback(tmp_path, caplog):
    d = bwrap.BwrapDriver(tmp_path / "home")
    if not d.snapshots_on:
        await d.close()
        pytest.skip(f"no function templates here: {d.snapshots_note}")
    caplog.set_level(logging.WARNING)
    try:
        template = await d.snapshot(await loaded(d, forkable=True))
        a, b = await template.fork(), await template.fork()
        await assert_own_loopback(a, b)
        found = await call(b, {"what": "probe"})
        assert found["reached"] is True  # its own server, from the call before
        c = await template.fork()
        assert (await call(c, {"what": "probe"}))["reached"] == "Connection refused"
    finally:
        await d.close()
    assert_quiet(caplog)


# What a provided machine's bootstrap may count on, run from a shell as a bootstrap would be: /bin/sh,
# coreutils and curl from the host's read-only /usr, the node's python3, and curl reaching a server on
# the machine's own loopback (the Runtime API's place).
TOOLS_PY = r'''
import http.server, os, subprocess, threading

def handler(event, context=None):
    server = http.server.HTTPServer(("127.0.0.1", 9001), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = ("set -e; cat --version | head -n 1; /opt/nimbus/bin/python3 -c 'print(6 * 7)';"
              "curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:9001/; echo; touch /usr/x 2>&1 || true")
    try:
        run = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=20,
                             env={"PATH": os.environ["PATH"]})
    finally:
        server.shutdown()
        server.server_close()
    return {"status": run.returncode, "out": run.stdout.splitlines(), "err": run.stderr}
'''


async def test_provided_machines_have_a_shell_curl_and_python(driver):
    machine = await driver.create(MachineSpec(runtime="provided"))
    try:
        reply, _ = await machine.request(dict(HEADER), TOOLS_PY.encode(), timeout=LONG)
        assert reply["type"] == "init_ok", reply
        found = await call(machine, {})
        assert found["status"] == 0, found
        version, answer, status, readonly = found["out"]
        assert "coreutils" in version and answer == "42" and status == "200", found
        assert "Read-only file system" in readonly, found
    finally:
        await machine.kill()
