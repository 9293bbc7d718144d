"""A byte stream over raw file descriptors, shaped like the socket methods ``nimbus.protocol`` calls.

The agent's channel to the host is a connected socket (a socketpair end, or a vsock under Firecracker)
and its channel to the node runner is a pair of pipes. Plain ``os.read``/``os.write`` serve all of them,
and skipping the ``socket`` module saves several milliseconds of start-up in every machine.

Under Firecracker the agent has no inherited fd: :func:`listen_vsock` listens on a vsock port and
:func:`accept` takes each connection the host makes (through Firecracker's Unix socket, see
``nimbus.machines.firecracker.vsock``) as an :class:`FdStream`; only that mode imports ``socket``.
"""

import os

from nimbus import protocol

PREFIX_SIZE = protocol.PREFIX.size
VMADDR_CID_ANY = 0xFFFFFFFF  # listen on whatever CID the VM was given (socket.VMADDR_CID_ANY)
VSOCK_PORT_MAX = 0xFFFFFFFE  # vsock ports are u32; 0xFFFFFFFF is VMADDR_PORT_ANY
HOST_READ_AHEAD = 64 << 10  # the host's channel: a small frame (a warm call's) arrives in one read


class VsockUnavailable(OSError):
    """This Python or kernel has no AF_VSOCK sockets (a guest kernel without CONFIG_VIRTIO_VSOCKETS)."""


class FdStream:
    """``recv``/``sendall`` over one fd (a socket) or two (a read pipe and a write pipe).

    ``read_ahead``: a small ``recv`` reads up to that many bytes and keeps what it was not asked for, so
    a whole frame (prefix, header, event) usually costs one system call instead of three. Only for a
    stream whose every read goes through this object (the host's channel).
    """

    def __init__(self, read_fd: int, write_fd: int | None = None, read_ahead: int = 0) -> None:
        self.read_fd = read_fd
        self.write_fd = read_fd if write_fd is None else write_fd
        self.read_ahead = read_ahead
        self._pending = b""  # read ahead, not yet asked for
        for fd in {self.read_fd, self.write_fd}:
            # Blocking I/O is what recv_frame expects; no child process may inherit the channel.
            os.set_blocking(fd, True)
            os.set_inheritable(fd, False)

    def has_pending(self) -> bool:
        """Bytes were read ahead and not asked for yet (polling the fd would not show them)."""
        return bool(self._pending)

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` at end of stream."""
        pending = self._pending
        if pending:
            self._pending = pending[size:]
            return pending[:size]
        if size >= self.read_ahead:
            return os.read(self.read_fd, size)
        data = os.read(self.read_fd, self.read_ahead)
        if len(data) > size:
            self._pending = data[size:]
            return data[:size]
        return data

    def recv_frame(self, allowed: frozenset | None = None) -> tuple[dict, bytes]:
        """``protocol.recv_frame`` on this stream, with the same checks and errors; a frame already
        read ahead whole is cut out of the bytes at hand instead of being read piece by piece."""
        data = self._pending
        if not data and self.read_ahead:
            data = os.read(self.read_fd, self.read_ahead)
            if not data:
                raise EOFError("channel closed")
        if len(data) >= PREFIX_SIZE:
            head_len, blob_len = protocol.parse_prefix(data[:PREFIX_SIZE])
            end = PREFIX_SIZE + head_len + blob_len
            if len(data) >= end:
                header = protocol.parse_header(data[PREFIX_SIZE:PREFIX_SIZE + head_len], allowed)
                self._pending = data[end:]
                return header, data[PREFIX_SIZE + head_len:end]
        self._pending = data  # a frame bigger than one read: the general path reads the rest
        return protocol.recv_frame(self, allowed)

    def sendall(self, data: bytes) -> None:
        """Write all of ``data`` (pipes and sockets may take it in several writes)."""
        written = os.write(self.write_fd, data)
        if written < len(data):
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(self.write_fd, view):]

    def close(self) -> None:
        """Close the fds; idempotent."""
        for fd in {self.read_fd, self.write_fd}:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read_fd = self.write_fd = -1


def listen_vsock(port: int, cid: int = VMADDR_CID_ANY):
    """A socket listening on vsock ``port``, for :func:`accept` to take the host's connections from.

    The listener stays open for the machine's life: restoring a Firecracker snapshot resets the vsock
    device, which closes every connection but keeps listening sockets, and the host then connects
    again. Raises :class:`VsockUnavailable` when AF_VSOCK sockets cannot be made at all, ``OSError``
    when the port cannot be bound.
    """
    import socket  # here, not at the top: the fd mode never pays for it

    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise VsockUnavailable("this Python was built without AF_VSOCK support")
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise VsockUnavailable(exc.errno, f"AF_VSOCK sockets are unavailable: {exc.strerror or exc}") from None
    try:
        listener.bind((cid, port))
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


def accept(listener) -> FdStream:
    """Block until the host connects to ``listener`` (any stream socket); the connection as a stream."""
    conn, _ = listener.accept()
    return FdStream(conn.detach(), read_ahead=HOST_READ_AHEAD)
