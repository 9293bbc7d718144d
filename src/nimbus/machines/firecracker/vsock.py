"""The host's end of Firecracker's hybrid vsock: a stream socket to the guest agent's port.

Why. A microVM has no socketpair to inherit: Firecracker emulates a virtio-vsock device and exposes
it on the host as one AF_UNIX socket (``uds_path`` in its ``/vsock`` configuration). To reach a port
the guest listens on, the host connects to that Unix socket, names the port in a one-line text
command, and Firecracker acknowledges with one line carrying the port it gave the host's end; after
that line the Unix connection carries the guest's bytes both ways, and the frames of
``nimbus.protocol`` (docs/architecture.md#frame-protocol) run over it exactly as over the bwrap driver's socketpair.

:func:`connect` does that handshake::

    host → Firecracker   CONNECT 9999\\n
    Firecracker → host   OK 1073741824\\n        (the number is the host end's vsock port)

and retries, until ``timeout``, while the guest is not ready yet, which during a boot looks like:

* the socket file does not exist yet (Firecracker creates it when the device comes up), or exists
  but nothing accepts on it (``ECONNREFUSED``);
* Firecracker accepts, then closes the connection without a byte (or resets it): nothing in the
  guest listens on the port yet — the agent is still starting.

Anything else it answers is a broken machine, not a slow one, and fails at once with
:class:`~nimbus.errors.MachineStartError` naming the socket and the bytes received: an answer that
is not ``OK <decimal port>\\n``, one with no newline within :data:`ACK_MAX_BYTES`, or one cut short
by the end of the stream.

The answer is read one byte at a time up to its newline, so nothing after it is consumed: those bytes
already belong to the frame stream (the agent never speaks first, so there are none in practice, but
a buffered read would silently eat the head of a frame if one ever came).

The returned socket is connected and non-blocking, ready for ``asyncio.open_unix_connection(sock=…)``
as :class:`nimbus.machines.bwrap.machine.BwrapMachine` does with its socketpair end.

Snapshots. Firecracker resets the vsock device when a snapshot is taken: connections open at that
moment are closed in the restored VM, while the guest's listening sockets keep working. So a
connection is never carried across a snapshot: connect again after every snapshot and restore. The
agent (``--vsock-port``) keeps its listener for the machine's life and serves each connection in turn.

What was exercised here: the handshake, retries and failures against a test stand-in for
Firecracker's vsock muxer (a Unix server that behaves as Firecracker's vsock documentation describes
and bridges to a real agent process); no real Firecracker or KVM.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket

from nimbus.agent.contract import VSOCK_PORT
from nimbus.errors import MachineStartError
from nimbus.machines.base import DEFAULT_START_TIMEOUT_S

log = logging.getLogger("nimbus.machines.vsock")

DEFAULT_CONNECT_TIMEOUT_S = DEFAULT_START_TIMEOUT_S  # connecting is most of a machine's start
# A failed attempt costs one Unix connect and a guest round trip, so retry often: the agent listens
# within milliseconds of a snapshot restore and every pause is added to the cold start.
RETRY_INTERVAL_S = 0.01
ACK_MAX_BYTES = 32  # "OK 4294967295\n" is 14 bytes; anything longer is not an acknowledgement
PORT_MAX = 0xFFFFFFFF  # vsock ports are u32
_ACK = re.compile(rb"OK ([0-9]{1,10})\n")  # re's [0-9] on bytes: ASCII digits only, unlike int()
# What Firecracker (or the kernel) says while the device or the guest listener is not up yet.
_NOT_YET_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN,
                             errno.EAGAIN})


class _NotYet(Exception):
    """This attempt found the guest not ready; the message says how. Try again."""


async def connect(
    uds_path: str | os.PathLike[str],
    port: int = VSOCK_PORT,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    retry_interval: float = RETRY_INTERVAL_S,
) -> socket.socket:
    """Open a stream to guest ``port`` through Firecracker's vsock socket at ``uds_path``.

    Retries every ``retry_interval`` seconds while the guest is not ready (see the module's
    docstring) until ``timeout`` seconds have passed in all; then, or at once on an answer that is
    not an acknowledgement, raises :class:`~nimbus.errors.MachineStartError`. Returns the connected,
    non-blocking socket, positioned at the first byte after the ``OK`` line; the caller owns it.
    """
    if not 0 <= port < PORT_MAX:  # PORT_MAX itself is VMADDR_PORT_ANY, not a port one can connect to
        raise ValueError(f"vsock port {port} is out of range")
    path = os.fspath(uds_path)
    request = f"CONNECT {port}\n".encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    attempts = 0
    last = ""
    while True:
        attempts += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        stage = ["connecting"]
        try:
            async with asyncio.timeout_at(deadline):
                host_port = await _handshake(loop, sock, path, request, stage)
        except _NotYet as exc:
            sock.close()
            last = str(exc)
            if loop.time() + retry_interval < deadline:
                log.debug("vsock %s: attempt %d: %s; retrying", path, attempts, last)
        except TimeoutError:
            sock.close()
            before = f"; before that: {last}" if attempts > 1 else ""
            raise MachineStartError(
                f"vsock {path}: guest port {port} not reachable within {timeout:g}s ({_attempts(attempts)}; "
                f"{stage[0]} when time ran out{before})"
            ) from None
        except BaseException:
            sock.close()
            raise
        else:
            log.debug("vsock %s: connected to guest port %d as host port %d (attempt %d)", path, port, host_port,
                      attempts)
            return sock
        if loop.time() + retry_interval >= deadline:
            raise MachineStartError(
                f"vsock {path}: guest port {port} not reachable within {timeout:g}s ({_attempts(attempts)}; "
                f"the last: {last})"
            )
        await asyncio.sleep(retry_interval)


def _attempts(count: int) -> str:
    return "1 attempt" if count == 1 else f"{count} attempts"


async def _handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, path: str, request: bytes,
                     stage: list[str]) -> int:
    """One attempt: connect, send ``CONNECT``, read the acknowledgement; return the host end's port.

    ``stage[0]`` says what the attempt was doing, for the error should the deadline cut it short.
    """
    try:
        await loop.sock_connect(sock, path)
        stage[0] = "sending CONNECT"
        await loop.sock_sendall(sock, request)
        stage[0] = "waiting for the answer to CONNECT"
        answer = bytearray()
        while len(answer) < ACK_MAX_BYTES:
            # One byte at a time: whatever follows the newline is the frame stream's, not ours.
            byte = await loop.sock_recv(sock, 1)
            if not byte:
                break
            answer += byte
            if byte == b"\n":
                break
    except OSError as exc:
        if exc.errno in _NOT_YET_ERRNOS:
            raise _NotYet(f"{stage[0]}: {exc.strerror or exc}") from None
        raise MachineStartError(f"vsock {path}: {stage[0]} failed: {exc}") from exc
    if not answer:
        raise _NotYet("closed without answering CONNECT (nothing listens on the guest port yet)")
    match = _ACK.fullmatch(answer)
    if match is None or int(match[1]) > PORT_MAX:
        if not answer.endswith(b"\n") and len(answer) >= ACK_MAX_BYTES:
            what = f"no newline in the first {ACK_MAX_BYTES} bytes of its answer {bytes(answer)!r}"
        elif not answer.endswith(b"\n"):
            what = f"closed the connection after answering {bytes(answer)!r}"
        else:
            what = f"answered {bytes(answer)!r}"
        raise MachineStartError(f"vsock {path}: expected 'OK <port>\\n' after {request!r}; {what}")
    return int(match[1])
