"""The host's side of Firecracker's hybrid vsock, and the agent's vsock mode.

There is no Firecracker binary or KVM here, so the Firecracker end is a TEST STAND-IN
(:class:`FirecrackerVsockStandIn`): a Unix-socket server that answers ``CONNECT <port>\\n`` the way
Firecracker's vsock documentation says its device does for host-initiated connections, and bridges the
connection to a REAL agent process (launched as the bwrap driver launches it, minus the sandbox, with
one end of a socketpair as its fd). Everything else — ``nimbus.machines.firecracker.vsock.connect``, the frames, the
agent and a python3 handler — is the real thing.

The agent's own AF_VSOCK listener is tested for real where the kernel can loop vsock back to itself
(``CONFIG_VSOCKETS_LOOPBACK``); elsewhere that test is skipped with the reason, and what can run without
a peer (binding the port, the errors) still does.

The shared pieces (the CONNECT handling, launching the agent, the frames sent) live in ``tests/standin``,
where the stand-in Firecracker executable (``tests/integration/test_standin.py``) uses them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nimbus import protocol
from nimbus.agent import main as agent_main
from nimbus.agent.contract import VSOCK_PORT
from nimbus.errors import MachineStartError
from nimbus.machines.firecracker import vsock
from standin import muxer
from standin.agent import LAUNCH, SANDBOX_ENV, SRC, start_agent
from standin.frames import exchange, exec_header, handler_code, init_header, ping_init_exec, streams

pytestmark = pytest.mark.firecracker

WAIT_S = 30.0  # generous bound for anything that should happen at once; never asserted on
QUICK_S = 0.5  # connect() timeout in tests that expect it to give up
RETRY_S = 0.005
HOST_PORT_BASE = muxer.HOST_PORT_BASE
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF


# ------------------------------------------------------------------ the stand-in for Firecracker


class FirecrackerVsockStandIn:
    """TEST STAND-IN for the host side of Firecracker's vsock device; not Firecracker.

    Listens on ``uds_path`` and, for each connection, reads the ``CONNECT <port>\\n`` line, then:

    * a line that is not a CONNECT, or a port other than ``guest_port`` (no guest listener there):
      closes the connection without a word, as Firecracker does when the guest refuses;
    * the first ``refuse`` CONNECTs to ``guest_port`` (the guest agent is not listening yet): closes too;
    * with ``reply`` set: writes those bytes instead of an acknowledgement, then closes when
      ``close_after_reply`` or else waits for the host to hang up (a misbehaving or hung device);
    * otherwise: starts a real agent process (the guest's listener accepting), answers
      ``OK <host port>\\n`` (followed by ``trailing``, if any, in the same write) and copies bytes both
      ways between the host's connection and the agent until both sides are done.
    """

    def __init__(self, uds_path: Path, task_root: Path, *, guest_port: int = VSOCK_PORT, refuse: int = 0,
                 reply: bytes | None = None, close_after_reply: bool = True, trailing: bytes = b"",
                 bridge: bool = True) -> None:
        self.uds_path = uds_path
        self.task_root = task_root
        self.guest_port = guest_port
        self.refuse = refuse
        self.reply = reply
        self.close_after_reply = close_after_reply
        self.trailing = trailing
        self.bridge = bridge
        self.connections = 0  # Unix connections accepted
        self.requests: list[bytes] = []  # the CONNECT lines received, as sent
        self.attempts = 0  # CONNECTs to guest_port
        self.agents: list[asyncio.subprocess.Process] = []
        self.agent_stderr: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen at ``uds_path`` (or on ``sock``, a Unix socket already bound there)."""
        if sock is None:
            self.server = await asyncio.start_unix_server(self._track, path=str(self.uds_path))
        else:
            self.server = await asyncio.start_unix_server(self._track, sock=sock)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for proc in self.agents:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            pass  # close() ended it; a cancelled handler task would be reported by asyncio's streams
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        line = await muxer.read_connect(reader)
        if line is None:
            return
        self.requests.append(line)
        if muxer.parse_connect(line) != self.guest_port:
            return
        self.attempts += 1
        if self.attempts <= self.refuse:
            return
        if self.reply is not None:
            writer.write(self.reply)
            await writer.drain()
            if not self.close_after_reply:
                await reader.read()  # until the host gives up and hangs up
            return
        if not self.bridge:
            writer.write(muxer.ok_line(HOST_PORT_BASE + self.attempts) + self.trailing)
            await writer.drain()
            await reader.read()
            return
        proc, agent_end = await start_agent(Path(tempfile.mkdtemp(dir=self.task_root)))
        self.agents.append(proc)
        writer.write(muxer.ok_line(HOST_PORT_BASE + self.attempts) + self.trailing)
        await writer.drain()
        await muxer.bridge(reader, writer, agent_end)


@pytest.fixture
def short_dir():
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be long."""
    path = Path(tempfile.mkdtemp(prefix="nv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def standins(short_dir):
    """Make stand-ins at ``short_dir/v.sock`` (not yet listening); all are closed after the test."""
    made: list[FirecrackerVsockStandIn] = []

    def make(**kwargs) -> FirecrackerVsockStandIn:
        standin = FirecrackerVsockStandIn(short_dir / "v.sock", short_dir, **kwargs)
        made.append(standin)
        return standin

    yield make
    for standin in made:
        await standin.close()




def retry_records(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.name == "nimbus.machines.vsock"]
    return [m for m in messages if "retrying" in m]


async def until(predicate, what: str) -> None:
    """Wait for ``predicate()`` (polled); fail after WAIT_S. Ordering, never a timing assertion."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(RETRY_S)


# ------------------------------------------------------------------ handshake, then frames


async def test_handshake_then_ping_init_exec_through_the_bridge(standins):
    standin = standins()
    await standin.start()
    sock = await vsock.connect(standin.uds_path, timeout=WAIT_S, retry_interval=RETRY_S)
    assert standin.requests == [b"CONNECT 9999\n"]
    assert not sock.getblocking() and sock.family == socket.AF_UNIX
    async with streams(sock) as (reader, writer):
        result = await ping_init_exec(reader, writer)
        assert result["doubled"] == 42 and result["function"] == "doubler"
        assert result["pid"] == standin.agents[0].pid  # answered by the real agent process behind the stand-in
    # The host hung up: the agent sees the end of its stream and exits cleanly.
    async with asyncio.timeout(WAIT_S):
        assert await standin.agents[0].wait() == agent_main.EXIT_OK


async def test_retries_until_the_agent_listens(standins, caplog):
    caplog.set_level(logging.DEBUG, logger="nimbus.machines.vsock")
    standin = standins(refuse=3)
    await standin.start()
    sock = await vsock.connect(standin.uds_path, timeout=WAIT_S, retry_interval=RETRY_S)
    assert standin.attempts == 4  # three closed without OK, the fourth answered
    assert len(standin.agents) == 1
    assert len(retry_records(caplog)) == 3
    assert all("closed without answering CONNECT" in m for m in retry_records(caplog))
    async with streams(sock) as (reader, writer):
        reply, _ = await exchange(reader, writer, {"type": "ping", "id": 7})
        assert reply["type"] == "pong"


async def test_socket_file_appears_late(standins, caplog):
    caplog.set_level(logging.DEBUG, logger="nimbus.machines.vsock")
    standin = standins()
    connecting = asyncio.create_task(vsock.connect(standin.uds_path, timeout=WAIT_S, retry_interval=RETRY_S))
    await until(lambda: retry_records(caplog) or connecting.done(), "an attempt on the missing socket")
    assert not connecting.done()
    assert not standin.uds_path.exists()
    await standin.start()  # Firecracker creates the socket when its device comes up
    sock = await connecting
    with sock:
        assert standin.attempts == 1
        assert "No such file" in retry_records(caplog)[0]


async def test_socket_file_without_a_listener_is_retried(standins, caplog):
    caplog.set_level(logging.DEBUG, logger="nimbus.machines.vsock")
    standin = standins()
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(standin.uds_path))  # the file exists, but nothing listens: ECONNREFUSED
    try:
        connecting = asyncio.create_task(vsock.connect(standin.uds_path, timeout=WAIT_S, retry_interval=RETRY_S))
        await until(lambda: retry_records(caplog) or connecting.done(), "a refused attempt")
        assert not connecting.done()
        assert "refused" in retry_records(caplog)[0]
        await standin.start(sock=bound)  # listen() on the same socket
    except BaseException:
        bound.close()
        raise
    sock = await connecting
    with sock:
        assert standin.attempts == 1


async def test_bytes_after_the_ok_line_are_the_frame_streams(standins):
    early = protocol.encode({"type": "pong", "id": 0})
    standin = standins(trailing=early, bridge=False)
    await standin.start()
    sock = await vsock.connect(standin.uds_path, timeout=WAIT_S, retry_interval=RETRY_S)
    async with streams(sock) as (reader, _):
        async with asyncio.timeout(WAIT_S):
            header, blob = await protocol.read_frame(reader, protocol.GUEST_TYPES)
    assert header == {"type": "pong", "id": 0} and blob == b""


async def test_another_port_is_asked_for(standins):
    standin = standins(guest_port=52)
    await standin.start()
    sock = await vsock.connect(standin.uds_path, port=52, timeout=WAIT_S, retry_interval=RETRY_S)
    with sock:
        assert standin.requests == [b"CONNECT 52\n"]


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    ("reply", "close", "expected"),
    [
        (b"NOPE\n", False, "answered b'NOPE\\n'"),
        (b"OK abc\n", False, "answered b'OK abc\\n'"),
        (b"OK \n", False, "answered b'OK \\n'"),
        (b"OK 12 34\n", False, "answered b'OK 12 34\\n'"),
        (b"OK 4294967296\n", False, "answered b'OK 4294967296\\n'"),  # over u32
        (b"ok 1073741824\n", False, "answered b'ok 1073741824\\n'"),
        (b"OK 1073741824\r\n", False, "answered b'OK 1073741824\\r\\n'"),
        (b"OK " + b"1" * 40 + b"\n", False, f"no newline in the first {vsock.ACK_MAX_BYTES} bytes"),
        (b"OK 12", True, "closed the connection after answering b'OK 12'"),
    ],
    ids=["nope", "not-decimal", "no-port", "two-words", "over-u32", "lower-case", "crlf", "no-newline", "cut-short"],
)
async def test_an_answer_that_is_not_ok_fails_at_once(standins, reply, close, expected):
    standin = standins(reply=reply, close_after_reply=close)
    await standin.start()
    with pytest.raises(MachineStartError) as caught:
        await vsock.connect(standin.uds_path, timeout=WAIT_S, retry_interval=RETRY_S)
    message = str(caught.value)
    assert expected in message
    assert str(standin.uds_path) in message
    assert standin.attempts == 1  # a wrong answer is a broken machine, not a slow one: no retry


async def test_never_listening_times_out(standins, caplog):
    caplog.set_level(logging.DEBUG, logger="nimbus.machines.vsock")
    standin = standins(refuse=10**9)  # the agent never comes up: every CONNECT is closed without OK
    await standin.start()
    with pytest.raises(MachineStartError) as caught:
        await vsock.connect(standin.uds_path, timeout=QUICK_S, retry_interval=RETRY_S)
    message = str(caught.value)
    assert str(standin.uds_path) in message and "guest port 9999 not reachable" in message
    assert "closed without answering CONNECT" in message
    assert standin.attempts >= 1 and not standin.agents
    counted = int(re.search(r"\((\d+) attempts?;", message)[1])
    # The client counted what the stand-in saw, plus perhaps one cut short by the deadline before its CONNECT.
    assert standin.attempts <= counted <= standin.attempts + 1


async def test_wrong_port_is_closed_until_timeout(standins):
    standin = standins()  # the agent listens on 9999 only
    await standin.start()
    with pytest.raises(MachineStartError, match="guest port 1234 not reachable"):
        await vsock.connect(standin.uds_path, port=1234, timeout=QUICK_S, retry_interval=RETRY_S)
    assert standin.requests and all(line == b"CONNECT 1234\n" for line in standin.requests)
    assert standin.attempts == 0 and not standin.agents


async def test_no_answer_at_all_times_out(standins):
    standin = standins(reply=b"", close_after_reply=False)  # accepts, reads CONNECT, says nothing
    await standin.start()
    with pytest.raises(MachineStartError) as caught:
        await vsock.connect(standin.uds_path, timeout=QUICK_S, retry_interval=RETRY_S)
    assert "waiting for the answer to CONNECT when time ran out" in str(caught.value)
    assert standin.attempts == 1


async def test_socket_file_never_appears(short_dir):
    path = short_dir / "v.sock"
    with pytest.raises(MachineStartError) as caught:
        await vsock.connect(path, timeout=QUICK_S, retry_interval=RETRY_S)
    assert str(path) in str(caught.value) and "No such file" in str(caught.value)


async def test_a_path_that_cannot_be_a_socket_fails_at_once(short_dir):
    path = short_dir / ("x" * 200)  # longer than sun_path holds: no retry can fix it
    with pytest.raises(MachineStartError, match="connecting failed"):
        await vsock.connect(path, timeout=WAIT_S, retry_interval=RETRY_S)


async def test_cancelling_closes_the_attempt(standins):
    standin = standins(reply=b"", close_after_reply=False)
    await standin.start()
    connecting = asyncio.create_task(vsock.connect(standin.uds_path, timeout=WAIT_S, retry_interval=RETRY_S))
    await until(lambda: standin.attempts == 1, "the CONNECT")
    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting
    # The stand-in sees the host hang up (its handler ends) instead of a socket left open.
    await until(lambda: not standin._handlers, "the stand-in to see the hang-up")


def test_port_out_of_range():
    with pytest.raises(ValueError):
        asyncio.run(vsock.connect("/nonexistent", port=-1, timeout=QUICK_S))
    with pytest.raises(ValueError):
        asyncio.run(vsock.connect("/nonexistent", port=0xFFFFFFFF, timeout=QUICK_S))


# ------------------------------------------------------------------ the agent's --vsock-port


def test_parse_vsock_port():
    options = agent_main.parse_args(["--vsock-port", "9999", "--task-dir", "/var/task", "--seal-fd", "5"])
    assert (options.vsock_port, options.task_dir, options.seal_fd) == (9999, "/var/task", 5)
    assert agent_main.parse_args(["--vsock-port=52"]).vsock_port == 52
    assert agent_main.parse_args(["--vsock-port", "4294967294"]).vsock_port == 0xFFFFFFFE
    assert agent_main.parse_args([]).vsock_port is None  # the fd mode stays the default
    assert agent_main.parse_args(["--fd", "7"]).vsock_port is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--vsock-port"],
        ["--vsock-port", "abc"],
        ["--vsock-port", "-1"],
        ["--vsock-port", ""],
        ["--vsock-port", "+5"],
        ["--vsock-port", "1_000"],
        ["--vsock-port", "\u0661\u0662"],  # Arabic-Indic digits: int() takes them, a port number is ASCII
        ["--vsock-port", "4294967295"],  # VMADDR_PORT_ANY
        ["--vsock-port", "9999", "--fd", "3"],
        ["--fd=3", "--vsock-port=9999"],
    ],
)
def test_parse_vsock_port_refuses(argv):
    with pytest.raises(ValueError):
        agent_main.parse_args(argv)


def run_agent(args: list[str], prelude: str = "", **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", prelude + LAUNCH, *args],
        env=SANDBOX_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs,
    )


def test_agent_refuses_fd_and_vsock_port_together(tmp_path):
    proc = run_agent(["--fd", "3", "--vsock-port", "9999", "--task-dir", str(tmp_path)])
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == agent_main.EXIT_USAGE
    assert b"exclusive" in stderr and b"--vsock-port PORT" in stderr


def test_agent_without_af_vsock_says_so(tmp_path):
    # A Python (or guest) without AF_VSOCK: the agent must say what is missing and exit with its own code.
    no_vsock = "import socket; del socket.AF_VSOCK; "
    proc = run_agent(["--vsock-port", "9999", "--task-dir", str(tmp_path)], prelude=no_vsock)
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == agent_main.EXIT_UNAVAILABLE
    assert b"--vsock-port 9999" in stderr and b"AF_VSOCK" in stderr


def _vsock_socket() -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        pytest.skip("this Python has no AF_VSOCK")
    try:
        return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"this kernel has no AF_VSOCK sockets: {exc}")


def free_vsock_port() -> int:
    with _vsock_socket() as probe:
        probe.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
        return probe.getsockname()[1]


def test_agent_binds_its_vsock_port(tmp_path):
    """Without a peer the agent still listens for real: its port is taken while it waits for the host."""
    port = free_vsock_port()
    proc = run_agent(["--vsock-port", str(port), "--task-dir", str(tmp_path)])
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            with _vsock_socket() as other:
                try:
                    other.bind((VMADDR_CID_ANY, port))
                except OSError as exc:
                    assert exc.errno == errno.EADDRINUSE
                    break
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the agent never bound its vsock port"
            time.sleep(RETRY_S)
        assert proc.poll() is None  # waiting in accept() for the host, as a guest's agent does
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT_S)


def test_agent_port_taken(tmp_path):
    port = free_vsock_port()
    with _vsock_socket() as holder:
        holder.bind((VMADDR_CID_ANY, port))
        holder.listen(1)
        proc = run_agent(["--vsock-port", str(port), "--task-dir", str(tmp_path)])
        _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == agent_main.EXIT_CHANNEL
    assert f"vsock port {port}".encode() in stderr and b"in use" in stderr


def vsock_loopback() -> tuple[int | None, str]:
    """(the CID at which this kernel reaches its own vsock listeners, "") or (None, why it cannot).

    Asks /dev/vsock for the local CID and connects to a listener of ours there: with the loopback
    transport that stays inside the kernel; without it, the kernel refuses (ENODEV) rather than send
    it anywhere. (CID 1, VMADDR_CID_LOCAL, is not tried: without a loopback transport a guest kernel
    hands it to the hypervisor.)
    """
    if not hasattr(socket, "AF_VSOCK"):
        return None, "this Python has no AF_VSOCK"
    try:
        with open("/dev/vsock", "rb") as dev:
            raw = fcntl.ioctl(dev, socket.IOCTL_VM_SOCKETS_GET_LOCAL_CID, bytes(4))
    except OSError as exc:
        return None, f"cannot ask /dev/vsock for the local CID: {exc}"
    cid = struct.unpack("I", raw)[0]
    if cid == VMADDR_CID_ANY:
        return None, "no vsock transport is loaded"
    try:
        with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as listener, \
                socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
            listener.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
            listener.listen(1)
            client.settimeout(2.0)
            client.connect((cid, listener.getsockname()[1]))
            listener.accept()[0].close()
    except OSError as exc:
        return None, (f"this kernel does not loop vsock back (connect to its own CID {cid}: {exc}); "
                      "it needs CONFIG_VSOCKETS_LOOPBACK")
    return cid, ""


def test_agent_over_real_vsock(tmp_path):
    cid, reason = vsock_loopback()
    if cid is None:
        pytest.skip(reason)
    port = free_vsock_port()
    proc = run_agent(["--vsock-port", str(port), "--task-dir", str(tmp_path)])
    try:
        deadline = time.monotonic() + WAIT_S
        while True:  # until the agent listens (a refused or reset connect before that)
            conn = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            conn.settimeout(WAIT_S)
            try:
                conn.connect((cid, port))
                break
            except OSError:
                conn.close()
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "the agent never accepted on its vsock port"
                time.sleep(RETRY_S)
        with conn:
            protocol.send_frame(conn, {"type": "ping", "id": 1})
            assert protocol.recv_frame(conn, protocol.GUEST_TYPES)[0] == {"type": "pong", "id": 1}
            protocol.send_frame(conn, init_header(2), handler_code())
            reply, _ = protocol.recv_frame(conn, protocol.GUEST_TYPES)
            assert reply["type"] == "init_ok", reply
            protocol.send_frame(conn, exec_header(3), json.dumps({"n": 4}).encode())
            reply, output = protocol.recv_frame(conn, protocol.GUEST_TYPES)
            assert reply["type"] == "result", reply
            assert json.loads(output)["doubled"] == 8 and json.loads(output)["pid"] == proc.pid
        # One connection, and its end is the agent's end, as in the fd mode.
        _, stderr = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == agent_main.EXIT_OK, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=WAIT_S)


def test_agent_fd_mode_does_not_import_socket():
    """The fd mode's start-up stays free of the socket module; only --vsock-port pays for it."""
    code = (f"import sys; sys.path.insert(0, {str(SRC)!r}); import nimbus.agent.main; "
            "print('socket' in sys.modules)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], env=SANDBOX_ENV, capture_output=True, text=True,
                         timeout=WAIT_S, check=True).stdout
    assert out.strip() == "False"
