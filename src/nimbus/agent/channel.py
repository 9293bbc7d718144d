"""A byte stream over raw file descriptors, shaped like the socket methods ``nimbus.protocol`` calls.

The agent's channel to the host is a connected socket (a socketpair end, or a vsock under Firecracker)
and its channel to the node runner is a pair of pipes. Plain ``os.read``/``os.write`` serve all of them,
and skipping the ``socket`` module saves several milliseconds of start-up in every machine.

Under Firecracker the agent has no inherited fd: :func:`listen_vsock` listens on a vsock port and
:func:`accept` takes each connection the host makes (through Firecracker's Unix socket, see
``nimbus.machines.firecracker.vsock``) as an :class:`FdStream`; only that mode imports ``socket``.
"""

import os

VMADDR_CID_ANY = 0xFFFFFFFF  # listen on whatever CID the VM was given (socket.VMADDR_CID_ANY)
VSOCK_PORT_MAX = 0xFFFFFFFE  # vsock ports are u32; 0xFFFFFFFF is VMADDR_PORT_ANY


class VsockUnavailable(OSError):
    """This Python or kernel has no AF_VSOCK sockets (a guest kernel without CONFIG_VIRTIO_VSOCKETS)."""


class FdStream:
    """``recv``/``sendall`` over one fd (a socket) or two (a read pipe and a write pipe)."""

    def __init__(self, read_fd: int, write_fd: int | None = None) -> None:
        self.read_fd = read_fd
        self.write_fd = read_fd if write_fd is None else write_fd
        for fd in {self.read_fd, self.write_fd}:
            # Blocking I/O is what recv_frame expects; no child process may inherit the channel.
            os.set_blocking(fd, True)
            os.set_inheritable(fd, False)

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; ``b""`` at end of stream."""
        return os.read(self.read_fd, size)

    def sendall(self, data: bytes) -> None:
        """Write all of ``data`` (pipes and sockets may take it in several writes)."""
        view = memoryview(data)
        while view:
            written = os.write(self.write_fd, view)
            view = view[written:]

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
    return FdStream(conn.detach())
