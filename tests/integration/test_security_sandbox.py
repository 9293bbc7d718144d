"""Regression tests for the sandbox findings of the security review (issue 15): 6, 8, 9 and 12 (a)-(e).

Real nodes over HTTP and real bwrap machines (templates and booted), as in ``test_adversarial`` and
``test_bwrap``; each test is named after the finding it guards.
"""

import asyncio
import os
import socket
import uuid

import pytest
from test_adversarial import call, hostile, normal_call_works
from test_api import assert_problem, deploy, invoke
from test_bwrap import HELLO_PY, LONG, assert_new_machine_works, driver, init_header, load, run_once  # noqa: F401
from test_bwrap import call as machine_call

import nimbus
from nimbus import protocol
from nimbus.machines import bwrap, layout
from nimbus.machines.base import MachineSpec

pytestmark = pytest.mark.sandbox

MiB = 1 << 20
NESTING_MAX = 512  # protocol.NESTING_MAX, which the gateway and the agent share


def nested(depth: int) -> str:
    """A JSON array nested ``depth`` deep: 2 bytes a level."""
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------- finding 6: a forged, oversized reply frame

FORGE = """
fd = int(sys.argv[sys.argv.index("--fd") + 1])
frame = sys._getframe()
while frame.f_code.co_name != "on_exec":  # the agent's frame holds the request id the host waits for
    frame = frame.f_back
head = json.dumps({{"type": "result", "id": frame.f_locals["header"]["id"], "duration_ms": 1, "logs": "",
                   "logs_truncated": False}}).encode()
os.write(fd, len(head).to_bytes(4, "big") + (60 << 20).to_bytes(4, "big") + head)
sent, chunk = 0, b"z" * (1 << 20)
try:
    while sent < ({send_mib} << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
        sent += 1 << 20
except OSError:
    pass
time.sleep(120)  # the rest of the 60 MiB never comes: a host that waits for it times the call out
"""


@pytest.mark.parametrize("send_mib", [7, 60])
def test_f6_forged_60_mib_frame_is_refused_from_its_prefix(api, send_mib):
    """The host refuses the frame on its announced size: it never waits for (or holds) more than the limit.

    With 7 MiB sent (over the 6 MiB result limit, far under the 60 announced) a host that reads the body
    first would wait for the rest until the call times out; here it must fail at once, as a violation.
    """
    fn = deploy(api, hostile(FORGE.format(send_mib=send_mib)), memory_mb=256, timeout_s=20)
    result = call(api, fn["name"])
    assert result["status"] == "failed", result
    assert result["error"]["type"] == "ProtocolViolation", result
    assert str(60 << 20) in result["error"]["message"], result
    assert result["output"] is None
    normal_call_works(api, fn["name"])


async def test_f6_init_and_ping_replies_may_carry_no_blob(driver):
    """A reply to Init may not carry a body at all: a function's top level that forges one is refused at once."""
    source = """
import json, os, sys, time
fd = int(sys.argv[sys.argv.index("--fd") + 1])
frame = sys._getframe()
while frame.f_code.co_name != "on_init":
    frame = frame.f_back
head = json.dumps({"type": "init_ok", "id": frame.f_locals["header"]["id"]}).encode()
os.write(fd, len(head).to_bytes(4, "big") + (1 << 20).to_bytes(4, "big") + head)
time.sleep(120)

def handler(event, context=None):
    return 1
"""
    machine = await driver.create(MachineSpec(runtime="python3"))
    try:
        with pytest.raises(protocol.ProtocolError, match="1048576"):
            await machine.request(init_header(), source.encode(), timeout=LONG)
        assert not machine.alive
    finally:
        await machine.kill()
    await assert_new_machine_works(driver)


async def test_f6_reply_bodies_share_a_node_wide_byte_budget(tmp_path):
    """Reads of reply bodies take their size from the driver's budget; one over the rest waits for it."""
    from nimbus.machines import channel as frames

    budget = frames.ReplyBudget(frames.REPLY_MAX)
    assert budget.total == frames.REPLY_MAX
    assert frames.ReplyBudget(1).total == frames.REPLY_MAX  # never less than one largest reply
    d = bwrap.BwrapDriver(tmp_path / "home", use_templates=False, reply_buffer_bytes=frames.REPLY_MAX)
    try:
        assert d.reply_budget.total == frames.REPLY_MAX
        machine = await d.create(MachineSpec(runtime="python3"))
        try:
            await load(machine, "def handler(event, context=None):\n    return 'x' * (5 << 20)\n")
            await d.reply_budget.acquire(frames.REPLY_MAX - MiB)  # another machine's reply, in flight
            reply = asyncio.ensure_future(machine_call(machine, {}))
            for _ in range(200):  # the reply is read only once the budget has room for it
                await asyncio.sleep(0.01)
                assert not reply.done()
            d.reply_budget.release(frames.REPLY_MAX - MiB)
            header, output = await reply
            assert header["type"] == "result" and len(output) == 5 << 20
            assert d.reply_budget.used == 0
        finally:
            await machine.kill()
    finally:
        await d.close()


# ---------------------------------------------------------------- finding 8: deeply nested events and results


def test_f8_deep_event_is_refused_at_every_entrance(api):
    fn = deploy(api, "def handler(event, context):\n    return 'ok'\n")
    deep = nested(NESTING_MAX + 1)
    for path, headers in ((f"/api/v1/functions/{fn['name']}/invoke", {}),
                          (f"/api/v1/functions/{fn['name']}/invoke", {"Idempotency-Key": uuid.uuid4().hex}),
                          (f"/api/v1/functions/{fn['name']}/async", {})):
        resp = api.post(path, content=deep, headers={"Content-Type": "application/json", **headers})
        assert_problem(resp, 422, "nested", str(NESTING_MAX))
    at_limit = api.post(f"/api/v1/functions/{fn['name']}/invoke", content=nested(NESTING_MAX),
                        headers={"Content-Type": "application/json"})
    assert at_limit.status_code == 200 and at_limit.json()["status"] == "succeeded", at_limit.text
    # Brackets inside strings are not nesting.
    assert invoke(api, fn["name"], {"s": "[" * 5000})["status"] == "succeeded"
    assert protocol.NESTING_MAX == NESTING_MAX


@pytest.mark.parametrize("runtime", ["python3", "nodejs"])
async def test_f8_deep_event_is_refused_and_machine_lives(driver, runtime):
    """An event past the gateway's check (a bug, another door) is an InvalidEvent; the machine serves on."""
    source = HELLO_PY if runtime == "python3" else "exports.handler = async (event) => ({ answer: event.n * 2 });\n"
    machine = await driver.create(MachineSpec(runtime=runtime))
    try:
        header, _ = await machine.request(init_header(runtime), source.encode(), timeout=LONG)
        assert header["type"] == "init_ok", header
        for depth in (NESTING_MAX + 1, 100_000):
            exec_header = {"type": "exec", "invocation_id": "deep", "deadline_ms": int(LONG * 1000)}
            header, _ = await machine.request(exec_header, nested(depth).encode(), timeout=LONG)
            assert header["type"] == "error" and header["error"]["type"] == "InvalidEvent", header
            assert not header["fatal"], header
        header, output = await machine_call(machine, {"n": 21})
        assert (header["type"], output["answer"]) == ("result", 42), header
        assert machine.alive
    finally:
        await machine.kill()


@pytest.mark.parametrize("runtime", ["python3", "nodejs"])
def test_f8_deeply_nested_result_fails_cleanly(api, runtime):
    if runtime == "python3":
        code = ("def handler(event, context):\n    if event.get('normal'):\n        return 'fine'\n"
                "    value = []\n    for _ in range(100000):\n        value = [value]\n    return value\n")
    else:
        code = ("exports.handler = async (event) => {\n  if (event.normal) return 'fine';\n"
                "  let value = [];\n  for (let i = 0; i < 100000; i++) value = [value];\n  return value;\n};\n")
    fn = deploy(api, code, runtime=runtime)
    result = call(api, fn["name"])
    assert result["status"] == "failed" and result["output"] is None, result
    again = invoke(api, fn["name"], {"normal": True})
    assert again["status"] == "succeeded" and again["output"] == "fine", again


# ---------------------------------------------------------------- finding 9: a host uid per machine

UID_PY = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
HELD = []

def handler(event, context=None):
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    if event.get("hoard"):
        while True:
            fd = libc.inotify_init()
            if fd < 0:
                break
            HELD.append(fd)
        return {"held": len(HELD), "errno": ctypes.get_errno()}
    fd = libc.inotify_init()
    err = ctypes.get_errno()
    if fd >= 0:
        os.close(fd)
    import pwd
    return {"uid": status["Uid"].split(), "gid": status["Gid"].split(), "inotify": "ok" if fd >= 0 else err,
            "name": pwd.getpwuid(os.getuid()).pw_name, "owner": [os.stat(p).st_uid for p in ("/tmp", "/dev/shm")]}
"""


async def test_f9_machines_get_their_own_host_uid(driver):
    if not driver.privileged:
        pytest.skip("an unprivileged node maps every machine to its own single host uid")
    machines = [await driver.create(MachineSpec(runtime="python3")) for _ in range(2)]
    try:
        outputs = []
        for machine in machines:
            await load(machine, UID_PY)
            header, output = await machine_call(machine, {})
            assert header["type"] == "result", header
            outputs.append(output)
        uids = [int(out["uid"][0]) for out in outputs]
        assert uids[0] != uids[1], outputs
        for out, uid in zip(outputs, uids, strict=True):
            assert out["uid"] == [str(uid)] * 4 and out["gid"] == [str(uid)] * 4, out
            assert driver.uid_range.start <= uid < driver.uid_range.stop
            assert out["owner"] == [uid, uid], out  # its own tmpfs dirs
            assert out["name"] == "sandbox", out
        # The host sees the same: the agent processes of the two machines run as two host uids.
        host_uids = set()
        for machine in machines:
            for pid in machine._cgroup.pids() if machine._cgroup is not None else ():
                with open(f"/proc/{pid}/status") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
                host_uids.add(int(uid_line.split()[1]))
        assert set(uids) <= host_uids
    finally:
        for machine in machines:
            await machine.kill()
    # Ended machines give their uid back.
    assert not (set(uids) & driver.uids_in_use)


async def test_f9_one_function_exhausting_inotify_does_not_starve_another(driver):
    if not driver.privileged:
        pytest.skip("an unprivileged node maps every machine to its own single host uid")
    hog, victim = [await driver.create(MachineSpec(runtime="python3")) for _ in range(2)]
    try:
        await load(hog, UID_PY)
        await load(victim, UID_PY)
        header, output = await machine_call(hog, {"hoard": True})
        assert header["type"] == "result" and output["errno"] == 24, output  # EMFILE: its own uid's limit
        header, output = await machine_call(victim, {})
        assert header["type"] == "result" and output["inotify"] == "ok", output
    finally:
        await hog.kill()
        await victim.kill()


async def test_f9_the_uid_range_must_not_collide(tmp_path):
    with pytest.raises(Exception, match="uid"):
        bwrap.BwrapDriver(tmp_path / "home", uid_base=0, uid_count=10)


# ---------------------------------------------------------------- finding 12: smaller ones

PROBE_12 = r"""
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)

def sock(family, kind=socket.SOCK_STREAM, proto=0):
    try:
        socket.socket(family, kind, proto).close()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def personality(value):
    ctypes.set_errno(0)
    r = libc.personality(ctypes.c_ulong(value))
    return "ok" if r != -1 else errno.errorcode[ctypes.get_errno()]

def handler(event, context=None):
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    try:
        config = len(open("/proc/config.gz", "rb").read())
    except OSError as exc:
        config = errno.errorcode[exc.errno]
    pair = socket.socketpair()
    pair[0].close(); pair[1].close()
    return {
        "vsock": sock(40), "packet": sock(17, socket.SOCK_RAW), "alg": sock(38, socket.SOCK_SEQPACKET),
        "netlink_route": sock(16, socket.SOCK_RAW, 0), "netlink_audit": sock(16, socket.SOCK_RAW, 9),
        "unix": sock(socket.AF_UNIX), "inet": sock(socket.AF_INET), "inet6": sock(socket.AF_INET6),
        "personality_query": personality(0xFFFFFFFF), "personality_set": personality(0x0040000),
        "caps": {name: status[name].strip() for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "config_gz": config, "mountinfo": open("/proc/self/mountinfo").read(),
        "cmdline1": open("/proc/1/cmdline", "rb").read().decode(errors="replace"),
        "cmdline": open("/proc/self/cmdline", "rb").read().decode(errors="replace"),
    }
"""


@pytest.fixture
async def probe12(driver):
    header, output = await run_once(driver, PROBE_12, {})
    assert header["type"] == "result", header
    return output


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="socket family numbers are checked on x86_64")
async def test_f12a_only_unix_inet_and_route_netlink_sockets(probe12):
    out = probe12
    assert (out["vsock"], out["packet"], out["alg"], out["netlink_audit"]) == ("EAFNOSUPPORT",) * 4, out
    assert (out["unix"], out["inet"], out["inet6"], out["netlink_route"]) == ("ok",) * 4, out


async def test_f12b_personality_may_only_be_queried(probe12):
    assert probe12["personality_query"] == "ok"
    assert probe12["personality_set"] == "EPERM"  # ADDR_NO_RANDOMIZE: no turning ASLR off for children


async def test_f12c_proc_shows_no_host_paths_or_kernel_config(probe12, driver):
    out = probe12
    if os.path.exists("/proc/config.gz"):  # /dev/null on a nodev mount: nothing to read either way
        assert out["config_gz"] in (0, "EACCES"), out["config_gz"]
    home = str(driver.home)
    assert home not in out["mountinfo"], out["mountinfo"]  # the /etc files are copied in, not bound
    nimbus_src = os.path.dirname(nimbus.__file__)
    python = str(layout.base_python()[0])
    for name in ("cmdline1", "cmdline"):  # pid 1's (bwrap's own, or a template child's) and the agent's
        for host_path in (home, nimbus_src, python, "--ro-bind"):
            assert host_path not in out[name], (name, host_path, out[name])


async def test_f12e_no_capabilities_in_any_set(probe12):
    assert probe12["caps"] == {name: "0000000000000000" for name in probe12["caps"]}, probe12["caps"]


def test_f12e_nodejs_children_have_no_capabilities_either(api):
    fn = deploy(api, "const fs = require('fs');\nexports.handler = async () => fs.readFileSync('/proc/self/status', "
                     "'utf8').split('\\n').filter(l => l.startsWith('Cap')).map(l => l.split(/\\s+/)[1]);\n",
                runtime="nodejs")
    result = invoke(api, fn["name"])
    assert result["status"] == "succeeded" and set(result["output"]) == {"0000000000000000"}, result


# ---------------------------------------------------------------- finding 12 (d): slow HTTP clients


@pytest.fixture
def slow_node(tmp_path):
    """A node served as ``nimbus up`` serves it, with short client deadlines."""
    import threading
    import time

    import uvicorn

    from nimbus.app import create_app, server_config
    from nimbus.config import Settings

    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'n.db'}", port=0, min_warm=0,
                        header_timeout_s=1.0, body_timeout_s=1.0)
    server = uvicorn.Server(server_config(create_app(settings), settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    thread.join(60)


def _read_until_closed(conn: socket.socket) -> bytes:
    conn.settimeout(60)  # a bound for a broken test, not a threshold: the node must close far sooner
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("stall", ["headers", "body"])
def test_f12d_a_stalled_client_is_cut_off(slow_node, stall):
    with socket.create_connection(("127.0.0.1", slow_node)) as conn:
        if stall == "headers":
            conn.sendall(b"POST /api/v1/functions/x/invoke HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
        else:
            conn.sendall(b"POST /api/v1/functions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 1000\r\n\r\n{\"a\":")  # 995 bytes never come
        answer = _read_until_closed(conn)
    assert answer.startswith(b"HTTP/1.1 408") and stall.encode() in answer, answer
    # The node still serves.
    with socket.create_connection(("127.0.0.1", slow_node)) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_until_closed(conn).startswith(b"HTTP/1.1 200"), "the node stopped answering"
