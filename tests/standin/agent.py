"""Launching the REAL guest agent (``nimbus.agent.main``) as a plain host process, for the stand-ins.

Two ways, both with an environment like a sandbox's and ``SRC`` (the repository's ``src``) found from
this file, so a clone anywhere works:

* :func:`start_agent` — as the bwrap driver starts it, minus the sandbox: ``python3 -I -S -c LAUNCH
  --fd N --task-dir DIR`` with one end of a socketpair as fd N. In that mode the agent serves that one
  channel and exits at its end.
* :func:`start_listening_agent` — as a Firecracker guest runs it, ``--vsock-port 9999``, with only the
  address family swapped: ``python3 -I -S -c LISTEN_LAUNCH SOCKET --vsock-port 9999 --task-dir DIR``.
  The launcher replaces ``nimbus.agent.main.listen_vsock`` with a function that returns an AF_UNIX
  stream socket bound and listening at ``SOCKET``, then calls the real ``main()``: its ``_listen_host``,
  ``serve_listener`` and ``Agent`` run unchanged, keeping the listener for the process's whole life and
  serving each connection made to it in turn (a connection's end is followed by the next accept).
  With ``own_network`` (what the stand-in Firecracker asks for) it runs in a network namespace of its
  own holding only ``lo``, brought up as the guest's init does: a guest's loopback, so a function's
  servers on it (a ``provided`` function's Runtime API at 127.0.0.1:9001) neither clash across machines
  nor are reachable from the host. Made as root with ``unshare(CLONE_NEWNET)``, otherwise inside a user
  namespace mapping the caller's own uid and gid; where neither is allowed the agent keeps the host's
  network (and says so on its stderr).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
LAUNCH = f"import sys; sys.path.insert(0, {str(SRC)!r}); from nimbus.agent.main import main; main(sys.argv[1:])"
AGENT_PORT = 9999  # the guest port the agent listens on (docs/architecture.md#frame-protocol)
LISTEN_BACKLOG = 1  # what nimbus.agent.channel.listen_vsock asks for
LISTEN_LAUNCH = f"""\
import socket, sys
sys.path.insert(0, {str(SRC)!r})
import nimbus.agent.main as agent_main
_path = sys.argv[1]
def listen_vsock(port, cid=None):
    # The stand-in guest's AF_VSOCK: a Unix stream socket at the path the launcher was given.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(_path)
        listener.listen({LISTEN_BACKLOG})
    except BaseException:
        listener.close()
        raise
    return listener
agent_main.listen_vsock = listen_vsock
agent_main.main(sys.argv[2:])
"""
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


def agent_argv(fd: int, task_dir: str | Path) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", LAUNCH, "--fd", str(fd), "--task-dir", str(task_dir)]


def listening_agent_argv(socket_path: str | Path, task_dir: str | Path, port: int = AGENT_PORT) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", LISTEN_LAUNCH, str(socket_path),
            "--vsock-port", str(port), "--task-dir", str(task_dir)]


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000  # <linux/sched.h>
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # as nimbus.agent.init's loopback_up


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (even by SIGKILL)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def own_network() -> bool:
    """In the child before exec: move into a new network namespace and bring its ``lo`` up, as a guest's
    init does. False (nothing changed) where this host allows no such namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            return False
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
    return True


def _prepare(die_with_parent: bool, network: bool) -> None:
    if die_with_parent:
        _die_with_parent()
    if network and not own_network():
        os.write(2, b"standin agent: no network namespace allowed here: the guest shares the host's network\n")


async def _spawn(argv: list[str], *, pass_fds=(), stderr, die_with_parent: bool,
                 network: bool = False) -> asyncio.subprocess.Process:
    preexec = (lambda: _prepare(die_with_parent, network)) if die_with_parent or network else None
    return await asyncio.create_subprocess_exec(
        *argv, pass_fds=pass_fds, env=SANDBOX_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=stderr, preexec_fn=preexec,
    )


async def start_agent(task_dir: str | Path, *, stderr=subprocess.DEVNULL, die_with_parent: bool = False,
                      ) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """A real agent process serving one end of a socketpair; returns it and the other end (ours).

    ``die_with_parent``: the agent is killed when the calling process dies, however it dies (a guest
    does not outlive its VMM).
    """
    ours, theirs = socket.socketpair()
    try:
        with theirs:
            proc = await _spawn(agent_argv(theirs.fileno(), task_dir), pass_fds=(theirs.fileno(),),
                                stderr=stderr, die_with_parent=die_with_parent)
    except BaseException:
        ours.close()
        raise
    return proc, ours


async def start_listening_agent(socket_path: str | Path, task_dir: str | Path, *, stderr=subprocess.DEVNULL,
                                die_with_parent: bool = False, own_network: bool = False,
                                ) -> asyncio.subprocess.Process:
    """A real agent process in its ``--vsock-port`` mode, listening on a Unix socket at ``socket_path``.

    ``socket_path`` is bound by the agent itself, relative to the caller's working directory (which
    the agent inherits) when relative; it must not exist (the bind would fail and the agent exit 1).
    It listens once its imports are done, a few tens of milliseconds after this returns: until then a
    connection to ``socket_path`` is refused (or finds no file). The socket file is left behind when
    the agent exits (it ends with ``os._exit``): the caller removes it. ``die_with_parent`` as for
    :func:`start_agent`; the stand-in Firecracker asks for it, so no guest outlives its VMM. ``own_network``:
    a network namespace with only ``lo`` (the module's docstring); the stand-in Firecracker asks for it too.
    """
    return await _spawn(listening_agent_argv(socket_path, task_dir), stderr=stderr,
                        die_with_parent=die_with_parent, network=own_network)
