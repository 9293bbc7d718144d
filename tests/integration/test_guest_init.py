"""The guest's init (``nimbus.agent.init``) as PID 1, in a bwrap pid namespace instead of a microVM.

bwrap runs with ``--unshare-pid --as-pid-1``, so no bwrap reaper sits in between: init really is PID 1 of
the namespace, orphans are reparented to it and the kernel delivers it only the signals it handles.
There is no vsock here, so init starts the agent in fd mode (``-- --fd N``) on an inherited socketpair
end, which bwrap passes through like any fd without CLOEXEC. Mounts and power-off are skipped
(``--no-mounts --no-poweroff``) except in the root-only test, which lets init mount for itself and
"power off" a pid namespace (the kernel ends the namespace instead of the host). Booting the image
in Firecracker needs KVM and is not done here.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nimbus import protocol
from nimbus.agent import init as guest_init
from nimbus.machines.bwrap import find_bwrap
from nimbus.machines.layout import base_python

pytestmark = pytest.mark.firecracker

SRC = Path(__file__).resolve().parents[2] / "src"
# Inside the namespace the source is bound at a path of its own, which no mount of init's covers (a
# checkout under /tmp would vanish under init's tmpfs).
GUEST_SRC = "/mnt/nimbus-src"


def launch(src: str) -> str:
    return f"import sys; sys.path.insert(0, {src!r}); from nimbus.agent.init import main; main(sys.argv[1:])"


LAUNCH = launch(str(SRC))
PYTHON = str(base_python()[0])  # the agent is stdlib only: no venv needed, and a venv under /tmp is hidden
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
WAIT_S = 30.0  # generous bound so a broken init fails the test instead of hanging it; never asserted on
TEST_FLAGS = ("--no-mounts", "--no-poweroff", "--report-pid")

HANDLER = """
    import os
    import time

    def _state(pid):
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]

    def handler(event, context):
        if event["op"] == "echo":
            return {"n": event["n"], "pid1": open("/proc/1/cmdline", "rb").read().decode().split("\\0")}
        if event["op"] == "orphan":
            # Double fork: the grandchild outlives its parent, waits to be reparented, notes to whom,
            # and exits, leaving a zombie that only PID 1 can reap.
            middle = os.fork()
            if middle == 0:
                parent = os.getpid()
                if os.fork() == 0:
                    deadline = time.monotonic() + 20
                    while os.getppid() == parent and time.monotonic() < deadline:
                        time.sleep(0.01)
                    with open("/tmp/orphan", "w") as file:
                        file.write(f"{os.getpid()} {os.getppid()}")
                    os._exit(0)
                os._exit(0)
            os.waitpid(middle, 0)
            return {"made": True}
        if event["op"] == "states":
            deadline = time.monotonic() + 20
            while not os.path.exists("/tmp/orphan") and time.monotonic() < deadline:
                time.sleep(0.01)
            orphan, reparented_to = map(int, open("/tmp/orphan").read().split())
            # Until it is gone (PID 1 reaps it as soon as it exits): waiting only while it is a zombie
            # raced an orphan that had written its note but not yet exited. Bounded, never a threshold.
            while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
                time.sleep(0.01)
            states = {}
            for name in os.listdir("/proc"):
                if name.isdigit():
                    try:
                        states[name] = _state(name)
                    except OSError:
                        pass
            return {"orphan": orphan, "reparented_to": reparented_to, "states": states}
        if event["op"] == "mounts":
            with open("/proc/mounts") as file:
                mounts = [line.split()[:4] for line in file]
            with open("/sys/class/net/lo/flags") as file:
                lo_flags = int(file.read(), 16)
            return {"mounts": mounts, "lo_up": bool(lo_flags & 1)}
        raise ValueError(event)
"""


class Guest:
    """One init (and its agent) in a bwrap pid namespace, with the host's end of the channel."""

    def __init__(self, init_flags=TEST_FLAGS, bwrap_args=("--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"),
                 task_dir: str = "/tmp") -> None:
        self.host, guest = socket.socketpair()
        info_r, info_w = os.pipe()
        # The base interpreter, not the venv's, and the source at GUEST_SRC: a checkout under /tmp (and
        # its venv) would vanish under a tmpfs on /tmp.
        command = [find_bwrap(), "--unshare-pid", "--as-pid-1", "--die-with-parent", "--ro-bind", "/", "/",
                   *bwrap_args, "--tmpfs", "/mnt", "--ro-bind", str(SRC), GUEST_SRC, "--info-fd", str(info_w),
                   "--", PYTHON, "-c", launch(GUEST_SRC), *init_flags,
                   "--", "--fd", str(guest.fileno()), "--task-dir", task_dir]
        self.proc = subprocess.Popen(command, pass_fds=(guest.fileno(), info_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        guest.close()
        os.close(info_w)
        try:
            self.init_host_pid = _read_info(info_r)["child-pid"]
        finally:
            os.close(info_r)
        self.host.settimeout(WAIT_S)
        self.next_id = 0

    def request(self, header: dict, blob: bytes = b"") -> tuple[dict, bytes]:
        self.next_id += 1
        header = {**header, "id": self.next_id}
        protocol.send_frame(self.host, header, blob)
        reply, reply_blob = protocol.recv_frame(self.host, protocol.GUEST_TYPES)
        assert reply["id"] == self.next_id
        return reply, reply_blob

    def load(self) -> None:
        reply, _ = self.request({"type": "ping"})
        assert reply["type"] == "pong"
        header = {"type": "init", "runtime": "python3", "handler": "main.handler", "filename": "main.py",
                  "env": {}, "memory_mb": 128, "timeout_s": 30, "function_name": "init-test", "function_version": "1"}
        reply, _ = self.request(header, textwrap.dedent(HANDLER).encode())
        assert reply["type"] == "init_ok", reply

    def call(self, event: dict) -> dict:
        reply, blob = self.request({"type": "exec", "invocation_id": f"inv-{self.next_id}", "deadline_ms": 29000},
                                   json.dumps(event).encode())
        assert reply["type"] == "result", reply
        return json.loads(blob)

    def wait(self) -> tuple[int, str]:
        """Init's exit status (bwrap passes it on) and its console output."""
        _, stderr = self.proc.communicate(timeout=WAIT_S)
        return self.proc.returncode, stderr.decode(errors="replace")

    def close(self) -> None:
        self.host.close()
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=WAIT_S)


def _read_info(fd: int) -> dict:
    """bwrap's --info-fd JSON (it names init's pid outside the namespace)."""
    data = b""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        with contextlib.suppress(ValueError):
            return json.loads(data)
    raise AssertionError(f"bwrap wrote no --info-fd JSON: {data!r}")


@pytest.fixture
def guest():
    machine = Guest()
    yield machine
    machine.close()


# ---------------------------------------------------------------------------------------------- tests


def test_init_is_pid_1_and_the_agent_answers(guest):
    guest.load()
    output = guest.call({"op": "echo", "n": 7})
    assert output["n"] == 7
    assert "nimbus.agent.init" in " ".join(output["pid1"])  # PID 1 of the namespace is init itself
    guest.host.close()
    code, console = guest.wait()
    assert code == 0, console
    assert "nimbus-init: running as pid 1" in console


def test_orphans_are_reaped(guest):
    guest.load()
    assert guest.call({"op": "orphan"}) == {"made": True}
    report = guest.call({"op": "states"})
    assert report["reparented_to"] == 1
    assert "Z" not in report["states"].values(), report
    assert str(report["orphan"]) not in report["states"]


def test_init_exits_with_the_agents_status_when_the_host_hangs_up(guest):
    guest.load()
    guest.host.close()
    code, console = guest.wait()
    assert code == 0, console
    assert "the agent exited with status 0" in console


def test_a_failing_agent_status_is_passed_on(guest):
    guest.host.sendall(b"\xff" * 16)  # a malformed frame: the agent exits with EXIT_PROTOCOL
    code, console = guest.wait()
    from nimbus.agent.main import EXIT_PROTOCOL

    assert code == EXIT_PROTOCOL, console
    assert f"the agent exited with status {EXIT_PROTOCOL}" in console


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_forwarded_and_init_exits_cleanly(guest, signum):
    guest.load()  # the agent is up and serving
    os.kill(guest.init_host_pid, signum)  # from outside the namespace, as the host would
    code, console = guest.wait()
    assert code == 0, console
    assert f"forwarding {signum.name} to the agent" in console
    assert f"the agent was killed by {signum.name}" in console
    guest.host.settimeout(WAIT_S)
    assert guest.host.recv(1) == b""  # the agent's end of the channel is gone


@pytest.mark.parametrize("poweroff", [False, True], ids=["no-poweroff", "poweroff-refused"])
def test_a_failed_mount_is_logged_and_ends_init_instead_of_hanging(poweroff):
    # Without capabilities init's first mount fails. Without CAP_SYS_BOOT its power-off is refused too,
    # and init falls back to exiting, which still ends the namespace.
    flags = ("--report-pid",) if poweroff else ("--no-poweroff", "--report-pid")
    no_caps = ("--cap-drop", "ALL") if os.geteuid() == 0 else ()  # root keeps its capabilities in bwrap
    machine = Guest(init_flags=flags, bwrap_args=(*no_caps, "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"))
    try:
        code, console = machine.wait()
        assert code == guest_init.EXIT_SETUP, console
        assert "cannot mount proc on /proc" in console
        assert ("cannot power off" in console) == poweroff
        machine.host.settimeout(WAIT_S)
        assert machine.host.recv(1) == b""  # no agent was started on the channel
    finally:
        machine.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="init's own mounts, lo and power-off need root (bwrap --cap-add)")
def test_as_root_init_mounts_brings_up_lo_and_powers_off_the_namespace():
    # No --proc/--dev/--tmpfs from bwrap: init mounts them itself. A tmpfs /var lets it create /var/task
    # under the read-only root; --unshare-net gives it a lo that starts down.
    machine = Guest(init_flags=("--report-pid", "--tmp-size", "16m", "--task-size", "8m"),
                    bwrap_args=("--unshare-net", "--cap-add", "ALL", "--tmpfs", "/var"), task_dir="/var/task")
    try:
        machine.load()
        report = machine.call({"op": "mounts"})
        mounts = {target: (fstype, options) for _, target, fstype, options in report["mounts"]}
        assert mounts["/proc"][0] == "proc"
        assert mounts["/sys"][0] == "sysfs"
        assert mounts["/dev"][0] == "devtmpfs"
        assert mounts["/tmp"][0] == "tmpfs" and "size=16384k" in mounts["/tmp"][1]
        assert mounts["/var/task"][0] == "tmpfs" and "size=8192k" in mounts["/var/task"][1]
        assert report["lo_up"]
        machine.host.close()
        code, console = machine.wait()
        # reboot(RB_POWER_OFF) by PID 1 of a pid namespace ends the namespace: the kernel kills its
        # init as if by SIGINT, which bwrap reports as 128 + SIGINT.
        assert "powering off" in console, console
        assert "cannot power off" not in console, console
        assert code in (128 + signal.SIGINT, -signal.SIGINT), console
    finally:
        machine.close()


# ---------------------------------------------------------------------------------------------- arguments


def test_defaults_start_the_vsock_agent_and_power_off():
    options = guest_init.parse_args([])
    assert options.mounts and options.poweroff and not options.report_pid
    assert options.agent_args == ["--vsock-port", "9999", "--task-dir", "/var/task"]
    assert (options.tmp_size, options.task_size) == (guest_init.DEFAULT_TMP_SIZE, guest_init.DEFAULT_TASK_SIZE)


def test_flags_and_passthrough():
    options = guest_init.parse_args(["--no-mounts", "--no-poweroff", "--tmp-size=1g", "--task-size", "50%",
                                     "--", "--fd", "3", "--no-mounts"])
    assert not options.mounts and not options.poweroff
    assert (options.tmp_size, options.task_size) == ("1g", "50%")
    assert options.agent_args == ["--fd", "3", "--no-mounts"]  # after "--" everything is the agent's
    assert guest_init.parse_args(["--"]).agent_args == []


def test_a_layer_device_is_taken_before_the_agent_s_arguments():
    options = guest_init.parse_args(["--layer", "/dev/vdb", "--", "--fd", "3"])
    assert options.layer == "/dev/vdb" and options.agent_args == ["--fd", "3"]
    assert guest_init.parse_args(["--layer=/dev/vdc"]).layer == "/dev/vdc"
    assert guest_init.parse_args([]).layer is None


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4")
                    or not shutil.which("unshare"),
                    reason="mounting a layer image needs root, losetup, mkfs.ext4 and unshare")
def test_the_layer_is_mounted_read_only_nosuid_and_nodev(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "six.py").write_text("x = 1\n")
    image = tmp_path / "layer.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"], check=True, timeout=WAIT_S)
    attach = subprocess.run(["losetup", "--find", "--show", "--read-only", str(image)], capture_output=True,
                            text=True, timeout=WAIT_S)
    if attach.returncode != 0:
        pytest.skip(f"no loop device here: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    target = tmp_path / "opt-layer"
    script = textwrap.dedent(f"""
        import errno, json, sys
        sys.path.insert(0, {str(SRC)!r})
        from nimbus.agent import init
        init.mount_layer({device!r}, {str(target)!r})
        try:
            open({str(target / "written")!r}, "w")
            wrote = "yes"
        except OSError as exc:
            wrote = errno.errorcode[exc.errno]
        options = [line.split()[5] for line in open("/proc/self/mountinfo") if line.split()[4] == {str(target)!r}]
        print(json.dumps({{"six": open({str(target / "six.py")!r}).read(), "wrote": wrote, "options": options}}))
    """)
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=WAIT_S)
    finally:
        subprocess.run(["losetup", "--detach", device], timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["six"] == "x = 1\n" and found["wrote"] == "EROFS"
    assert set(found["options"][0].split(",")) >= {"ro", "nosuid", "nodev"}, found


def test_a_layer_that_cannot_be_mounted_is_a_setup_error(tmp_path):
    with pytest.raises(guest_init.SetupError, match="cannot mount the layer /dev/nimbus-no-such-device"):
        guest_init.mount_layer("/dev/nimbus-no-such-device", str(tmp_path / "layer"))


@pytest.mark.parametrize("argv", [["--bogus"], ["--tmp-size"], ["--tmp-size", "lots"], ["--no-mounts=1"],
                                  ["--layer"], ["--layer", "vdb"], ["--layer", "/dev/../etc/shadow"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(ValueError):
        guest_init.parse_args(argv)


def test_a_bad_command_line_exits_with_usage_under_no_poweroff():
    result = subprocess.run([sys.executable, "-c", LAUNCH, "--no-poweroff", "--bogus"], capture_output=True,
                            timeout=WAIT_S, env=ENV)
    assert result.returncode == guest_init.EXIT_USAGE
    assert b"unknown argument '--bogus'" in result.stderr
