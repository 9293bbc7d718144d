"""Capture what a function writes to stdout and stderr, one call at a time.

fds 1 and 2 of the agent are pointed at one in-memory file opened for appending, so Python's ``print``,
raw ``os.write(1, …)``, C extensions and the node child (which inherits fds 1 and 2) all land in the same
place, in the order written, with no thread and no pipe to drain. After each call the agent reads the
tail back and empties the file. The agent's own diagnostics go to a saved copy of the original stderr.
"""

import fcntl
import os
import sys

LOG_TAIL_MAX = 64 * 1024  # bytes of output kept per call (the tail), as DESIGN §5
_STREAMS = ("stdout", "stderr", "__stdout__", "__stderr__")


def _open_buffer() -> int:
    """An anonymous file in memory; a deleted file in /tmp where memfd_create is not allowed."""
    try:
        return os.memfd_create("nimbus-logs")
    except (AttributeError, OSError):
        pass
    try:
        return os.open("/tmp", os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        path = f"/tmp/.nimbus-logs-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(path)
        return fd


def _flush_streams() -> None:
    """Push Python's buffered text to fds 1 and 2 (user code may have swapped or closed the streams)."""
    for name in _STREAMS:
        stream = getattr(sys, name, None)
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def _line_buffered(name: str, fd: int) -> None:
    """Flush at each line, so ``print`` and ``os.write`` output keep their order in the logs."""
    stream = getattr(sys, name)
    if stream is None:  # the agent was started without this fd
        setattr(sys, name, open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False))
        stream = getattr(sys, name)
    stream.reconfigure(line_buffering=True)


class LogCapture:
    """Owns the log file behind fds 1 and 2."""

    def __init__(self) -> None:
        self.fd = -1
        self.diag_fd = 2

    def start(self) -> None:
        """Redirect fds 1 and 2 into the log file; keep the original stderr for diagnostics."""
        _flush_streams()
        self.fd = _open_buffer()
        # Appending: after each truncation every writer (us, the node child) starts again at offset 0.
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_APPEND)
        self.diag_fd = os.dup(2)  # not inheritable: children write to the logs, never to the host
        os.dup2(self.fd, 1)
        os.dup2(self.fd, 2)
        _line_buffered("stdout", 1)
        _line_buffered("stderr", 2)

    def collect(self) -> tuple[str, bool]:
        """Return ``(text, truncated)``: the tail of everything written since the last call, then empty it."""
        _flush_streams()
        size = os.fstat(self.fd).st_size
        if size == 0:
            return "", False
        start = max(0, size - LOG_TAIL_MAX)
        data = os.pread(self.fd, size - start, start)
        os.ftruncate(self.fd, 0)
        if start:
            data = _skip_partial_char(data)
        return data.decode("utf-8", "replace"), start > 0

    def diag(self, message: str) -> None:
        """Write one line for the host's diagnostics (never part of a function's logs)."""
        try:
            os.write(self.diag_fd, f"nimbus-agent: {message}\n".encode("utf-8", "replace"))
        except OSError:
            pass


def _skip_partial_char(data: bytes) -> bytes:
    """Drop UTF-8 continuation bytes left at the start by cutting inside a character."""
    skip = 0
    while skip < 3 and skip < len(data) and 0x80 <= data[skip] < 0xC0:
        skip += 1
    return data[skip:]
