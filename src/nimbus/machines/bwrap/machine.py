"""One bwrap machine: a sandbox process tree with the agent in it, spawned, spoken to and killed.

:class:`~nimbus.machines.bwrap.driver.BwrapDriver` builds its command line; this module runs it (inside
the machine's cgroup when there is one), talks to the agent over one end of a ``socketpair`` through
:class:`~nimbus.machines.channel.Channel`, keeps the tail of the sandbox's own output for error
messages, and releases everything when it ends. See docs/architecture.md ("Security model").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid

from nimbus import protocol
from nimbus.agent.contract import SANDBOX_ENV
from nimbus.errors import MachineDied, MachineStartError, MachineTimeout
from nimbus.machines import cgroups
from nimbus.machines.base import DEFAULT_PING_TIMEOUT_S, MachineSpec
from nimbus.machines.channel import Channel
from nimbus.machines.layout import PYTHON_LINK

log = logging.getLogger("nimbus.machines.bwrap")

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nimbus.machines.bwrap.driver import BwrapDriver

# A wasm function's memory_mb caps its linear memory (the agent sets it in wasmtime); the engine and its
# Python host (about 40 MiB resident, measured) are the platform's, so the machine gets this on top.
# Without it a module filling its linear memory meets the kernel's OOM killer, not a clear error.
WASM_HOST_MB = 64
# The outer bwrap and its init (pid 1 of the sandbox) live in the machine's cgroup too.
BWRAP_PROCS = 2
SHELL = "/bin/sh"
STDERR_TAIL_BYTES = 8192
STOP_GRACE_S = 1.0  # how long stop() lets the agent exit on its own after its channel closes
EXIT_WAIT_S = 5.0  # how long to wait for a SIGKILLed sandbox to be reaped before giving up on it
DEATH_REPORT_WAIT_S = 1.0  # after EOF, how long to wait for the exit status to quote it
CGROUP_REMOVE_TRIES = 40
CGROUP_REMOVE_PAUSE_S = 0.025


def data_fd(text: str) -> int:
    """An inheritable descriptor to read ``text`` from, once (bwrap's ``--file``/``--args`` take one each)."""
    fd = os.memfd_create("nimbus", 0)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def machine_memory_mb(spec: MachineSpec) -> int:
    """The memory a machine may use in all: the function's ``memory_mb``, plus the wasm host's share."""
    return spec.memory_mb + (WASM_HOST_MB if spec.runtime == "wasm" else 0)


def describe_exit(returncode: int | None) -> str:
    """Say how a bwrap process ended (bwrap reports a sandboxed process killed by signal N as 128+N)."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"bwrap was killed by {_signame(-returncode)}"
    if 128 < returncode <= 128 + 64:
        return f"the agent was killed by {_signame(returncode - 128)} (exit status {returncode})"
    return f"exited with status {returncode}"


def _signame(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class _Watch(asyncio.SubprocessProtocol):
    """Feeds the sandbox's output into the machine's ring buffer and tells it when bwrap exits."""

    def __init__(self, machine: BwrapMachine) -> None:
        self.machine = machine

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        tail = self.machine._tail
        tail += data
        if len(tail) > STDERR_TAIL_BYTES:
            del tail[: len(tail) - STDERR_TAIL_BYTES]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if not self.machine._output_closed.done():
            self.machine._output_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.machine._exited.done():
            self.machine._exited.set_result(None)


class BwrapMachine:
    """One bwrap sandbox with the guest agent in it; see :class:`nimbus.machines.base.Machine`.

    Made by :meth:`BwrapDriver.create`, which returns it started. ``pid`` is the host pid of the outer
    bwrap process; ``diagnostics()`` the tail of the sandbox's own output.
    """

    def __init__(self, driver: BwrapDriver, spec: MachineSpec, machine_id: str | None = None) -> None:
        self.id = machine_id or uuid.uuid4().hex[:12]
        self.runtime = spec.runtime
        self.spec = spec
        self.created_at = time.monotonic()
        self.uses = 0
        self.pid: int | None = None
        self._driver = driver
        self._lock = asyncio.Lock()  # one request at a time
        self._release_lock = asyncio.Lock()
        self._tail = bytearray()
        self._started = False
        self._released = False
        self._killed = False  # by us: the exit status is ours, not the function's
        self.uid: int | None = None  # its own host uid (and gid) on a root node, from the driver's range
        self._cgroup: cgroups.Cgroup | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._pidfd: int | None = None
        self._channel = Channel(self, driver)
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        self._output_closed: asyncio.Future[None] = loop.create_future()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<BwrapMachine {self.id} {self.runtime} pid={self.pid} {state}>"

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """True while the sandbox runs and its channel is open."""
        return self._started and not self._released and not self._exited.done() and not self._killed

    @property
    def returncode(self) -> int | None:
        """bwrap's exit status once it has ended (see :func:`describe_exit`)."""
        return self._transport.get_returncode() if self._transport is not None else None

    def diagnostics(self) -> str:
        """The last few KiB the sandbox wrote to stdout/stderr (agent crashes, bwrap errors)."""
        return self._tail.decode(errors="replace")

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Create the cgroup, spawn bwrap, connect, and wait for the agent's pong.

        Each step that succeeds pushes its undo; if a later one fails they run in reverse and
        ``MachineStartError`` is raised with what the sandbox printed.
        """
        if self._started:
            raise MachineStartError(f"machine {self.id} was already started")
        async with contextlib.AsyncExitStack() as undo:
            try:
                self.uid = self._take_uid()
                undo.callback(self._give_uid)
                self._make_cgroup()
                undo.push_async_callback(self._remove_cgroup)
                parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                undo.callback(parent_end.close)
                with child_end:  # the sandbox holds its own copy once spawned
                    await self._spawn(child_end.fileno())
                undo.push_async_callback(self._stop_process)
                self._channel.attach(*await asyncio.open_unix_connection(sock=parent_end))
                undo.push_async_callback(self._close_channel)
                self._started = True
                await self._channel.exchange({"type": protocol.PING}, b"", self._driver.start_timeout_s,
                                             alive=self.alive)
            except asyncio.CancelledError:
                self._started = False
                raise
            except Exception as exc:
                self._started = False
                raise MachineStartError(self._start_failure(exc)) from exc
            undo.pop_all()  # started: from now on stop()/kill() release everything
        self.created_at = time.monotonic()

    def _make_cgroup(self) -> None:
        hierarchy = self._driver.hierarchy
        if hierarchy is None:
            return
        limits = cgroups.Limits(
            memory_bytes=machine_memory_mb(self.spec) << 20,
            pids_max=self.spec.pids_max + BWRAP_PROCS,
            cpus=float(self.spec.vcpus),
        )
        try:
            self._cgroup = hierarchy.create(self.id, limits)
        except OSError as exc:
            raise MachineStartError(f"cannot create its cgroup: {exc}") from exc

    def _take_uid(self) -> int | None:
        return self._driver.take_uid()

    def _give_uid(self) -> None:
        if self.uid is not None:
            self._driver.give_uid(self.uid)
            self.uid = None

    async def _spawn(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []  # what bwrap reads once: the seccomp program, the /etc files, its own arguments
        try:
            filter_fd = self._driver.open_seccomp()
            if filter_fd is not None:
                fds.append(filter_fd)
            etc = {name: data_fd(text) for name, text in self._driver.etc_files(self.uid).items()}
            fds += etc.values()
            argv = self._driver.command(self.spec, fd, self._cgroup, filter_fd, uid=self.uid, etc_fds=etc)
            # bwrap's options through --args, so no command line in the sandbox (its pid 1's is bwrap's)
            # shows the host paths they bind.
            cut = len(argv) - 1 - argv[::-1].index(PYTHON_LINK)
            fds.append(data_fd("".join(f"{arg}\0" for arg in argv[1:cut])))
            argv = [argv[0], "--args", str(fds[-1]), *argv[cut:]]
            if self._cgroup is not None:
                # Join the cgroup before bwrap exists, so it and all it forks are inside. A shell does it
                # and execs bwrap: cheaper than a preexec_fn, which forces a full fork() of the node.
                argv = [SHELL, "-c", self._cgroup.shell_join() + 'ulimit -c 0; exec "$@"', "nimbus-machine", *argv]
            self._transport, _ = await loop.subprocess_exec(
                lambda: _Watch(self),
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(fd, *fds),
                start_new_session=True,  # the node's terminal signals (Ctrl-C) are for the node, not its machines
                cwd="/",
                env={"PATH": SANDBOX_ENV["PATH"]},
            )
        finally:
            for extra in fds:
                os.close(extra)  # bwrap has its own copies
        self.pid = self._transport.get_pid()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # already gone (the exit watcher will say so), or a kernel before 5.3
            self._pidfd = None

    def _start_failure(self, exc: BaseException) -> str:
        if isinstance(exc, subprocess.SubprocessError | OSError) and self._transport is None:
            return f"cannot spawn bwrap for machine {self.id}: {exc}"
        if isinstance(exc, MachineTimeout):
            waited = self._driver.start_timeout_s
            return f"machine {self.id}: agent did not answer within {waited:g}s{self.tail_note()}"
        return f"machine {self.id} did not start: {exc}"

    # ------------------------------------------------------------------ requests

    async def request(self, header: dict, blob: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes]:
        """Send one frame, return the reply (header, blob); see the ``Machine`` protocol for errors."""
        async with self._lock:
            return await self._channel.exchange(header, blob, timeout, alive=self.alive)

    async def ping(self, timeout: float = DEFAULT_PING_TIMEOUT_S) -> bool:
        """True when the agent answers ``pong`` within ``timeout``; never raises.

        A machine busy with a request counts as not answering, but is not killed for it.
        """
        if not self.alive:
            return False
        if self._lock.locked():
            return False
        await self._lock.acquire()  # free: taken at once
        try:
            header, _ = await self._channel.exchange({"type": protocol.PING}, b"", timeout, alive=self.alive)
            return header.get("type") == protocol.PONG
        except Exception:
            return False
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ what the channel asks

    def exit_note(self) -> str:
        return describe_exit(self.returncode)

    async def died_mid_frame(self) -> bool:
        """Whether the sandbox has exited (waiting a moment for the report), so a cut frame was its death."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), DEATH_REPORT_WAIT_S)
        return self._exited.done()

    async def died(self, kind: str) -> MachineDied:
        """Build the error for a channel that closed under a request, with the exit status and output."""
        exited = await self.died_mid_frame()
        if not exited:  # the agent hung up but the sandbox lingers: end it
            self.kill_now()
        else:
            with contextlib.suppress(TimeoutError):  # let the last output arrive
                await asyncio.wait_for(asyncio.shield(self._output_closed), DEATH_REPORT_WAIT_S)
        cause = describe_exit(self.returncode) if exited else "closed its channel"
        if self._cgroup is not None and self._cgroup.oom_kills():
            cause += f"; the memory limit ({machine_memory_mb(self.spec)} MiB) was hit and the kernel killed a process"
        return MachineDied(f"machine {self.id} died during {kind}: {cause}{self.tail_note()}")

    def tail_note(self) -> str:
        text = self.diagnostics().strip()
        return f"; its output ends: {text}" if text else ""

    # ------------------------------------------------------------------ stop / kill

    async def stop(self) -> None:
        """Close the channel, give the agent ``STOP_GRACE_S`` to exit, then kill what is left."""
        if self._released:
            return
        if self._channel.writer is not None and not self._exited.done():
            self._channel.writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), STOP_GRACE_S)
        self.kill_now()
        await self._release()

    async def kill(self) -> None:
        """Kill the whole sandbox at once and release its resources; idempotent."""
        await self.abort()

    async def abort(self) -> None:
        self.kill_now()
        await self._release()

    def kill_now(self) -> None:
        """SIGKILL the sandbox (its cgroup, and bwrap itself) without waiting; safe to call twice."""
        self._killed = True
        if self._cgroup is not None:
            try:
                self._cgroup.kill()
            except OSError as exc:
                log.warning("machine %s: cgroup kill failed: %s", self.id, exc)
        if self.pid is not None and not self._exited.done():
            # Not transport.kill(): Popen.send_signal() polls first and, when the cgroup kill has
            # already ended bwrap, reaps it behind asyncio's child watcher. The pidfd cannot hit a
            # recycled pid; plain kill() is for kernels without pidfds.
            with contextlib.suppress(ProcessLookupError):
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                else:
                    os.kill(self.pid, signal.SIGKILL)
        # bwrap dies → its init gets SIGKILL (--die-with-parent) → the pid namespace goes with it.

    async def _release(self) -> None:
        async with self._release_lock:
            if self._released:
                return
            self._released = True
            try:
                await self._stop_process()
                await self._close_channel()
                await self._remove_cgroup()
                if self._exited.done():  # a uid still running somewhere is not handed to another machine
                    self._give_uid()
            finally:
                self._driver._forget(self)

    async def _stop_process(self) -> None:
        if self._transport is None:
            return
        self.kill_now()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)
        except TimeoutError:
            log.error("machine %s: bwrap pid %s did not exit after SIGKILL", self.id, self.pid)
        self._transport.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _close_channel(self) -> None:
        await self._channel.close()

    async def _remove_cgroup(self) -> None:
        """Remove the cgroup once its processes are gone (the kernel may lag the reap a little)."""
        if self._cgroup is None:
            return
        for _ in range(CGROUP_REMOVE_TRIES):
            if self._cgroup.remove():
                self._cgroup = None
                return
            self._cgroup.kill()
            await asyncio.sleep(CGROUP_REMOVE_PAUSE_S)
        log.warning("machine %s: cgroup %s still busy; left behind", self.id, self._cgroup.name)


__all__ = ["BWRAP_PROCS", "BwrapMachine", "data_fd", "describe_exit", "machine_memory_mb"]
