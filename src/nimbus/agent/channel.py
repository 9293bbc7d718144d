"""A byte stream over raw file descriptors, shaped like the socket methods ``nimbus.protocol`` calls.

The agent's channel to the host is a connected socket (a socketpair end, or a vsock under Firecracker)
and its channel to the node runner is a pair of pipes. Plain ``os.read``/``os.write`` serve all of them,
and skipping the ``socket`` module saves several milliseconds of start-up in every machine.
"""

import os


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
