"""The bwrap driver against the real guest agent: lifecycle, functions in both runtimes, isolation, limits.

Every hostile case is followed by a new machine that works, to show the host (and the driver) came through.
"""

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from nimbus import machines
from nimbus.errors import MachineDied, MachineStartError, MachineTimeout, ProtocolError
from nimbus.machines import bwrap
from nimbus.machines.base import Driver, Machine, MachineSpec

pytestmark = pytest.mark.sandbox

LONG = 60.0  # request timeout for calls that should simply work (a shared 2-core machine can be slow)

HELLO_PY = "def handler(event, context=None):\n    return {'answer': event['n'] * 2}\n"
HELLO_JS = "exports.handler = async (event, context) => ({ answer: event.n * 2, node: process.version });\n"

# One probe function, told by its event what to try; it reports what happened instead of raising.
PROBE_PY = '''
import os, socket

def handler(event, context=None):
    what, arg = event["what"], event.get("arg")
    try:
        if what == "connect":
            socket.create_connection(("127.0.0.1", arg), timeout=3).close()
        elif what == "read":
            with open(arg, "rb") as f:
                f.read(1)
        elif what == "write":
            with open(arg, "w") as f:
                f.write("x")
        elif what == "listdir":
            return {"ok": True, "value": sorted(os.listdir(arg))}
        elif what == "exists":
            return {"ok": True, "value": os.path.exists(arg)}
        elif what == "openw":  # open for writing, write nothing: harmless even where it succeeds
            os.close(os.open(arg, os.O_WRONLY))
        elif what == "chmod":  # to the mode it already has: harmless even where it succeeds
            os.chmod(arg, os.stat(arg).st_mode & 0o7777)
        elif what == "whoami":
            status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
            return {"ok": True, "value": [os.getuid(), os.getgid(), os.getgroups(), socket.gethostname(),
                                          dict(os.environ), status["CapEff"].strip(), status["NoNewPrivs"].strip()]}
    except OSError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True}
'''

MEMORY_HOG_PY = '''
def handler(event, context=None):
    blocks = []
    for _ in range(event["mib"]):
        blocks.append(b"\\x01" * (1 << 20))  # touched, so it is really resident
    return len(blocks)
'''

FORK_BOMB_PY = '''
import os, time

def handler(event, context=None):
    made = 0
    while made < 100000:
        try:
            pid = os.fork()
        except OSError as exc:
            return {"made": made, "stopped_by": exc.strerror}
        if pid == 0:
            try:
                while True:  # every child forks on as well
                    try:
                        os.fork()
                    except OSError:
                        time.sleep(0.05)
            finally:
                os._exit(0)
        made += 1
    return {"made": made, "stopped_by": None}
'''

SLEEPER_PY = "import time\ndef handler(event, context=None):\n    time.sleep(event.get('s', 600))\n    return 'woke'\n"
SUICIDE_PY = "import os\ndef handler(event, context=None):\n    os.kill(os.getpid(), 9)\n"
GARBAGE_PY = '''
import os, struct, sys

def handler(event, context=None):
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    os.write(fd, struct.pack(">II", 0xFFFFFFFF, 0))  # a frame header no host may accept
    return "sent"
'''


# ---------------------------------------------------------------- helpers


def _bwrap_usable() -> str | None:
    """Why sandboxes cannot run here (no bwrap, no user namespaces), or None."""
    try:
        path = bwrap.find_bwrap()
    except MachineStartError as exc:
        return str(exc)
    done = subprocess.run([path, "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true"],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"bwrap cannot create a sandbox here: {done.stderr.strip()}"


_WHY_NOT = _bwrap_usable()
if _WHY_NOT:
    pytestmark = [pytest.mark.sandbox, pytest.mark.skip(reason=_WHY_NOT)]


@pytest.fixture(params=["template", "boot"])
async def driver(request, tmp_path, caplog):
    """Each test twice: machines forked from a template (where the host allows it), and booted ones."""
    d = bwrap.BwrapDriver(tmp_path / "home", use_templates=None if request.param == "template" else False)
    if request.param == "template" and not d.templates_on:
        await d.close()
        pytest.skip(f"no template machines here: {d.templates_note}")
    caplog.set_level(logging.WARNING)
    try:
        yield d
    finally:
        await d.close()
    assert_quiet(caplog)


@pytest.fixture
async def rlimit_driver(tmp_path, caplog):
    """A driver told not to use cgroups: the rlimit fallback a host without a writable cgroup tree gets."""
    d = bwrap.BwrapDriver(tmp_path / "home", use_cgroups=False)
    caplog.set_level(logging.WARNING)
    try:
        yield d
    finally:
        await d.close()
    assert_quiet(caplog)


def assert_quiet(caplog) -> None:
    """No warnings from asyncio (a child reaped behind its watcher) or from the driver (a cgroup left)."""
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    noisy = [r for r in records if r.levelno >= logging.WARNING and r.name.startswith(("asyncio", "nimbus"))]
    assert not noisy, [r.getMessage() for r in noisy]


def init_header(runtime: str = "python3", **overrides) -> dict:
    handler, filename = ("main.handler", "main.py") if runtime == "python3" else ("index.handler", "index.js")
    header = {"type": "init", "runtime": runtime, "handler": handler, "filename": filename, "env": {},
              "memory_mb": 128, "timeout_s": 5, "function_name": "t", "function_version": "1"}
    header.update(overrides)
    return header


async def load(machine: Machine, source: str, runtime: str = "python3") -> None:
    header, _ = await machine.request(init_header(runtime), source.encode(), timeout=LONG)
    assert header["type"] == "init_ok", header


async def call(machine: Machine, event, timeout: float = LONG) -> tuple[dict, object]:
    exec_header = {"type": "exec", "invocation_id": uuid.uuid4().hex, "deadline_ms": int(timeout * 1000)}
    header, blob = await machine.request(exec_header, json.dumps(event).encode(), timeout=timeout)
    return header, (json.loads(blob) if header["type"] == "result" else None)


async def run_once(driver, source: str, event, *, runtime: str = "python3", spec: MachineSpec | None = None):
    """One function, one call, in a machine of its own that is killed afterwards."""
    machine = await driver.create(spec or MachineSpec(runtime=runtime))
    try:
        await load(machine, source, runtime)
        return await call(machine, event)
    finally:
        await machine.kill()


async def probe(driver, what: str, arg=None):
    header, output = await run_once(driver, PROBE_PY, {"what": what, "arg": arg})
    assert header["type"] == "result", header
    return output


def assert_gone(driver, machine) -> None:
    """Nothing of the machine is left: no bwrap process, no cgroup directory, not owned by the driver."""
    assert not machine.alive
    assert machine not in driver.machines
    assert machine.pid is not None
    assert not Path(f"/proc/{machine.pid}").exists(), f"bwrap pid {machine.pid} is still there"
    if driver.hierarchy is not None:
        for base in driver.hierarchy.bases:
            assert not (base.path / machine.id).exists(), f"cgroup {base.path / machine.id} left behind"


async def assert_new_machine_works(driver) -> None:
    header, output = await run_once(driver, HELLO_PY, {"n": 21})
    assert header["type"] == "result", header
    assert output == {"answer": 42}


# ---------------------------------------------------------------- registry and lifecycle


async def test_registry_loads_the_bwrap_driver(tmp_path):
    d = machines.load_driver("bwrap", tmp_path)
    try:
        assert isinstance(d, bwrap.BwrapDriver) and isinstance(d, Driver) and d.name == "bwrap"
    finally:
        await d.close()
    with pytest.raises(ValueError, match="unknown machine driver"):
        machines.load_driver("qemu", tmp_path)


async def test_create_ping_stop_leaves_no_process_and_no_cgroup(driver):
    machine = await driver.create(MachineSpec(runtime="python3"))
    assert isinstance(machine, Machine)
    assert machine.alive and machine.uses == 0 and machine in driver.machines
    assert Path(f"/proc/{machine.pid}").exists()
    if driver.hierarchy is not None:
        for base in driver.hierarchy.bases:
            assert (base.path / machine.id).is_dir()
    assert await machine.ping()

    await machine.stop()
    assert_gone(driver, machine)
    assert not await machine.ping()
    await machine.stop()  # idempotent, in any order
    await machine.kill()
    with pytest.raises(MachineDied):
        await machine.request({"type": "ping"})


async def test_kill_is_immediate_and_idempotent(driver):
    machine = await driver.create(MachineSpec(runtime="python3"))
    await asyncio.gather(machine.kill(), machine.kill(), machine.stop())
    assert_gone(driver, machine)


def machine_cgroups(driver) -> set[Path]:
    if driver.hierarchy is None:
        return set()
    return {p.parent for base in driver.hierarchy.bases for p in base.path.glob("*/cgroup.procs")}


async def test_a_start_failure_says_why_and_leaves_nothing(driver, caplog):
    before = machine_cgroups(driver)
    driver.python = Path("/nonexistent/python3")
    with pytest.raises(MachineStartError, match="nonexistent"):
        await driver.create(MachineSpec(runtime="python3"))
    assert driver.machines == []
    assert machine_cgroups(driver) == before
    if driver.templates_on:  # the template could not start either: said once, then machines boot
        warned = [r.getMessage() for r in caplog.get_records("call") if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "template did not start" in warned[0] and "nonexistent" in warned[0], warned
        assert driver.templates == {}
        caplog.clear()


async def test_an_agent_that_does_not_answer_in_time_is_a_start_error(tmp_path):
    d = bwrap.BwrapDriver(tmp_path / "home", start_timeout_s=0.001)  # no sandbox boots in a millisecond
    before = machine_cgroups(d)
    try:
        with pytest.raises(MachineStartError, match="did not answer within"):
            await d.create(MachineSpec(runtime="python3"))
        assert d.machines == [] and machine_cgroups(d) == before
    finally:
        await d.close()


async def test_a_network_machine_is_refused(driver):
    with pytest.raises(MachineStartError, match="no network"):
        await driver.create(MachineSpec(runtime="python3", network=True))


# ---------------------------------------------------------------- functions


async def test_python_function(driver):
    machine = await driver.create(MachineSpec(runtime="python3"))
    try:
        await load(machine, HELLO_PY)
        for n in (1, 2, 3):
            header, output = await call(machine, {"n": n})
            assert header["type"] == "result", header
            assert output == {"answer": 2 * n}
        assert machine.uses == 3
        assert await machine.ping()
    finally:
        await machine.stop()
    assert_gone(driver, machine)


async def test_nodejs_function(driver):
    machine = await driver.create(MachineSpec(runtime="nodejs"))
    try:
        await load(machine, HELLO_JS, "nodejs")
        header, output = await call(machine, {"n": 21})
        assert header["type"] == "result", header
        assert output["answer"] == 42 and output["node"].startswith("v")
    finally:
        await machine.stop()
    assert_gone(driver, machine)


async def test_killing_a_busy_nodejs_machine_is_clean(driver):
    # node adds processes and threads; killing them all must still leave bwrap to asyncio to reap
    for _ in range(3):
        header, output = await run_once(driver, HELLO_JS, {"n": 1}, runtime="nodejs")
        assert header["type"] == "result" and output["answer"] == 2, header


async def test_function_error_comes_back_as_an_error_frame(driver):
    header, _ = await run_once(driver, "def handler(e, c=None):\n    raise ValueError('nope')\n", {})
    assert header["type"] == "error"
    assert header["error"]["type"] == "ValueError" and "nope" in header["error"]["message"]


async def test_sandbox_identity_and_environment(driver):
    uid, gid, groups, hostname, env, caps, no_new_privs = (await probe(driver, "whoami"))["value"]
    # On a root node each machine has a host uid of its own (security review, finding 9).
    assert uid in driver.uid_range if driver.privileged else uid == 65534
    expected = uid
    assert (uid, gid, groups, hostname) == (expected, expected, [], "nimbus")
    assert int(caps, 16) == 0 and no_new_privs == "1"
    assert "NIMBUS_HOME" not in env and "VIRTUAL_ENV" not in env
    assert env.get("PATH") == "/usr/local/bin:/usr/bin:/bin"


# ---------------------------------------------------------------- isolation


async def test_cannot_connect_to_a_port_the_host_listens_on(driver):
    connections = 0

    async def on_connect(reader, writer):
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        # The port is real: the host itself can reach it.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
        for _ in range(200):
            if connections:
                break
            await asyncio.sleep(0.05)
        reached_from_host = connections
        result = await probe(driver, "connect", port)
    finally:
        server.close()
        await server.wait_closed()
    assert reached_from_host == 1
    assert result["ok"] is False, result
    assert connections == reached_from_host
    await assert_new_machine_works(driver)


async def test_cannot_read_host_secrets_or_other_trees(driver):
    secret = driver.home / "secret.txt"
    secret.write_text("the node's own data")
    for path in ("/etc/shadow", str(secret), str(driver.home / "bwrap" / "etc" / "passwd"), __file__,
                 "/work", "/root/.bash_history"):
        result = await probe(driver, "read", path)
        assert result["ok"] is False, (path, result)
        assert (await probe(driver, "exists", path))["value"] is False, path
    # /root holds at most the path down to the base Python installation, bound read-only.
    entries = (await probe(driver, "listdir", "/root"))["value"]
    allowed = {Path(os.path.realpath(sys.base_prefix)).relative_to("/root").parts[0]} \
        if os.path.realpath(sys.base_prefix).startswith("/root/") else set()
    assert set(entries) <= allowed, entries
    await assert_new_machine_works(driver)


@pytest.mark.parametrize("path", ["/usr/nimbus-probe", "/nimbus-probe", "/etc/nimbus-probe",
                                  "/opt/nimbus/nimbus/protocol.py", "/etc/passwd", "/var/nimbus-probe"])
async def test_cannot_write_outside_tmp_and_the_task_dir(driver, path):
    result = await probe(driver, "write", path)
    assert result["ok"] is False, (path, result)
    await assert_new_machine_works(driver)


@pytest.mark.parametrize("what, path", [
    ("openw", "/proc/sys/kernel/core_pattern"),  # a host-wide sysctl: run as root, a way out
    ("openw", "/proc/sys/kernel/modprobe"),
    ("openw", "/proc/sys/vm/drop_caches"),
    ("openw", "/proc/sys/kernel/hostname"),
    ("chmod", "/dev/null"),  # the host's device node
    ("chmod", "/usr/bin/env"),
])
async def test_cannot_touch_host_kernel_settings_or_devices(driver, what, path):
    result = await probe(driver, what, path)
    assert result["ok"] is False, (path, result)


async def test_cannot_write_to_the_python_installation(driver):
    result = await probe(driver, "write", os.path.join(os.path.realpath(sys.base_prefix), "nimbus-probe"))
    assert result["ok"] is False, result


async def test_tmp_is_private_to_each_machine(driver):
    marker = f"/tmp/marker-{uuid.uuid4().hex}"
    first = await driver.create(MachineSpec(runtime="python3"))
    second = await driver.create(MachineSpec(runtime="python3"))
    try:
        await load(first, PROBE_PY)
        await load(second, PROBE_PY)
        assert (await call(first, {"what": "write", "arg": marker}))[1] == {"ok": True}
        assert (await call(first, {"what": "exists", "arg": marker}))[1]["value"] is True
        assert (await call(second, {"what": "exists", "arg": marker}))[1]["value"] is False
        assert not os.path.exists(marker)  # nor is it the host's /tmp
    finally:
        await first.kill()
        await second.kill()


# ---------------------------------------------------------------- limits and hostile functions


async def test_limits_are_written_to_the_machines_cgroup(driver):
    if driver.hierarchy is None:
        pytest.skip(f"no cgroups here: {driver.cgroup_note}")
    spec = MachineSpec(runtime="python3", memory_mb=96, vcpus=2, pids_max=40)
    machine = await driver.create(spec)
    try:
        seen = {}
        for base in driver.hierarchy.bases:
            directory = base.path / machine.id
            assert str(machine.pid) in (directory / "cgroup.procs").read_text().split()
            for name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max", "cpu.cfs_quota_us"):
                if (directory / name).exists():
                    seen[name] = (directory / name).read_text().split()
        if "memory" in driver.hierarchy.controllers:
            assert seen.get("memory.max", seen.get("memory.limit_in_bytes")) == [str(96 << 20)]
        if "pids" in driver.hierarchy.controllers:
            assert seen["pids.max"] == [str(40 + bwrap.BWRAP_PROCS)]
        if "cpu" in driver.hierarchy.controllers:
            assert seen.get("cpu.max", seen.get("cpu.cfs_quota_us"))[0] == "200000"
    finally:
        await machine.kill()
    assert_gone(driver, machine)


async def test_memory_hog_is_stopped(driver):
    spec = MachineSpec(runtime="python3", memory_mb=64)
    machine = await driver.create(spec)
    try:
        await load(machine, MEMORY_HOG_PY)
        try:
            header, _ = await call(machine, {"mib": 512})
        except MachineDied as exc:
            assert not machine.alive
            if driver.hierarchy is not None and "memory" in driver.hierarchy.controllers:
                assert "memory limit" in str(exc), str(exc)
        else:
            assert header["type"] == "error", header
            assert header["error"]["type"] in ("MemoryError", "RuntimeExit"), header
    finally:
        await machine.kill()
    assert_gone(driver, machine)
    await assert_new_machine_works(driver)


async def test_fork_bomb_is_stopped_by_the_pids_limit(driver):
    if driver.hierarchy is None or "pids" not in driver.hierarchy.controllers:
        pytest.skip(f"no pids cgroup on this host ({driver.cgroup_note}); pids: {driver.enforcement['pids']}")
    spec = MachineSpec(runtime="python3", pids_max=32)
    machine = await driver.create(spec)
    try:
        await load(machine, FORK_BOMB_PY)
        header, output = await call(machine, {})
        assert header["type"] == "result", header
        assert output["stopped_by"] is not None, output
        assert output["made"] < spec.pids_max + bwrap.BWRAP_PROCS, output
    finally:
        await machine.kill()
    assert_gone(driver, machine)
    # The host survived: it can still start processes, and machines.
    assert subprocess.run(["true"]).returncode == 0
    await assert_new_machine_works(driver)


async def test_request_timeout_kills_the_machine(driver):
    machine = await driver.create(MachineSpec(runtime="python3"))
    await load(machine, SLEEPER_PY)
    with pytest.raises(MachineTimeout):
        await call(machine, {"s": 600}, timeout=1.0)
    assert_gone(driver, machine)
    await assert_new_machine_works(driver)


async def test_agent_killed_by_its_function_is_machine_died(driver):
    machine = await driver.create(MachineSpec(runtime="python3"))
    await load(machine, SUICIDE_PY)
    with pytest.raises(MachineDied, match="SIGKILL"):
        await call(machine, {})
    assert not machine.alive
    assert not await machine.ping()
    await machine.kill()
    assert_gone(driver, machine)
    await assert_new_machine_works(driver)


async def test_a_broken_frame_from_the_guest_is_a_protocol_error(driver):
    machine = await driver.create(MachineSpec(runtime="python3"))
    await load(machine, GARBAGE_PY)
    with pytest.raises(ProtocolError):
        await call(machine, {})
    assert_gone(driver, machine)
    await assert_new_machine_works(driver)


async def test_machine_dying_on_its_own_is_noticed(driver):
    machine = await driver.create(MachineSpec(runtime="python3"))
    os.kill(machine.pid, 9)  # from outside, as the OOM killer or an operator might
    for _ in range(200):
        if not machine.alive:
            break
        await asyncio.sleep(0.05)
    assert not machine.alive
    assert not await machine.ping()
    await machine.stop()
    assert_gone(driver, machine)


async def test_driver_close_kills_everything(tmp_path):
    d = bwrap.BwrapDriver(tmp_path / "home")
    idle = [await d.create(MachineSpec(runtime="python3")) for _ in range(2)]
    busy = await d.create(MachineSpec(runtime="python3"))
    await load(busy, SLEEPER_PY)
    running = asyncio.create_task(call(busy, {"s": 600}))
    await asyncio.sleep(0.2)
    await d.close()
    with pytest.raises(MachineDied):
        await running
    for machine in [*idle, busy]:
        assert_gone(d, machine)
    assert d.machines == []
    with pytest.raises(MachineStartError, match="closed"):
        await d.create(MachineSpec(runtime="python3"))
    if d.hierarchy is not None:
        for base in d.hierarchy.bases:
            assert not list(base.path.glob(f"{busy.id}*"))


# ---------------------------------------------------------------- the rlimit fallback


async def test_rlimit_fallback_runs_both_runtimes(rlimit_driver):
    assert rlimit_driver.hierarchy is None
    assert rlimit_driver.enforcement["memory"] == "RLIMIT_DATA per process"
    header, output = await run_once(rlimit_driver, HELLO_PY, {"n": 4})
    assert (header["type"], output) == ("result", {"answer": 8})
    header, output = await run_once(rlimit_driver, HELLO_JS, {"n": 4}, runtime="nodejs")
    assert header["type"] == "result" and output["answer"] == 8, header


async def test_rlimit_fallback_stops_a_memory_hog(rlimit_driver):
    machine = await rlimit_driver.create(MachineSpec(runtime="python3", memory_mb=64))
    try:
        await load(machine, MEMORY_HOG_PY)
        try:
            header, _ = await call(machine, {"mib": 512})
        except MachineDied:
            pass
        else:
            assert header["type"] == "error" and header["error"]["type"] == "MemoryError", header
    finally:
        await machine.kill()
    assert_gone(rlimit_driver, machine)
    await assert_new_machine_works(rlimit_driver)


# ---------------------------------------------------------------- seccomp

SECCOMP_PY = '''
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)

def handler(event, context=None):
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    def call(nr, *args):
        ctypes.set_errno(0)
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
    return {"seccomp": status["Seccomp"].strip(), "nnp": status["NoNewPrivs"].strip(),
            "unshare_user": call(272, 0x10000000), "mount": call(165, 0, 0, 0, 0, 0), "clone3": call(435, 0, 0),
            "fds": [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                    if os.path.exists(f"/proc/self/fd/{fd}")]}
'''


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the probe's syscall numbers are x86_64's")
@pytest.mark.parametrize("kind", ["cgroups", "rlimits"])
async def test_machines_run_under_the_seccomp_filter(driver, rlimit_driver, kind):
    d = driver if kind == "cgroups" else rlimit_driver
    assert d.enforcement["syscalls"] == "seccomp filter" and d.seccomp_path is not None
    header, out = await run_once(d, SECCOMP_PY, {})
    assert header["type"] == "result", header
    assert (out["seccomp"], out["nnp"]) == ("2", "1"), out
    # unshare(CLONE_NEWUSER) is how an unprivileged process regains capabilities (and, as root node, mounts)
    assert (out["unshare_user"], out["mount"], out["clone3"]) == ("EPERM", "EPERM", "ENOSYS"), out
    # bwrap read the program and closed its descriptor: the function holds only the agent's fds
    assert not [link for link in out["fds"] if "seccomp" in link or link.endswith(".bpf")], out["fds"]


async def test_each_machine_reads_the_whole_program(driver):
    """Every bwrap gets a descriptor of its own: a shared one would be read to its end by the first."""
    machines = [await driver.create(MachineSpec(runtime="python3")) for _ in range(3)]
    try:
        for machine in machines:
            await load(machine, SECCOMP_PY)
            header, out = await call(machine, {})
            assert header["type"] == "result" and out["seccomp"] == "2", header
    finally:
        for machine in machines:
            await machine.kill()


async def test_seccomp_can_be_turned_off(tmp_path):
    d = bwrap.BwrapDriver(tmp_path / "home", use_seccomp=False)
    try:
        assert d.enforcement["syscalls"] == "none"
        argv = d.command(MachineSpec(runtime="python3"), 3, None, d.open_seccomp())
        assert "--seccomp" not in argv
        header, out = await run_once(d, SECCOMP_PY, {})
        assert header["type"] == "result" and out["seccomp"] == "0", header
    finally:
        await d.close()
