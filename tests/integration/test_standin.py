"""The stand-in Firecracker and jailer executables (tests/standin), driven by Nimbus's real clients.

No firecracker or jailer binary and no bootable KVM exist here. ``tests/standin/firecracker.py`` is a
TEST STAND-IN that serves Firecracker's API (checked against ``firecracker.yaml``), keeps its state
rules, exposes the vsock device's host side and "boots" by starting the real guest agent as a host
process (the agent in its real ``--vsock-port`` mode, listening on a Unix socket for the VM's life);
``tests/standin/jailer.py`` builds the jail's layout and execs it, confining nothing. Their
docstrings say exactly what they do not do. These tests run them as separate processes, through the
wrappers ``standin.install()`` writes, with ``nimbus.machines.firecracker.api.FirecrackerApi``,
``nimbus.machines.firecracker.vsock.connect`` and the ``nimbus.protocol`` frames, so the Firecracker driver's tests
can rely on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import firecracker_spec
import standin
from nimbus.errors import MachineStartError
from nimbus.machines.firecracker import api as fcapi
from nimbus.machines.firecracker import jail, vsock
from standin import firecracker as fc_standin
from standin.frames import exchange, exec_header, ping_init_exec, streams
from standin.schema import definition, load_spec

SPEC_FILE = firecracker_spec.spec_dir() / "firecracker.yaml"

pytestmark = [
    pytest.mark.firecracker,
    pytest.mark.skipif(not SPEC_FILE.is_file(),
                       reason=f"Firecracker's API schema not found at {SPEC_FILE} (set NIMBUS_FIRECRACKER_SPEC_DIR)"),
]

WAIT_S = 30.0  # generous bound for what should happen at once; never asserted on
QUICK_S = 0.5  # vsock.connect timeout where the connection is expected to be refused
RETRY_S = 0.01
MEM_MIB = 128


@pytest.fixture
def work():
    """A short directory (AF_UNIX paths hold 107 bytes) with a kernel and a rootfs file to configure."""
    path = Path(tempfile.mkdtemp(prefix="nsi-", dir="/tmp"))
    (path / "vmlinux").write_bytes(b"not a kernel: the stand-in only checks that the file exists")
    (path / "rootfs.ext4").write_bytes(b"not a file system")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def installed(work) -> standin.Installed:
    return standin.install(work)


@pytest.fixture
def spawn(work):
    """Start a command with its stderr in ``work/<name>.log``; whatever still runs is stopped afterwards."""
    procs: list[tuple[subprocess.Popen, str]] = []

    def start(argv: list, name: str, cwd: Path | None = None) -> subprocess.Popen:
        with open(work / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([str(a) for a in argv], cwd=cwd or work, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log)
        procs.append((proc, name))
        return proc

    yield start
    for proc, name in procs:
        print(f"---- {name}'s stderr (shown when a test fails):\n{log_of(work, name)}")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert agents_in(work, settle_s=WAIT_S) == [], "a guest agent outlived its stand-in"


def agents_in(work: Path, settle_s: float = 0.0) -> list[int]:
    """Live processes whose command line names ``work`` (a stand-in's agents: their --task-dir is in it).

    Waits up to ``settle_s`` for them to go: an agent whose stand-in died is killed by the kernel, then
    reaped by init (a zombie's command line is empty, so it is not counted).
    """
    # The --task-dir of the agents its stand-ins start (jailed ones: in a jail under ``work``).
    where, what = str(work).encode(), b"/.nimbus-standin-task-"
    for _ in range(max(1, int(settle_s / RETRY_S))):
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if where in cmdline and what in cmdline:
                    found.append(int(entry.name))
        if not found:
            return []
        time.sleep(RETRY_S)
    return found


@pytest.fixture
def firecracker(installed, spawn, work):
    """``firecracker(name)``: a stand-in with API socket ``work/<name>.sock`` (given relative), cwd ``work``."""
    return lambda name: spawn([installed.firecracker, "--api-sock", f"{name}.sock", "--id", name], name)


async def exited(proc: subprocess.Popen) -> int:
    return await asyncio.to_thread(proc.wait, WAIT_S)


def log_of(work: Path, name: str) -> str:
    return (work / f"{name}.log").read_text(errors="replace")


async def configure(api: fcapi.FirecrackerApi, uds_path: str = "v.sock") -> None:
    """A bootable configuration with paths relative to the stand-in's working directory."""
    await api.put_machine_config(fcapi.MachineConfiguration(vcpu_count=1, mem_size_mib=MEM_MIB))
    await api.put_boot_source(fcapi.BootSource("vmlinux", "console=ttyS0 reboot=k panic=1"))
    await api.put_drive(fcapi.Drive("rootfs", "rootfs.ext4", is_root_device=True))
    await api.put_vsock(fcapi.Vsock(uds_path))


@contextlib.asynccontextmanager
async def running_vm(api_socket: Path):
    """The API client of a stand-in that answers, configured with :func:`configure` and started."""
    async with fcapi.FirecrackerApi(api_socket) as api:
        await api.wait_ready(timeout=WAIT_S)
        await configure(api)
        await api.instance_start()
        yield api


@contextlib.asynccontextmanager
async def channel(uds_path: Path):
    """The frame streams of a vsock connection to the agent's port, through the stand-in's device."""
    sock = await vsock.connect(uds_path, timeout=WAIT_S, retry_interval=RETRY_S)
    async with streams(sock) as both:
        yield both


async def ping(reader, writer, rid: int = 9) -> None:
    reply, _ = await exchange(reader, writer, {"type": "ping", "id": rid})
    assert reply["type"] == "pong"


async def call(reader, writer, n: int, rid: int = 10) -> dict:
    """exec only: the function must already be initialised in this agent."""
    reply, output = await exchange(reader, writer, exec_header(rid), json.dumps({"n": n}).encode())
    assert reply["type"] == "result", reply
    return json.loads(output)


async def closed_unanswered(uds_path: Path, port: int = fc_standin.AGENT_PORT) -> None:
    """One raw CONNECT, which the device must close without a byte."""
    reader, writer = await asyncio.open_unix_connection(uds_path)
    try:
        writer.write(f"CONNECT {port}\n".encode())
        await writer.drain()
        async with asyncio.timeout(WAIT_S):
            assert await reader.read() == b""
    finally:
        writer.close()


async def refused(uds_path: Path) -> str:
    """The error of a CONNECT the device closes without answering, every try until QUICK_S."""
    with pytest.raises(MachineStartError) as caught:
        await vsock.connect(uds_path, timeout=QUICK_S, retry_interval=RETRY_S)
    return str(caught.value)


# ---------------------------------------------------------------- the command line


def test_version_names_the_stand_in(installed):
    out = subprocess.run([installed.firecracker, "--version"], capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 0
    assert out.stdout.strip() == f"Firecracker v{fc_standin.VERSION} (nimbus test stand-in)"


@pytest.mark.parametrize(("args", "said"), [
    (["--bogus"], "'--bogus'"),
    (["--config-file", "vm.json"], "does not model"),
    (["--id", "not_valid"], "invalid instance id"),
    (["--id"], "needs a value"),
    (["--id", "a", "--id", "b"], "more than once"),
], ids=["unknown", "not-modelled", "bad-id", "no-value", "twice"])
def test_stand_in_refuses_bad_flags(installed, work, args, said):
    out = subprocess.run([installed.firecracker, "--api-sock", "api.sock", *args], cwd=work, capture_output=True,
                         text=True, timeout=WAIT_S)
    assert out.returncode == 1
    assert said in out.stderr and "nimbus test stand-in" in out.stderr
    assert not (work / "api.sock").exists()


def test_stand_in_refuses_an_existing_socket_path(installed, work):
    (work / "api.sock").write_text("left over")
    out = subprocess.run([installed.firecracker, "--api-sock", "api.sock"], cwd=work, capture_output=True, text=True,
                         timeout=WAIT_S)
    assert out.returncode == 1 and "Address in use" in out.stderr


# ---------------------------------------------------------------- boot, vsock, power-off


async def test_stand_in_boots_and_the_agent_answers_over_vsock(firecracker, work):
    proc = firecracker("vm")
    async with fcapi.FirecrackerApi(work / "vm.sock") as api:
        info = await api.wait_ready(timeout=WAIT_S)
        assert definition(load_spec(SPEC_FILE), "InstanceInfo").is_valid(info)
        assert (info["id"], info["state"], info["app_name"]) == ("vm", "Not started", "Firecracker")
        assert await api.version() == fc_standin.VERSION
        await configure(api)
        assert (work / "v.sock").exists()  # bound at PUT /vsock, relative to the stand-in's cwd
        assert "guest port 9999 not reachable" in await refused(work / "v.sock")  # not booted yet
        await api.instance_start()
        assert (await api.describe_instance())["state"] == "Running"
        async with channel(work / "v.sock") as (reader, writer):
            result = await ping_init_exec(reader, writer)
            assert result["doubled"] == 42 and result["function"] == "doubler"
            agent_pid = result["pid"]
            assert agent_pid != proc.pid  # a real agent process behind the device
        # The host hung up; the guest's listener stays: a second CONNECT reaches the same agent, which
        # still has the function the first connection initialised.
        async with channel(work / "v.sock") as (reader, writer):
            assert await call(reader, writer, 4) == {"doubled": 8, "function": "doubler", "pid": agent_pid}
        async with channel(work / "v.sock") as (reader, writer):
            await ping(reader, writer)
            assert (await call(reader, writer, 5))["pid"] == agent_pid
        assert proc.poll() is None  # hanging up does not power the guest off
        assert agents_in(work) == [agent_pid]
        assert "exited" not in log_of(work, "vm")
        guest_socket = work / fc_standin.GUEST_SOCKET.format(pid=proc.pid)
        assert guest_socket.is_socket()
        await api.send_ctrl_alt_del()
    assert await exited(proc) == 0
    assert not (work / "vm.sock").exists() and not (work / "v.sock").exists() and not guest_socket.exists()
    assert "guest powered off" in log_of(work, "vm")
    assert not list(work.glob(".nimbus-standin-*"))  # the task directory and the guest socket are gone


async def test_a_connect_before_the_agent_listens_is_closed_then_retried(firecracker, work):
    proc = firecracker("early")
    async with running_vm(work / "early.sock"):
        # At once: the agent takes tens of milliseconds (its interpreter and imports) to listen.
        await closed_unanswered(work / "v.sock")
        assert "the guest agent does not listen on port 9999" in log_of(work, "early")
        # nimbus.machines.firecracker.vsock.connect retries such a close until the agent listens.
        async with channel(work / "v.sock") as (reader, writer):
            result = await ping_init_exec(reader, writer)
            assert result["doubled"] == 42
        assert "vsock: host port 1073741824 connected to guest port 9999" in log_of(work, "early")
        assert proc.poll() is None


async def test_a_connect_to_another_port_is_closed(firecracker, work):
    firecracker("port")
    async with running_vm(work / "port.sock"):
        async with channel(work / "v.sock") as (reader, writer):
            await ping(reader, writer)
        await closed_unanswered(work / "v.sock", port=52)
        assert "nothing listens on guest port 52" in log_of(work, "port")


async def test_a_protocol_violation_ends_the_agent_and_powers_off(firecracker, work):
    proc = firecracker("bad")
    async with running_vm(work / "bad.sock"):
        async with channel(work / "v.sock") as (reader, writer):
            await ping(reader, writer)
            writer.write(b"\xff" * 64)  # not a frame: the agent ends, as it does in a real guest
            await writer.drain()
            async with asyncio.timeout(WAIT_S):
                assert await reader.read() == b""
    assert await exited(proc) == 0
    assert "guest powered off (its agent exited with status 2)" in log_of(work, "bad")
    assert not (work / "v.sock").exists()


async def test_ctrl_alt_del_powers_the_guest_off(firecracker, work):
    proc = firecracker("cad")
    async with running_vm(work / "cad.sock") as api:
        await api.send_ctrl_alt_del()
    assert await exited(proc) == 0
    assert not (work / "cad.sock").exists() and not (work / "v.sock").exists()


async def test_sigterm_removes_the_sockets(firecracker, work):
    proc = firecracker("term")
    async with running_vm(work / "term.sock"):
        pass
    proc.send_signal(signal.SIGTERM)
    assert await exited(proc) == 0
    assert not (work / "term.sock").exists() and not (work / "v.sock").exists()


async def test_paused_guest_takes_no_connection_until_resumed(firecracker, work):
    firecracker("pause")
    async with running_vm(work / "pause.sock") as api:
        await api.pause()
        assert (await api.describe_instance())["state"] == "Paused"
        await refused(work / "v.sock")
        await api.resume()
        assert (await api.describe_instance())["state"] == "Running"
        async with channel(work / "v.sock") as (reader, writer):
            await ping(reader, writer)
            await api.pause()  # without a snapshot, an open connection survives a pause
            await api.resume()
            await ping(reader, writer)


# ---------------------------------------------------------------- snapshots


async def test_snapshot_then_load_into_a_second_process(firecracker, work):
    first = firecracker("a")
    async with running_vm(work / "a.sock") as api:
        with pytest.raises(fcapi.FirecrackerApiError, match="must be Paused"):
            await api.create_snapshot(fcapi.SnapshotCreateParams("snap.state", "snap.mem"))
        async with channel(work / "v.sock") as (reader, writer):
            first_pid = (await ping_init_exec(reader, writer))["pid"]
        await api.pause()
        await api.create_snapshot(fcapi.SnapshotCreateParams("snap.state", "snap.mem"))
        state = json.loads((work / "snap.state").read_text())
        assert state["format"] == fc_standin.SNAPSHOT_MARKER and "agent_connection_made" not in state
        assert state["vsock"]["uds_path"] == "v.sock" and state["machine_config"]["mem_size_mib"] == MEM_MIB
        mem = (work / "snap.mem").stat()
        assert mem.st_size == MEM_MIB << 20 and mem.st_blocks * 512 < 1 << 20  # sparse, never written
        await api.resume()
        async with channel(work / "v.sock") as (reader, writer):
            assert (await call(reader, writer, 1))["pid"] == first_pid  # the original keeps its agent

        second = firecracker("b")  # while the first still runs, in the same directory
        async with fcapi.FirecrackerApi(work / "b.sock") as api2:
            await api2.wait_ready(timeout=WAIT_S)
            await api2.put_logger(fcapi.Logger("b.fclog", level="Info"))  # allowed before a load
            await api2.load_snapshot(fcapi.SnapshotLoadParams("snap.state", "snap.mem", vsock_uds_path="v2.sock"))
            assert (await api2.describe_instance())["state"] == "Paused"
            assert (await api2._request("GET", "/machine-config"))["mem_size_mib"] == MEM_MIB
            with pytest.raises(fcapi.FirecrackerApiError, match="not supported after starting"):
                await api2.put_boot_source(fcapi.BootSource("vmlinux"))
            await refused(work / "v2.sock")  # paused
            await api2.resume()
            assert (await api2.describe_instance())["state"] == "Running"
            async with channel(work / "v2.sock") as (reader, writer):
                # A FRESH agent: no memory was snapshotted, so the function must be initialised again.
                reply, _ = await exchange(reader, writer, exec_header(7), b"{}")
                assert reply["type"] == "error" and reply["error"]["type"] == "NotInitialized", reply
                result = await ping_init_exec(reader, writer, n=5)
                assert result["doubled"] == 10 and result["pid"] != first_pid
            async with channel(work / "v2.sock") as (reader, writer):  # and it keeps listening
                assert (await call(reader, writer, 6))["pid"] == result["pid"]
            await api2.send_ctrl_alt_del()
        assert await exited(second) == 0
        assert "loaded" in (work / "b.fclog").read_text()
        async with channel(work / "v.sock") as (reader, writer):  # the first is unaffected
            assert (await call(reader, writer, 2))["pid"] == first_pid
        await api.send_ctrl_alt_del()
    assert await exited(first) == 0


async def test_snapshot_resets_an_open_connection_and_the_agent_accepts_again(firecracker, work):
    first = firecracker("a")
    async with running_vm(work / "a.sock") as api:
        async with channel(work / "v.sock") as (reader, writer):
            agent_pid = (await ping_init_exec(reader, writer))["pid"]
            await api.pause()
            await api.create_snapshot(fcapi.SnapshotCreateParams("snap.state", "snap.mem"))
            async with asyncio.timeout(WAIT_S):
                assert await reader.read() == b""  # the vsock device reset closed the host's end
            await refused(work / "v.sock")  # still paused
            await api.resume()
        # Resumed, the agent reads the end of its old connection and accepts the next: the same process,
        # with the function it had loaded.
        async with channel(work / "v.sock") as (reader, writer):
            assert await call(reader, writer, 8) == {"doubled": 16, "function": "doubler", "pid": agent_pid}
        assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    assert await exited(first) == 0

    # Loaded and resumed at once (as the driver restores): a fresh agent listens on the new socket.
    second = firecracker("b")
    async with fcapi.FirecrackerApi(work / "b.sock") as api:
        await api.wait_ready(timeout=WAIT_S)
        await api.load_snapshot(fcapi.SnapshotLoadParams("snap.state", "snap.mem", resume_vm=True,
                                                         vsock_uds_path="v2.sock"))
        assert (await api.describe_instance())["state"] == "Running"
        async with channel(work / "v2.sock") as (reader, writer):
            result = await ping_init_exec(reader, writer, n=3)
            assert result["doubled"] == 6 and result["pid"] != agent_pid
    second.send_signal(signal.SIGTERM)
    assert await exited(second) == 0
    assert not (work / "v2.sock").exists()


@pytest.mark.parametrize("case", ["not-a-snapshot", "no-memory-file", "drive-moved"])
async def test_a_failed_load_is_a_fault_and_ends_the_process(firecracker, work, case):
    vm = firecracker("a")
    async with running_vm(work / "a.sock") as api:
        await api.pause()
        await api.create_snapshot(fcapi.SnapshotCreateParams("snap.state", "snap.mem"))
    vm.send_signal(signal.SIGTERM)
    assert await exited(vm) == 0
    expected = {"not-a-snapshot": "not a snapshot written by the nimbus test stand-in",
                "no-memory-file": "no such file", "drive-moved": "not at the path the snapshot was taken with"}[case]
    if case == "not-a-snapshot":
        (work / "snap.state").write_text(json.dumps({"format": "firecracker", "data": "binary"}))
    elif case == "no-memory-file":
        (work / "snap.mem").unlink()
    else:
        (work / "rootfs.ext4").rename(work / "moved.ext4")

    loader = firecracker("b")
    async with fcapi.FirecrackerApi(work / "b.sock") as api:
        await api.wait_ready(timeout=WAIT_S)
        with pytest.raises(fcapi.FirecrackerApiError) as caught:
            await api.load_snapshot(fcapi.SnapshotLoadParams("snap.state", "snap.mem", resume_vm=True,
                                                             vsock_uds_path="v2.sock"))
    assert caught.value.status == 400 and expected in caught.value.fault_message
    assert await exited(loader) == 1
    assert not (work / "b.sock").exists()


# ---------------------------------------------------------------- the API's rules


async def test_calls_are_refused_as_firecracker_refuses_them(firecracker, work):
    firecracker("rules")
    async with fcapi.FirecrackerApi(work / "rules.sock") as api:
        await api.wait_ready(timeout=WAIT_S)

        async def fault(call, *args) -> str:
            with pytest.raises(fcapi.FirecrackerApiError) as caught:
                await call(*args)
            assert caught.value.status == 400
            return caught.value.fault_message

        assert "boot source" in await fault(api.instance_start)
        assert "vcpu_count" in await fault(api.put_machine_config, fcapi.MachineConfiguration(0, 128))
        assert "even" in await fault(api.put_machine_config, fcapi.MachineConfiguration(3, 128, smt=True))
        assert "no such file" in await fault(api.put_boot_source, fcapi.BootSource("absent-vmlinux"))
        assert "does not match" in await fault(api._request, "PUT", "/drives/a",
                                               {"drive_id": "b", "path_on_host": "rootfs.ext4",
                                                "is_root_device": True, "is_read_only": True})
        assert "Invalid request method and/or path" in await fault(api._request, "PUT", "/boot-sources",
                                                                   {"kernel_image_path": "vmlinux"})
        assert "not implemented by the nimbus test stand-in" in await fault(api._request, "PUT", "/entropy", {})
        assert "uds_path" in await fault(api._request, "PUT", "/vsock", {"guest_cid": 3})
        assert "is not started" in await fault(api.pause)
        assert "must be Paused" in await fault(api.create_snapshot, fcapi.SnapshotCreateParams("s", "m"))
        assert "not initialized" in await fault(api.flush_metrics)

        await api.put_boot_source(fcapi.BootSource("vmlinux"))
        assert "root block device" in await fault(api.instance_start)
        await api.put_drive(fcapi.Drive("rootfs", "rootfs.ext4", is_root_device=True))
        assert "root block device already exists" in await fault(
            api.put_drive, fcapi.Drive("second", "rootfs.ext4", is_root_device=True))
        assert "after configuring" in await fault(api.load_snapshot, fcapi.SnapshotLoadParams("s", "m"))
        (work / "vmlinux").rename(work / "gone")
        assert "no such file" in await fault(api.instance_start)  # checked again when it boots
        (work / "gone").rename(work / "vmlinux")

        await api.put_metrics(fcapi.Metrics("rules.metrics"))
        assert "Reinitialization" in await fault(api.put_metrics, fcapi.Metrics("rules.metrics"))
        await api.instance_start()
        await api.flush_metrics()
        assert json.loads((work / "rules.metrics").read_text().splitlines()[-1])["api_requests"] > 0
        assert "already running" in await fault(api.instance_start)
        for call, arg in ((api.put_boot_source, fcapi.BootSource("vmlinux")),
                          (api.put_machine_config, fcapi.MachineConfiguration(1, 128)),
                          (api.put_vsock, fcapi.Vsock("other.sock")),
                          (api.load_snapshot, fcapi.SnapshotLoadParams("s", "m"))):
            assert "not supported after starting" in await fault(call, arg)
        config = await api._request("GET", "/vm/config")
        assert [d["drive_id"] for d in config["drives"]] == ["rootfs"]
        assert definition(load_spec(SPEC_FILE), "FullVmConfiguration").is_valid(config)


# ---------------------------------------------------------------- the jailer


def jail_spec(installed: standin.Installed, work: Path, **overrides) -> jail.JailSpec:
    values = dict(id="standin-vm-1", memory_mb=MEM_MIB, vcpus=1, uid=os.getuid(), gid=os.getgid(),
                  exec_file=installed.firecracker, jailer=installed.jailer, chroot_base_dir=work / "jail")
    values.update(overrides)
    return jail.JailSpec(**values)


async def test_jailer_builds_the_layout_nimbus_expects(installed, spawn, work):
    spec = jail_spec(installed, work)
    spec.check()
    staged = jail.stage_files(spec, work / "vmlinux", work / "rootfs.ext4")
    proc = spawn(jail.jailer_argv(spec), "jailer")
    async with fcapi.FirecrackerApi(jail.api_socket_path(spec)) as api:
        info = await api.wait_ready(timeout=WAIT_S)
        assert info["id"] == spec.id
        root = jail.chroot_dir(spec)
        assert root == work / "jail" / "firecracker" / spec.id / "root"
        assert (root / "firecracker").read_bytes() == installed.firecracker.read_bytes()  # the jailer's copy
        assert jail.pid_file_path(spec).read_text().strip() == str(proc.pid)  # exec'd in place
        record = json.loads((root / "jailer-argv.json").read_text())
        assert record["argv"][1:] == jail.jailer_argv(spec)[1:]
        assert record["firecracker_args"] == ["--api-sock", spec.api_sock]
        assert record["options"]["cgroups"] == spec.cgroups()
        # Paths inside the jail, as the jailed Firecracker is given them.
        await api.put_boot_source(fcapi.BootSource(staged["kernel"]))
        await api.put_drive(fcapi.Drive("rootfs", staged["rootfs"], is_root_device=True))
        await api.put_vsock(fcapi.Vsock(spec.vsock_uds))
        await api.instance_start()
        async with channel(jail.vsock_path(spec)) as (reader, writer):
            await ping(reader, writer)
        async with channel(jail.vsock_path(spec)) as (reader, writer):  # the guest keeps listening
            await ping(reader, writer)
        assert len(agents_in(work)) == 1
        await api.send_ctrl_alt_del()  # the agent ends, so the guest powers off and the jailed stand-in exits
    assert await asyncio.to_thread(proc.wait, WAIT_S) == 0
    assert not jail.api_socket_path(spec).exists() and not jail.vsock_path(spec).exists()


async def test_jailed_paths_cannot_leave_the_jail(installed, spawn, work):
    spec = jail_spec(installed, work, id="standin-vm-2")
    jail.stage_files(spec, work / "vmlinux", work / "rootfs.ext4")
    spawn(jail.jailer_argv(spec), "jailer")
    async with fcapi.FirecrackerApi(jail.api_socket_path(spec)) as api:
        await api.wait_ready(timeout=WAIT_S)
        # work/vmlinux exists on the host, but not inside the jail: "/../../vmlinux" is the jail's /vmlinux.
        outside = "/" + os.path.relpath(work / "vmlinux", "/")
        with pytest.raises(fcapi.FirecrackerApiError, match="no such file"):
            await api.put_boot_source(fcapi.BootSource(outside))
        await api.put_boot_source(fcapi.BootSource("/../../vmlinux"))


@pytest.mark.parametrize(("change", "said"), [
    (lambda argv: argv[:2] + ["bad_id"] + argv[3:], "invalid --id"),
    (lambda argv: argv[:2] + ["x" * 65] + argv[3:], "at most 64"),
    (lambda argv: [a for i, a in enumerate(argv) if i not in (argv.index("--uid"), argv.index("--uid") + 1)],
     "--uid is required"),
    (lambda argv: argv[:1] + ["--bogus"] + argv[1:], "unexpected argument '--bogus'"),
    (lambda argv: [("memory" if a.startswith("memory.max=") else a) for a in argv], "invalid --cgroup"),
    (lambda argv: [("cpu=1" if a.startswith("no-file=") else a) for a in argv], "invalid --resource-limit"),
    (lambda argv: [("/nonexistent/firecracker" if a.endswith("/bin/firecracker") else a) for a in argv],
     "no such file"),
], ids=["bad-id", "long-id", "no-uid", "unknown-flag", "bad-cgroup", "bad-rlimit", "no-exec-file"])
def test_jailer_refuses_bad_command_lines(installed, work, change, said):
    argv = change(jail.jailer_argv(jail_spec(installed, work)))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 1
    assert said in out.stderr and "nimbus test stand-in" in out.stderr
    assert not (work / "jail").exists()


def test_jailer_wants_a_firecracker_exec_file(installed, work):
    other = work / "bin" / "vmm"
    shutil.copy2(installed.firecracker, other)
    argv = jail.jailer_argv(jail_spec(installed, work, exec_file=other))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S)
    assert out.returncode == 1 and 'must contain "firecracker"' in out.stderr


async def test_the_agent_does_not_outlive_a_killed_stand_in(firecracker, work):
    proc = firecracker("killed")
    async with running_vm(work / "killed.sock"):
        async with channel(work / "v.sock") as (reader, writer):
            agent_pid = (await ping_init_exec(reader, writer))["pid"]
            proc.kill()  # no clean-up can run: the kernel ends the agent (PR_SET_PDEATHSIG)
            assert await exited(proc) == -signal.SIGKILL
            async with asyncio.timeout(WAIT_S):
                assert await reader.read() == b""  # the vsock device died with the stand-in
    with pytest.raises(ProcessLookupError):
        for _ in range(int(WAIT_S / RETRY_S)):  # reaped by init soon after; a zombie still takes signal 0
            os.kill(agent_pid, 0)
            await asyncio.sleep(RETRY_S)
