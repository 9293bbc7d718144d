"""The child process a runtime runs its function in (``nodejs``, ``go``, ``rust``): spawn, watch, reap.

One child per machine, started at ``init`` and kept for every call. Its fds 1 and 2 are the agent's, so
what it prints lands in the captured logs; the fds it talks on are set up by :meth:`Child.spawn`.
:class:`FramedChild` speaks ``nimbus.protocol`` frames with it over two pipes, the child's fds 3
(requests) and 4 (replies), as ``node_runner.js`` and the generated Go main do. The line protocol of the
``rust`` runtime lives in :mod:`nimbus.agent.lines`.

The agent is single-threaded here, so the child is watched without a thread: a pidfd polled next to the
reply pipe says when it died, even while a grandchild still holds the pipe open.
"""

import fcntl
import os
import select
import time

from nimbus import protocol
from nimbus.agent.base import FunctionSpec, InvocationError
from nimbus.agent.channel import FdStream

REQUEST_FD = 3
REPLY_FD = 4
EXECUTABLE_MODE = 0o755
REAP_GRACE_S = 1.0  # how long a child that closed its pipes gets to exit before it is killed
_SIGKILL = 9  # the signal module's enum costs milliseconds to import
# SIGPIPE and SIGXFSZ: Python ignores them and a spawned child would inherit that; programs expect the
# defaults (as subprocess's restore_signals gives them).
_RESTORED_SIGNALS = (13, 25)
REPLY_TYPES = frozenset({protocol.INIT_OK, protocol.RESULT, protocol.ERROR, protocol.PONG})


def _above(fd: int, first_free: int) -> int:
    """Move ``fd`` to ``first_free`` or above, so the spawn's dup2s onto lower fds cannot clobber it."""
    if fd >= first_free:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, first_free)
    os.close(fd)
    return moved


def exit_reason(status: int) -> str:
    """``exited with code N`` or ``was killed by signal N``, from a ``waitpid`` status."""
    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"


def prepare_executable(spec: FunctionSpec) -> str:
    """The artifact the agent wrote to the task directory, made executable; its absolute path."""
    path = os.path.join(spec.task_dir, spec.filename)
    try:
        os.chmod(path, EXECUTABLE_MODE)
    except OSError as exc:
        raise InvocationError("InvalidCode", f"cannot make {spec.filename} executable: {exc}", fatal=True) from None
    return path


class Child:
    """One child process; ``what`` names it in messages ("the node process", "the Go program")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.pid = 0
        self.pidfd = -1
        self.exit_reason = ""  # set once the child is reaped

    def spawn(self, argv: list[str], fds: dict[int, int], search_path: bool = False) -> None:
        """Start ``argv`` with ``fds`` (child fd → our fd) and /dev/null on stdin unless given.

        Our ends in ``fds`` are closed once the child has them. The environment is the function's (the
        agent set it before ``load``); the working directory is the task directory.
        """
        first_free = max(max(fds, default=2), 2) + 1
        sources = {target: _above(source, first_free) for target, source in fds.items()}
        actions = [] if 0 in sources else [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
        actions += [(os.POSIX_SPAWN_DUP2, source, target) for target, source in sources.items()]
        spawn = os.posix_spawnp if search_path else os.posix_spawn
        try:
            self.pid = spawn(argv[0], argv, dict(os.environ), file_actions=actions, setsigdef=_RESTORED_SIGNALS)
        except OSError as exc:
            raise InvocationError("RuntimeUnavailable", f"cannot start {argv[0]}: {exc}", fatal=True) from None
        finally:
            for source in sources.values():
                os.close(source)
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # old kernel or a seccomp filter: rely on the pipes' EOF alone
            self.pidfd = -1

    def watch(self, poller) -> None:
        """Have ``poller`` wake up when the child exits (when the kernel gives pidfds)."""
        if self.pidfd >= 0:
            poller.register(self.pidfd, select.POLLIN)

    def stop(self, kill: bool = False) -> str:
        """Wait up to REAP_GRACE_S for the child to exit (after ``kill``, at once), kill it if not, reap it.

        The caller closes the child's pipes first, which is what makes a healthy child exit.
        """
        if self.exit_reason or not self.pid:
            return self.exit_reason
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if kill:
            os.kill(self.pid, _SIGKILL)
        deadline = time.monotonic() + REAP_GRACE_S
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        while not pid and time.monotonic() < deadline:
            time.sleep(0.005)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        if not pid:
            os.kill(self.pid, _SIGKILL)
            pid, status = os.waitpid(self.pid, 0)
        self.exit_reason = exit_reason(status)
        return self.exit_reason

    def exited(self) -> bool:
        """True once the child has ended (reaping it, and recording why, if it just did)."""
        if self.exit_reason:
            return True
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if not pid:
            return False
        self.exit_reason = exit_reason(status)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return True

    def died_error(self, close) -> InvocationError:
        """The ``RuntimeExit`` for a child found gone; ``close`` closes its pipes first if it must be reaped."""
        if self.exit_reason:
            return InvocationError("RuntimeExit", f"{self.what} {self.exit_reason} before this call", fatal=True)
        close()
        self.stop()
        return InvocationError("RuntimeExit", f"{self.what} {self.exit_reason} during the call", fatal=True)


class FramedChild:
    """A child spoken to in ``nimbus.protocol`` frames: requests on its fd 3, replies from its fd 4."""

    def __init__(self, what: str) -> None:
        self.child = Child(what)
        self.channel: FdStream | None = None
        self.poller = None  # polls the reply pipe and the child's pidfd together

    def start(self, argv: list[str], search_path: bool = False) -> None:
        """Spawn the child with its two pipes."""
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            self.child.spawn(argv, {REQUEST_FD: request_read, REPLY_FD: reply_write}, search_path)
        except InvocationError:
            os.close(request_write)
            os.close(reply_read)
            raise
        self.channel = FdStream(reply_read, request_write)
        self.poller = select.poll()
        self.poller.register(reply_read, select.POLLIN)
        self.child.watch(self.poller)

    def request(self, header: dict, blob: bytes = b"") -> tuple[dict, bytes]:
        """Send one request and wait for its reply, or for the child to die (``RuntimeExit``)."""
        if self.child.exit_reason:
            raise self._died()
        try:
            protocol.send_frame(self.channel, header, blob)
        except OSError:  # EPIPE: the child is gone
            raise self._died() from None
        # A child that exits while a grandchild holds its pipes open shows up on the pidfd only.
        ready = {fd for fd, _ in self.poller.poll()}
        if self.channel.read_fd not in ready:
            raise self._died()
        try:
            return protocol.recv_frame(self.channel, REPLY_TYPES)
        except (EOFError, OSError):
            raise self._died() from None
        except protocol.ProtocolError as exc:
            if self.child.exited():  # it died in the middle of a reply
                raise self._died() from None
            self.stop(kill=True)
            raise InvocationError("RuntimeProtocolError", f"{self.child.what} broke the protocol: {exc}",
                                  fatal=True) from None

    def stop(self, kill: bool = False) -> None:
        """Close the pipes (a healthy child exits on that) and reap the child."""
        if self.channel is not None:
            self.channel.close()
        if self.child.pid:
            self.child.stop(kill)

    def _died(self) -> InvocationError:
        return self.child.died_error(self.channel.close)


def reported_error(header: dict, fatal: bool = False) -> InvocationError:
    """The error a child described in an ``error`` frame (``{type, message, stack}``) as ours."""
    error = header.get("error")
    if not isinstance(error, dict):
        error = {}
    type_, message, stack = (error.get(key) or "" for key in ("type", "message", "stack"))
    return InvocationError(type_ or "Error", message, stack, fatal)
