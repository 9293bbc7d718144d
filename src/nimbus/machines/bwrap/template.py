"""Template machines for the bwrap driver: machines forked from a per-runtime sandbox, not booted.

A :class:`Template` is one bwrap sandbox per runtime whose interpreter has already imported the guest
agent (:mod:`nimbus.agent.template` says what runs inside and how each child isolates itself). Making
a machine from it costs a ``fork`` and the child's own namespaces and mounts instead of a new bwrap,
a new interpreter and the agent's imports. A :class:`TemplateMachine` is the same machine as a
:class:`~nimbus.machines.bwrap.machine.BwrapMachine` to the pool and the agent; only how it starts and how its
end is learnt differ.

Each child gets its own cgroup (the host creates it and opens its join files; the child writes itself
in before anything else), its own pid, mount, network, IPC, UTS and cgroup namespaces, its own
``/proc``, ``/tmp``, ``/dev/shm`` and ``/var/task``, and the same seccomp filter as a booted
machine and a host uid of its own, as a booted machine has. The template needs ``CAP_SYS_ADMIN`` for
that, so it exists only on a root node, and only with a cgroup tree (the machine's cgroup is what
counts and kills its processes); elsewhere the driver boots every machine.

A function's dependency layer is a host directory the template's sandbox cannot see: the node clones it
into a detached read-only mount (:mod:`nimbus.machines.mounts`), a new one per machine since a clone
attaches once, sends it with the fork request, and the child attaches it at ``/opt/layer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess

from nimbus.agent.contract import OPT_DIR, TEMPLATE_MESSAGE_MAX
from nimbus.errors import MachineStartError
from nimbus.machines import mounts
from nimbus.machines.bwrap.machine import EXIT_WAIT_S, STDERR_TAIL_BYTES, BwrapMachine, data_fd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nimbus.machines.bwrap.driver import BwrapDriver

log = logging.getLogger("nimbus.machines.template")

TEMPLATE_BOOT = (
    f"import sys; sys.path.insert(0, {OPT_DIR!r}); from nimbus.agent.template import main; main(sys.argv[1:])"
)
FORK_TIMEOUT_S = 5.0


class _Output(asyncio.Protocol):
    """Feeds a forked machine's stdout/stderr pipe into its ring buffer."""

    def __init__(self, machine) -> None:
        self.machine = machine

    def data_received(self, data: bytes) -> None:
        self.machine._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.machine._output_closed.done():
            self.machine._output_closed.set_result(None)


class _TemplateWatch(asyncio.SubprocessProtocol):
    """The template's own bwrap process: its output goes to the log, its end to every child."""

    def __init__(self, template: Template) -> None:
        self.template = template

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.template.output += data
        del self.template.output[:-4096]

    def process_exited(self) -> None:
        if not self.template._process_exited.done():
            self.template._process_exited.set_result(None)
        self.template._ended()


class ForkServer:
    """The host's end of a fork server's control socket: fork requests out, forks and exits back.

    Two kinds speak it (:mod:`nimbus.agent.template`): a runtime's :class:`Template` and a function
    template (:class:`nimbus.machines.bwrap.snapshot.Snapshot`).
    """

    def __init__(self, driver: BwrapDriver, runtime: str) -> None:
        self.driver = driver
        self.runtime = runtime
        self._control: socket.socket | None = None
        self._reader: asyncio.Task | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._forks: dict[str, asyncio.Future[int]] = {}
        self._machines: dict[str, TemplateMachine] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False

    @property
    def alive(self) -> bool:
        """True while it may be asked for forks; each kind adds whether its own process still runs."""
        return not self.closed and self._control is not None

    @property
    def children(self) -> int:
        """Machines forked from it that have not ended."""
        return len(self._machines)

    def _listen(self, control: socket.socket) -> None:
        control.setblocking(False)
        self._control = control
        self._reader = asyncio.create_task(self._read_loop(), name=f"forks-{self.runtime}")

    async def request_fork(self, machine: TemplateMachine, channel: int, output: int, joins: list[int],
                   layer: int | None = None, forks: int | None = None) -> int:
        """Ask for a child for ``machine``; its pid in the template's pid namespace once forked.

        ``layer``: a detached mount (:func:`nimbus.machines.mounts.read_only_clone`) the child attaches
        at ``/opt/layer``; ``forks``: the control socket of a machine that will become a function template.
        Each is sent after the others, and flagged in the request.
        """
        if not self.alive:
            raise MachineStartError(f"the {self.runtime} template is not running")
        request = {"op": "fork", "id": machine.id, "tmp_bytes": machine.tmp_bytes, "task_bytes": machine.task_bytes,
                   "rlimits": machine.rlimits, "uid": machine.uid,
                   "etc": {name: text for name, text in self.driver.etc_files(machine.uid).items()
                           if name in ("passwd", "group")}}
        fds = [channel, output, *joins]
        if layer is not None:
            request["layer"] = True
            fds.append(layer)
        if forks is not None:
            request["snapshot"] = True
            fds.append(forks)
        waiter = asyncio.get_running_loop().create_future()
        self._forks[machine.id] = waiter
        self._machines[machine.id] = machine
        try:
            async with self._send_lock:
                await self._send(json.dumps(request).encode(), fds)
            async with asyncio.timeout(FORK_TIMEOUT_S):
                return await waiter
        except BaseException:
            self._machines.pop(machine.id, None)
            raise
        finally:
            self._forks.pop(machine.id, None)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        while True:
            try:
                socket.send_fds(self._control, [data], fds)
                return
            except BlockingIOError:  # the template is behind on its queue: rare, and brief
                await asyncio.sleep(0.001)

    def forget(self, machine: TemplateMachine) -> None:
        if self._machines.get(machine.id) is machine:
            del self._machines[machine.id]

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self._control, TEMPLATE_MESSAGE_MAX)
                if not data:
                    break
                self._dispatch(json.loads(data))
        except (OSError, ValueError) as exc:
            if not self.closed:
                log.warning("%s template: control channel failed: %s", self.runtime, exc)
        finally:
            self._ended()
            if self._control is not None:
                self._control.close()

    def _dispatch(self, message: dict) -> None:
        op, machine_id = message.get("op"), message.get("id")
        if op == "ready":
            if not self._ready.done():
                self._ready.set_result(None)
        elif op == "forked":
            waiter = self._forks.get(machine_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(int(message["pid"]))
        elif op == "failed":
            waiter = self._forks.get(machine_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(MachineStartError(f"the template could not fork: {message.get('error')}"))
        elif op == "exited":
            machine = self._machines.pop(machine_id, None)
            if machine is not None:
                machine._ended(message.get("status"))

    async def _stop_listening(self) -> None:
        """Stop reading the control socket, close it, and end every fork still on record."""
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._control is not None:
            self._control.close()
        self._ended()

    def _ended(self) -> None:
        """The template is gone (or its channel is): its children died with it (PDEATHSIG)."""
        self.closed = True
        if not self._ready.done():
            self._ready.set_exception(MachineStartError("the template exited"))
            self._ready.exception()  # retrieved: start() reports it with the output
        for waiter in self._forks.values():
            if not waiter.done():
                waiter.set_exception(MachineStartError(f"the {self.runtime} template exited"))
        for machine in list(self._machines.values()):
            machine._ended(None)
        self._machines.clear()

class Template(ForkServer):
    """One template sandbox for ``runtime``; :meth:`request_fork` asks it for a machine."""

    def __init__(self, driver: BwrapDriver, runtime: str) -> None:
        super().__init__(driver, runtime)
        self.output = bytearray()
        self.pid: int | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._process_exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def alive(self) -> bool:
        return super().alive and self._transport is not None and self._transport.get_returncode() is None

    async def start(self) -> None:
        """Spawn the template's bwrap and wait for its ``ready``."""
        loop = asyncio.get_running_loop()
        host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds: list[int] = []  # what bwrap reads once: the seccomp programs and the /etc files
        try:
            filter_fd = self.driver.open_seccomp()
            if filter_fd is not None:
                fds.append(filter_fd)
            snapshot_fd = self.driver.open_seccomp(snapshot=True) if filter_fd is not None else None
            if snapshot_fd is not None:
                fds.append(snapshot_fd)
            # The template's own /etc files; each child binds a passwd and group naming its uid over them.
            etc = {name: data_fd(text) for name, text in self.driver.etc_files(None).items()}
            fds += etc.values()
            try:
                argv = self.driver.template_command(self.runtime, child_end.fileno(), filter_fd, etc, snapshot_fd)
            except MachineStartError as exc:
                raise MachineStartError(f"the {self.runtime} template did not start: {exc}") from None
            self._transport, _ = await loop.subprocess_exec(
                lambda: _TemplateWatch(self), *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, pass_fds=(child_end.fileno(), *fds), start_new_session=True, cwd="/",
                env={"PATH": "/usr/bin:/bin"},
            )
        except BaseException:
            host_end.close()
            raise
        finally:
            child_end.close()
            for fd in fds:
                os.close(fd)
        self.pid = self._transport.get_pid()
        self._listen(host_end)
        try:
            async with asyncio.timeout(self.driver.start_timeout_s):
                await asyncio.shield(self._ready)
        except BaseException as exc:
            await self.close()
            note = self.output.decode(errors="replace").strip()
            raise MachineStartError(f"the {self.runtime} template did not start: {exc!r}"
                                    + (f"; its output ends: {note}" if note else "")) from None

    async def close(self) -> None:
        """End the template (its children die with it) and release its channel."""
        self.closed = True
        if self._transport is not None:
            with contextlib.suppress(ProcessLookupError):
                self._transport.kill()
            try:
                await asyncio.wait_for(asyncio.shield(self._process_exited), EXIT_WAIT_S)
            except TimeoutError:
                log.error("the %s template (pid %s) did not exit after SIGKILL", self.runtime, self.pid)
            self._transport.close()
        await self._stop_listening()


class TemplateMachine(BwrapMachine):
    """A :class:`BwrapMachine` forked by a :class:`Template` instead of booted by bwrap.

    ``forkable``: made to become a function template (:mod:`nimbus.machines.bwrap.snapshot`); it gets a
    fork control socket, whose host end is :attr:`fork_control`.
    """

    DEPTH = 2  # pid namespaces between the host and its agent: the template's, then its own
    ATTACH_LAYER = True  # its layer is sent to the template as a mount (a fork of a function has its own)

    def __init__(self, driver: BwrapDriver, spec, template: ForkServer, forkable: bool = False) -> None:
        super().__init__(driver, spec)
        self.template = template
        self.forkable = forkable
        self.fork_control: socket.socket | None = None
        self.tmp_bytes, self.task_bytes = driver.tmpfs_bytes(spec)
        self.rlimits: list[tuple[str, int]] = []
        self._status: int | None = None
        self._inner_pid: int | None = None
        self._output_transport: asyncio.ReadTransport | None = None

    @property
    def returncode(self) -> int | None:
        return self._status

    def _feed(self, data: bytes) -> None:
        tail = self._tail
        tail += data
        del tail[:-STDERR_TAIL_BYTES]

    def _ended(self, status: int | None) -> None:
        self._status = status if status is not None else self._status
        if not self._exited.done():
            self._exited.set_result(None)

    async def _spawn(self, fd: int) -> None:
        if self._cgroup is None:
            raise MachineStartError("a template machine needs a cgroup")
        self.rlimits = [*self._driver.rlimits(self.spec, self._cgroup.controllers), ("RLIMIT_CORE", 0)]
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        joins: list[int] = []
        layer: int | None = None
        try:
            if self.spec.layer is not None and self.ATTACH_LAYER:
                try:
                    layer = mounts.read_only_clone(self.spec.layer)
                except OSError as exc:
                    raise MachineStartError(f"cannot clone its layer: {exc}") from exc
            joins = self._cgroup.open_join_files()
            self._output_transport, _ = await loop.connect_read_pipe(lambda: _Output(self),
                                                                     os.fdopen(read_end, "rb", buffering=0))
            read_end = -1
            forks = None
            if self.forkable:
                self.fork_control, forks = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                inner_pid = await self.template.request_fork(self, fd, write_end, joins, layer,
                                                     forks.fileno() if forks is not None else None)
            finally:
                if forks is not None:
                    forks.close()
        finally:
            for extra in (write_end, *joins):
                os.close(extra)
            if layer is not None:  # the template has its own copy once sent; an unsent clone just goes
                os.close(layer)
            if read_end >= 0:
                os.close(read_end)
        self._inner_pid = inner_pid

    async def start(self) -> None:
        await super().start()
        # The machine's first process: what kill() signals besides the cgroup (its death takes the
        # rest, through PR_SET_PDEATHSIG), through a pidfd that cannot hit a recycled pid.
        self.pid = self._find_host_pid()
        if self.pid is not None:
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(self.pid)

    def _find_host_pid(self) -> int | None:
        """The host pid of the child the template forked: in the machine's cgroup, two pid namespaces deep."""
        for pid in sorted(self._cgroup.pids() if self._cgroup is not None else ()):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:"):
                            ids = line.split()[1:]
                            if len(ids) == self.DEPTH and int(ids[-1]) == self._inner_pid:
                                return pid
                            break
        return None

    async def _stop_process(self) -> None:
        if self._output_transport is None:
            return
        self.kill_now()
        if self._inner_pid is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)
            except TimeoutError:
                log.error("machine %s: its template child did not exit after SIGKILL", self.id)
        self._output_transport.close()
        self.template.forget(self)
        if self.fork_control is not None:
            self.fork_control.close()
            self.fork_control = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


__all__ = ["ForkServer", "Template", "TemplateMachine", "TEMPLATE_BOOT"]
