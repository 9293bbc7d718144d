"""Running one builder process: its output kept head and tail, its wall-clock limit, and killing it for sure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from nimbus.compiler.base import OUTPUT_MAX

READ_CHUNK = 64 << 10
EXIT_WAIT_S = 10.0  # after SIGKILL, how long to wait for the process (and its pipe) to go away


@dataclass(frozen=True, slots=True)
class Exit:
    """How a process ended: ``status`` None when it had to be killed."""

    status: int | None
    output: bytes  # stdout and stderr interleaved: the first and last OUTPUT_MAX/2 bytes, with a cut marker
    timed_out: bool
    duration_ms: float


class HeadTail:
    """Keeps the first and the last ``limit/2`` bytes of a stream: where the first error and the summary are."""

    def __init__(self, limit: int = OUTPUT_MAX) -> None:
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    def value(self) -> bytes:
        cut = self.total - len(self.head) - len(self.tail)
        if cut <= 0:
            return bytes(self.head + self.tail)
        return bytes(self.head) + f"\n... [{cut} bytes of output cut] ...\n".encode() + bytes(self.tail)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):  # already gone, or a kernel without pidfds
        return None


def kill_pid(pid: int, pidfd: int | None) -> None:
    """SIGKILL ``pid`` through its pidfd (cannot hit a recycled pid), or plainly where there is none.

    Not ``Process.kill()``: ``Popen.send_signal`` polls first and may reap the child behind asyncio's
    child watcher, which then reports a made-up exit status.
    """
    with contextlib.suppress(ProcessLookupError, OSError):
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


async def run(
    argv: list[str],
    *,
    env: dict[str, str],
    timeout_s: float,
    kill: Callable[[], None] | None = None,
    cwd: str = "/",
) -> Exit:
    """Run ``argv`` to its end or ``timeout_s``, whichever comes first; never leaves it running.

    At the limit (or when cancelled) ``kill`` runs first — a backend's way to end everything the process
    started, e.g. a cgroup kill — then the process itself gets SIGKILL. Its stdin is ``/dev/null``; it
    starts a session of its own, so the node's terminal signals are not its.
    """
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, cwd=cwd, start_new_session=True,
    )
    pidfd = _pidfd(proc.pid)
    output = HeadTail()

    async def pump() -> int:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(READ_CHUNK):
            output.add(chunk)
        return await proc.wait()

    def stop() -> None:
        if kill is not None:
            kill()
        if proc.returncode is None:
            kill_pid(proc.pid, pidfd)

    timed_out = False
    status: int | None
    try:
        try:
            async with asyncio.timeout(timeout_s):
                status = await pump()
        except TimeoutError:
            timed_out = True
            stop()
            status = None
            # Drain what is left (the sandbox's last words) and reap it, bounded: everything is SIGKILLed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EXIT_WAIT_S):
                    await pump()
        except BaseException:  # cancelled: end it now, and reap it before the caller removes its directories
            stop()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(proc.wait()), EXIT_WAIT_S)
            raise
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Exit(status=status, output=output.value(), timed_out=timed_out,
                duration_ms=(time.monotonic() - started) * 1000)


__all__ = ["Exit", "HeadTail", "kill_pid", "run"]
