"""The line protocol of the ``rust`` and ``wasm`` runtimes, spoken over a pair of pipes.

See docs/architecture.md#runtime-contract.

The function is a program that reads one JSON event per line on stdin and writes one JSON result per
line on stdout, until end of file. :class:`LineChannel` sends one event line and reads one result line
back, writing and reading in one ``poll`` loop: a program that starts answering before it has read all
of a large event can neither deadlock the agent nor be deadlocked by it. A third fd, the *end* fd, says
the program is gone (the child's pidfd, or the pipe a wasm thread closes when ``_start`` returns).

Whatever breaks the one-line-per-event rhythm (a line over the limit, output left over from a previous
event) leaves the stream out of step: the runtime must end the machine.
"""

import json
import os
import select
import time

from nimbus.agent.base import InvocationError

READ_CHUNK = 1 << 20
_NO_NEWLINES = bytes.maketrans(b"\n\r", b"  ")  # inside valid JSON they can only be whitespace
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR


class PeerGone(Exception):
    """The program closed its stdout or stdin, or ended (its end fd fired)."""


class LineTooLong(Exception):
    """The result line grew past the limit before its newline."""


class OutOfStep(Exception):
    """The program wrote more than one line for an event, or answered before reading all of it."""


class NoReply(Exception):
    """No result line within the timeout."""


def event_line(event: bytes) -> bytes:
    """The event as one line: raw CR/LF bytes become spaces (valid JSON has them only as whitespace)."""
    return event.translate(_NO_NEWLINES) + b"\n"


def parse_result(line: bytes) -> bytes:
    """The result line itself when it is one JSON value; ``InvalidResult`` (the machine survives) if not."""
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        json.loads(line.decode("utf-8"), parse_constant=refuse_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        shown = line[:200].decode("utf-8", "replace")
        raise InvocationError("InvalidResult", f"the result line is not JSON ({exc}): {shown!r}") from None
    return line


def too_long(limit: int) -> InvocationError:
    """The fatal ``ResultTooLarge`` for a line cut off at ``limit`` bytes (the stream is now out of step)."""
    return InvocationError("ResultTooLarge", f"the result line is longer than the limit of {limit} bytes (6 MiB); "
                           "the rest of it was not read, so this machine cannot serve again", fatal=True)


def _ms_until(deadline: float) -> int:
    """Whole milliseconds for poll, rounded up so an empty poll means the deadline has passed."""
    left = deadline - time.monotonic()
    return int(left * 1000) + 1 if left > 0 else 0


def refuse_constant(name: str):
    """For ``json.loads(parse_constant=…)``: NaN and Infinity are Python's, not JSON."""
    raise ValueError(f"{name} is not JSON")


class LineChannel:
    """Our ends of the program's stdin (``write_fd``) and stdout (``read_fd``), plus its end fd."""

    def __init__(self, write_fd: int, read_fd: int, end_fd: int = -1) -> None:
        self.write_fd = write_fd
        self.read_fd = read_fd
        self.end_fd = end_fd
        self.buffer = bytearray()
        os.set_blocking(write_fd, False)  # written between polls; a full pipe must not stall the loop
        self.poller = select.poll()
        self.poller.register(read_fd, select.POLLIN)
        if end_fd >= 0:
            self.poller.register(end_fd, select.POLLIN)

    def exchange(self, line: bytes, limit: int, timeout_s: float | None = None) -> bytes:
        """Send ``line`` (ending in a newline) and return the next line the program writes, without its newline.

        Raises :class:`OutOfStep` when output was already waiting, :class:`LineTooLong` past ``limit``
        bytes, :class:`PeerGone` when the program is gone, :class:`NoReply` after ``timeout_s``.
        """
        if not self.buffer and self._readable():
            chunk = os.read(self.read_fd, READ_CHUNK)
            if not chunk:
                raise PeerGone()
            self.buffer += chunk
        if self.buffer:
            raise OutOfStep("the program wrote output that answers no event (more than one line, or a line "
                            "before this event was sent)")
        pending = self._write(memoryview(line))
        if pending:
            self.poller.register(self.write_fd, select.POLLOUT)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                wait_ms = None if deadline is None else _ms_until(deadline)
                events = dict(self.poller.poll(wait_ms))
                if not events:
                    raise NoReply()
                if pending and self.write_fd in events:
                    pending = self._write(pending)
                    if not pending:
                        self.poller.unregister(self.write_fd)
                if events.get(self.read_fd, 0) & _READABLE:
                    reply = self._read(limit)
                    if reply is not None:
                        if pending:
                            raise OutOfStep("the program answered before it had read the whole event")
                        return reply
                elif self.end_fd in events:
                    raise PeerGone()
        finally:
            if pending:
                self.poller.unregister(self.write_fd)

    def close(self) -> None:
        """Close our ends (the program sees end of file on its stdin); idempotent."""
        for fd in (self.write_fd, self.read_fd):
            if fd >= 0:
                os.close(fd)
        self.write_fd = self.read_fd = -1

    def _readable(self) -> bool:
        return any(fd == self.read_fd and event & _READABLE for fd, event in self.poller.poll(0))

    def _write(self, data: memoryview) -> memoryview:
        """Write what the pipe takes now; return what is left."""
        try:
            while data:
                data = data[os.write(self.write_fd, data):]
        except BlockingIOError:
            pass
        except OSError:  # EPIPE: nobody reads the program's stdin any more
            raise PeerGone() from None
        return data

    def _read(self, limit: int) -> bytes | None:
        """Read what is there; the first complete line if there is one now."""
        chunk = os.read(self.read_fd, READ_CHUNK)
        if not chunk:
            raise PeerGone()
        start = len(self.buffer)
        self.buffer += chunk
        end = self.buffer.find(b"\n", start)
        if end < 0:
            if len(self.buffer) > limit:
                raise LineTooLong()
            return None
        if end > limit:
            raise LineTooLong()
        reply = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        return reply
