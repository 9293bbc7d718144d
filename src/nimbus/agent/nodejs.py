"""The ``nodejs`` runtime: one persistent ``node`` child per machine, running ``node_runner.js``.

The child is started at ``init`` (not per call), loads the handler once and keeps it, as Lambda does.
Requests go to it on a pipe that becomes its fd 3 and replies come back on a pipe that becomes its fd 4,
both in ``nimbus.protocol`` frames; its fds 1 and 2 are the agent's, so its output lands in the same
captured log as Python's would. If the child dies during a call (``process.exit``, a crash, the OOM
killer) the call fails with ``RuntimeExit`` and the machine is marked dead.
"""

import fcntl
import os
import select
import time

from nimbus import protocol
from nimbus.agent.base import RESULT_MAX, Call, FunctionSpec, InvocationError, check_result_size
from nimbus.agent.channel import FdStream

NODE = "node"  # found on PATH
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_runner.js")
CHILD_REQUEST_FD = 3
CHILD_REPLY_FD = 4
REAP_GRACE_S = 1.0  # how long a child that closed its pipes gets to exit before it is killed
REPLY_TYPES = frozenset({protocol.INIT_OK, protocol.RESULT, protocol.ERROR})
_SIGKILL = 9  # the signal module's enum costs milliseconds to import
_FIRST_FREE_FD = 5  # above the child's fds, so no dup2 below clobbers another


def _above_child_fds(fd: int) -> int:
    """Move ``fd`` above the fds the child gets, so the spawn's dup2s cannot collide."""
    if fd >= _FIRST_FREE_FD:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FIRST_FREE_FD)
    os.close(fd)
    return moved


def _exit_reason(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"


class NodeRuntime:
    """Drives the node child: spawn, ``init``, then one ``exec`` at a time."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.pid = 0
        self.channel: FdStream | None = None
        self.poller = None  # polls the reply pipe and the child's pidfd together
        self.pidfd = -1
        self.exit_reason = ""  # set once the child is gone

    def load(self) -> None:
        """Start node and have it import the handler."""
        self._spawn()
        request = {
            "type": protocol.INIT,
            "task_dir": self.spec.task_dir,
            "handler": self.spec.handler,
            "function_name": self.spec.name,
            "function_version": self.spec.version,
            "memory_mb": self.spec.memory_mb,
            "result_max": RESULT_MAX,
        }
        header, _ = self._request(request)
        if header["type"] != protocol.INIT_OK:
            raise self._reported_error(header, fatal=True)

    def invoke(self, event: bytes, call: Call) -> bytes:
        """Run one call in node and return its JSON result."""
        request = {"type": protocol.EXEC, "invocation_id": call.invocation_id, "deadline_ms": call.remaining_ms()}
        header, blob = self._request(request, event)
        if header["type"] != protocol.RESULT:
            raise self._reported_error(header)
        return check_result_size(blob)

    def close(self) -> None:
        """Close the channel (node exits on its end) and reap the child."""
        if self.pid and not self.exit_reason:
            self._stop()

    # ------------------------------------------------------------------ the child process

    def _spawn(self) -> None:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        request_read = _above_child_fds(request_read)
        reply_write = _above_child_fds(reply_write)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, request_read, CHILD_REQUEST_FD),
            (os.POSIX_SPAWN_DUP2, reply_write, CHILD_REPLY_FD),
        ]
        try:
            # The environment is the function's (set by the agent before load); fds 1 and 2 are inherited.
            self.pid = os.posix_spawnp(NODE, [NODE, RUNNER], dict(os.environ), file_actions=actions)
        except OSError as exc:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            raise InvocationError("RuntimeUnavailable", f"cannot start {NODE}: {exc}", fatal=True) from None
        os.close(request_read)
        os.close(reply_write)
        self.channel = FdStream(reply_read, request_write)
        self.poller = select.poll()
        self.poller.register(reply_read, select.POLLIN)
        try:
            self.pidfd = os.pidfd_open(self.pid)
            self.poller.register(self.pidfd, select.POLLIN)
        except (AttributeError, OSError):  # old kernel or a seccomp filter: rely on the pipe's EOF alone
            self.pidfd = -1

    def _request(self, header: dict, blob: bytes = b"") -> tuple[dict, bytes]:
        """Send one request and wait for its reply, or for the child to die."""
        if self.exit_reason:
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
            self._stop(kill=True)
            raise InvocationError("RuntimeProtocolError", f"the node runner broke the protocol: {exc}",
                                  fatal=True) from None

    def _reported_error(self, header: dict, fatal: bool = False) -> InvocationError:
        """The error the runner described (``{type, message, stack}``) as ours."""
        error = header.get("error")
        if not isinstance(error, dict):
            error = {}
        type_, message, stack = (error.get(key) or "" for key in ("type", "message", "stack"))
        return InvocationError(type_ or "Error", message, stack, fatal)

    def _died(self) -> InvocationError:
        if self.exit_reason:
            message = f"the node process {self.exit_reason} before this call"
        else:
            self._stop()
            message = f"the node process {self.exit_reason} during the call"
        return InvocationError("RuntimeExit", message, fatal=True)

    def _stop(self, kill: bool = False) -> None:
        """Close the pipes, wait up to REAP_GRACE_S for the child to exit (then kill it) and reap it."""
        self.channel.close()
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
        self.exit_reason = _exit_reason(status)


def runtime(spec: FunctionSpec) -> NodeRuntime:
    """Entry point of the runtime registry in ``nimbus.agent.main``."""
    return NodeRuntime(spec)
