"""Template machines: children of one per-runtime template are as isolated from each other as booted ones.

Two machines forked from the same template must not see each other's processes, files, shared memory,
abstract sockets or loopback, must not signal each other, must each be counted in a cgroup of their own,
and must not keep the template's control socket or privileges. The template itself must survive a child
that dies, and take its children with it when it goes.
"""

import asyncio
import errno
import json
import logging
import os
import signal
import uuid
from pathlib import Path

import pytest
from test_bwrap import assert_quiet

from nimbus.machines import bwrap
from nimbus.machines.base import MachineSpec

pytestmark = pytest.mark.sandbox

LONG = 60.0

# One function per machine that keeps state between calls, so a test can plant something in one
# machine and look for it from the other.
NEIGHBOUR_PY = r'''
import ctypes, os, socket, errno

libc = ctypes.CDLL(None, use_errno=True)
held = []

def _status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return {k: fields[k].strip() for k in ("CapEff", "CapPrm", "NoNewPrivs", "Seccomp", "NSpid")}

def handler(event, context=None):
    what = event["what"]
    if what == "plant":
        for path in ("/tmp/planted", "/dev/shm/planted"):
            with open(path, "w") as f:
                f.write(event["secret"])
        try:
            open("/var/task/planted", "w")
            task_write = 0
        except OSError as exc:  # the init made the task directory read-only before this code loaded
            task_write = exc.errno
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind("\0nimbus-neighbour")
        server.listen()
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 7777))
        tcp.listen()
        held.extend([server, tcp])
        shm = libc.shmget(0x4e494d42, 4096, 0o1666)  # IPC_CREAT | 0666
        held.extend(os.openpty())
        return {"shm": shm, "pid": os.getpid(), "pts": sorted(os.listdir("/dev/pts")), "task_write": task_write}
    if what == "look":
        found = {}
        for path in ("/tmp/planted", "/dev/shm/planted", "/var/task/planted"):
            found[path] = os.path.exists(path)
        for name, family, address in (("abstract", socket.AF_UNIX, "\0nimbus-neighbour"),
                                      ("tcp", socket.AF_INET, ("127.0.0.1", 7777))):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(address)
                found[name] = True
            except OSError:
                found[name] = False
            finally:
                s.close()
        found["shm"] = libc.shmget(0x4e494d42, 0, 0) != -1
        found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        found["pts"] = sorted(os.listdir("/dev/pts"))
        signalled = {}
        for pid in event.get("signal", []):
            try:
                os.kill(pid, 0)
                signalled[pid] = "reachable"
            except OSError as exc:
                signalled[pid] = errno.errorcode[exc.errno]
        found["signal"] = signalled
        return found
    if what == "whoami":
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        unshare = libc.unshare(0x10000000)  # CLONE_NEWUSER: the seccomp filter must refuse it
        return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "status": _status(),
                "fds": fds, "unshare": [unshare, ctypes.get_errno()], "argv_fd": __import__("sys").argv,
                "cgroup": open("/proc/self/cgroup").read(), "env": dict(os.environ)}
    raise ValueError(what)
'''


@pytest.fixture
async def driver(tmp_path, caplog):
    d = bwrap.BwrapDriver(tmp_path / "home")
    if not d.templates_on:
        await d.close()
        pytest.skip(f"no template machines here: {d.templates_note}")
    caplog.set_level(logging.WARNING)
    try:
        yield d
    finally:
        await d.close()
    assert_quiet(caplog)


async def machine_with(driver, source: str = NEIGHBOUR_PY, memory_mb: int = 128):
    machine = await driver.create(MachineSpec(runtime="python3", memory_mb=memory_mb))
    header = {"type": "init", "runtime": "python3", "handler": "main.handler", "filename": "main.py", "env": {},
              "memory_mb": memory_mb, "timeout_s": 30, "function_name": "t", "function_version": "1"}
    reply, _ = await machine.request(header, source.encode(), timeout=LONG)
    assert reply["type"] == "init_ok", reply
    return machine


async def call(machine, event) -> dict:
    header = {"type": "exec", "invocation_id": uuid.uuid4().hex, "deadline_ms": int(LONG * 1000)}
    reply, blob = await machine.request(header, json.dumps(event).encode(), timeout=LONG)
    assert reply["type"] == "result", reply
    return json.loads(blob)


async def test_machines_are_forked_from_one_template_per_runtime(driver):
    a = await driver.create(MachineSpec(runtime="python3"))
    b = await driver.create(MachineSpec(runtime="python3"))
    assert type(a).__name__ == type(b).__name__ == "TemplateMachine"
    assert a.template is b.template and a.template.alive
    assert list(driver.templates) == ["python3"]
    assert a.pid != b.pid and a.pid != a.template.pid
    # Each machine's first process is a child of the template's, not of the node.
    ppid = int(Path(f"/proc/{a.pid}/status").read_text().split("PPid:")[1].split()[0])
    assert ppid not in (os.getpid(), a.pid)
    await asyncio.gather(a.stop(), b.stop())


async def test_two_children_of_one_template_cannot_see_each_other(driver):
    a = await machine_with(driver)
    b = await machine_with(driver)
    assert a.template is b.template
    planted = await call(a, {"what": "plant", "secret": "only-a"})
    assert planted["shm"] != -1  # the segment exists in a's IPC namespace

    own = await call(a, {"what": "look"})  # the control: a sees what it planted
    assert own["/tmp/planted"] and own["/dev/shm/planted"]
    assert planted["task_write"] == errno.EROFS and not own["/var/task/planted"]
    assert own["abstract"] and own["tcp"] and own["shm"]

    host_pids = [a.pid, a.template.pid, os.getpid()]
    seen = await call(b, {"what": "look", "signal": [planted["pid"], *host_pids]})
    assert not any(seen[p] for p in ("/tmp/planted", "/dev/shm/planted", "/var/task/planted")), seen
    assert not seen["abstract"] and not seen["tcp"] and not seen["shm"], seen
    assert "0" in planted["pts"] and seen["pts"] == ["ptmx"], (planted["pts"], seen["pts"])  # a's pty
    # b's pid namespace holds b's init and agent, nothing of a's, the template's or the host's.
    assert seen["pids"] == [1, 2], seen["pids"]
    assert all(result == "ESRCH" for pid, result in seen["signal"].items() if int(pid) != planted["pid"]), seen
    # a's agent has the same pid number inside its own namespace as b's: that pid is b's own agent.
    assert planted["pid"] == 2
    await asyncio.gather(a.stop(), b.stop())


async def test_a_child_keeps_no_privilege_and_no_descriptor_of_the_template(driver):
    machine = await machine_with(driver)
    me = await call(machine, {"what": "whoami"})
    assert (me["uid"], me["gid"], me["groups"]) == (machine.uid, machine.uid, [])  # its own host uid
    assert machine.uid in driver.uid_range
    status = me["status"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    assert status["NSpid"] == "2"  # the agent, under its own init
    assert me["unshare"] == [-1, 1], me["unshare"]  # EPERM from the filter
    sockets = [target for target in me["fds"].values() if target.startswith("socket:")]
    assert len(sockets) == 1, me["fds"]  # the channel to the host; not the template's control socket
    # The descriptors a booted agent has, at the same numbers: stdin, the log pipe on 1 and 2, the
    # agent's copy of its stderr on 3 (functions may close it), the log pipe's read end, the channel.
    assert me["fds"]["0"] == "/dev/null" and me["fds"]["1"] == me["fds"]["2"] == me["fds"]["4"], me["fds"]
    assert len(me["fds"]) == 6 and me["fds"]["3"].startswith("pipe:"), me["fds"]
    assert me["argv_fd"][1] == "--fd" and "--control" not in me["argv_fd"]
    lambdas = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "AWS_XRAY_CONTEXT_MISSING", "TZ", "_HANDLER",
               "_X_AMZN_TRACE_ID")
    env = {k: v for k, v in me["env"].items()
           if not k.startswith(("AWS_LAMBDA_", "LAMBDA_", "NIMBUS_")) and k not in lambdas}
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}, me["env"]
    # Its cgroup namespace is rooted at its own cgroup.
    assert all(line.endswith(":/") for line in me["cgroup"].split()), me["cgroup"]
    await machine.stop()


async def test_each_child_is_counted_in_its_own_cgroup(driver):
    a = await machine_with(driver)
    b = await machine_with(driver)
    for machine in (a, b):
        pids = machine._cgroup.pids()
        assert machine.pid in pids and len(pids) == 3, pids  # the template's child, the init, the agent
        assert machine.template.pid not in pids
    assert not (a._cgroup.pids() & b._cgroup.pids())
    await asyncio.gather(a.stop(), b.stop())


async def test_a_child_over_its_memory_limit_dies_alone(driver):
    if "memory" not in driver.hierarchy.controllers:
        pytest.skip("no memory controller")
    hog = await machine_with(driver, "def handler(e, c=None):\n    x = [b'\\x01' * (1 << 20) for _ in range(512)]\n"
                                     "    return len(x)\n", memory_mb=64)
    neighbour = await machine_with(driver)
    header = {"type": "exec", "invocation_id": "hog", "deadline_ms": 60_000}
    try:
        reply, _ = await hog.request(header, b"{}", timeout=LONG)
        assert reply["type"] == "error" and reply["error"]["type"] in ("MemoryError", "RuntimeExit"), reply
    except Exception as exc:  # the kernel's OOM killer took the agent: a dead machine, said so
        assert "memory limit" in str(exc) or "killed" in str(exc), exc
    assert neighbour.template.alive
    assert (await call(neighbour, {"what": "look"}))["pids"] == [1, 2]
    await asyncio.gather(hog.kill(), neighbour.stop())


async def test_the_template_takes_its_children_with_it_and_is_started_again(driver, caplog):
    a = await machine_with(driver)
    old = a.template
    os.kill(old.pid, signal.SIGKILL)
    for _ in range(200):
        if not a.alive:
            break
        await asyncio.sleep(0.025)
    assert not a.alive and not old.alive
    for _ in range(200):  # the child's processes go with their pid namespace
        if not a._cgroup or not a._cgroup.pids():
            break
        await asyncio.sleep(0.025)
    assert not a._cgroup.pids()
    await a.kill()
    b = await machine_with(driver)
    assert b.template is not old and b.template.alive
    assert (await call(b, {"what": "look"}))["pids"] == [1, 2]
    await b.stop()
    assert [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.WARNING] == \
        ["the python3 template exited; starting another"]
    caplog.clear()


async def test_a_node_without_templates_boots_every_machine(tmp_path):
    d = bwrap.BwrapDriver(tmp_path / "home", use_templates=False)
    try:
        machine = await d.create(MachineSpec(runtime="python3"))
        assert type(machine) is bwrap.BwrapMachine and d.templates == {}
        assert d.templates_note == "disabled"
        await machine.stop()
    finally:
        await d.close()
