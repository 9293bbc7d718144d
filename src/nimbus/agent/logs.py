"""Capture what a function writes to stdout and stderr, one call at a time, in bounded memory.

fds 1 and 2 of the agent are pointed at the write end of one pipe, so Python's ``print``, raw
``os.write(1, …)``, C extensions and the runtime children (which inherit fds 1 and 2) all land in the
same place, in the order written. A small drain thread reads the pipe as it fills and keeps only the
last :data:`LOG_TAIL_MAX` bytes, so a function that writes gigabytes costs the machine 64 KiB, never
its memory (an in-memory file would grow with every byte, outside RLIMIT_DATA). After each call the
agent drains what is left in the pipe and takes the tail. The agent's own diagnostics go to a saved
copy of the original stderr.

A function may close or replace the agent's read end (``os.close(3)``): the next collection notices,
makes a new pipe and reports the lost logs instead of crashing the agent.

What is written after a call's answer (a thread or a timer the call left running) belongs to no call
that is still open, so it must not show up in the next one's logs: :meth:`LogCapture.begin` drops it when
the next call starts and that call's logs open with one line saying how many bytes went. What the
function's module writes while it loads, before the first call, still goes to the first call.
"""

import _thread
import os
import select
import sys

from nimbus.agent.contract import LOG_TAIL_MAX

READ_CHUNK = 64 * 1024
PIPE_SIZE = 1 << 20  # a roomier pipe: fewer wake-ups of the drain thread under a flood (best effort)
F_SETPIPE_SZ = 1031
COLLECT_READS_MAX = 256  # a writer that never stops (a background child) cannot hold a collection forever
LOST_NOTE = "[nimbus: the function closed the agent's log pipe; output written since was lost]\n"
DROPPED_NOTE = "[nimbus: {} bytes written between calls were dropped]\n"


def _flush_streams() -> None:
    """Push Python's buffered text to fds 1 and 2 (user code may have swapped or closed the streams).

    Each stream object once: twice a call, and ``sys.stdout`` is usually ``sys.__stdout__``.
    """
    out, err = getattr(sys, "stdout", None), getattr(sys, "stderr", None)
    first_out, first_err = getattr(sys, "__stdout__", None), getattr(sys, "__stderr__", None)
    _flush(out)
    if err is not out:
        _flush(err)
    if first_out is not out and first_out is not err:
        _flush(first_out)
    if first_err is not out and first_err is not err and first_err is not first_out:
        _flush(first_err)


def _flush(stream) -> None:
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
    """Owns the pipe behind fds 1 and 2 and the tail read from it."""

    def __init__(self) -> None:
        self.fd = -1  # the read end
        self.diag_fd = 2
        self._tail = bytearray()
        self._cut = False  # bytes were dropped from the front of the tail
        self._lost = False  # the read end was closed under us
        self._ino = None  # (st_dev, st_ino) of the pipe, to know our read end from a reused fd number
        self._lock = _thread.allocate_lock()
        self._read = 0  # bytes read from the pipe since the last collection (the tail may hold fewer)
        self._answered = False  # a call was collected: from now on, output between calls is nobody's
        self._dropped = 0  # bytes dropped by begin(), reported by the next collection
        self._waiting = None  # a poll object on the read end

    def start(self) -> None:
        """Redirect fds 1 and 2 into the pipe; keep the original stderr for diagnostics."""
        _flush_streams()
        self.diag_fd = os.dup(2)  # not inheritable: children write to the logs, never to the host
        self._open_pipe()
        _line_buffered("stdout", 1)
        _line_buffered("stderr", 2)

    def _open_pipe(self) -> None:
        read_fd, write_fd = os.pipe()  # neither end inheritable; dup2 makes 1 and 2 inheritable
        try:
            import fcntl

            fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        os.set_blocking(read_fd, False)
        waiting = select.poll()  # begin() asks it whether anything came since the last collection
        waiting.register(read_fd, select.POLLIN)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        info = os.fstat(read_fd)
        self.fd, self._ino, self._waiting = read_fd, (info.st_dev, info.st_ino), waiting
        _thread.start_new_thread(self._drain, (read_fd,))

    def _drain(self, fd: int) -> None:
        """The drain thread: wait for output, then move it into the tail, until the pipe is gone."""
        try:
            self._drain_until_gone(fd)
        except BaseException:
            pass

    def _drain_until_gone(self, fd: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            try:
                poller.poll()
            except OSError:
                return
            with self._lock:
                if fd != self.fd or not self._read_available(fd):
                    return  # replaced, closed, or every writer gone (EOF)

    def _read_available(self, fd: int, reads_max: int = COLLECT_READS_MAX) -> bool:
        """Append what the pipe holds now to the tail (the lock is held); False at EOF or on a bad fd."""
        for _ in range(reads_max):
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data:
                return False
            self._read += len(data)
            tail = self._tail
            tail += data
            if len(tail) > LOG_TAIL_MAX:
                del tail[: len(tail) - LOG_TAIL_MAX]
                self._cut = True
        return True

    def begin(self) -> None:
        """A call starts: drop what was written since the last call's answer, to be reported by :meth:`collect`."""
        if not self._answered:  # output of the module's load: the first call's
            return
        _flush_streams()
        with self._lock:
            # Nearly always nothing came (one poll, no read); if something did, read it only from our own
            # pipe (user code may close the fd and reuse its number; poll reports that too).
            if self._waiting.poll(0) and self._read_end_ours():
                self._read_available(self.fd)
            self._dropped, self._read = self._read, 0
            self._tail.clear()
            self._cut = False

    def collect(self) -> tuple[str, bool]:
        """Return ``(text, truncated)``: the tail of everything written since the call began, then empty it."""
        _flush_streams()
        with self._lock:
            # Polled first: a read that finds the pipe empty costs an exception as well as the call.
            ok = self._pipe_intact() and (not self._waiting.poll(0) or self._read_available(self.fd))
            data, cut, lost = bytes(self._tail), self._cut, self._lost or not ok
            self._tail.clear()
            self._cut = self._lost = False
            self._read, dropped, self._dropped = 0, self._dropped, 0
            self._answered = True
        if lost and not self._pipe_intact():
            self._reopen()
            data += LOST_NOTE.encode()
        if cut:
            data = _skip_partial_char(data)
        if dropped:
            data = DROPPED_NOTE.format(dropped).encode() + data
        return data.decode("utf-8", "replace"), cut

    def _read_end_ours(self) -> bool:
        """``self.fd`` is still our pipe's read end (user code may close the fd and reuse its number)."""
        try:
            info = os.fstat(self.fd)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self._ino

    def _pipe_intact(self) -> bool:
        """The read end is still ours and fd 1 still writes into it (user code may close or reuse either)."""
        try:
            ours, out = os.fstat(self.fd), os.fstat(1)
        except OSError:
            return False
        return (ours.st_dev, ours.st_ino) == self._ino == (out.st_dev, out.st_ino)

    def _reopen(self) -> None:
        try:
            if (os.fstat(self.fd).st_dev, os.fstat(self.fd).st_ino) == self._ino:
                os.close(self.fd)  # still our read end (fd 1 was replaced): not someone else's file
        except OSError:
            pass
        try:
            self._open_pipe()
        except OSError as exc:
            self.diag(f"cannot capture logs any more: {exc}")

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
