"""The ``go`` runtime: the function is a static executable, run once per machine and kept for every call.

The compiler builds the user's ``Handle`` together with the generated ``runtimes/nimbus_main.go``, which
serves ``nimbus.protocol`` frames on the program's fd 3 (requests) and fd 4 (replies): ``ping`` →
``pong``, ``exec`` (blob: the event) → ``result`` (blob: the JSON of Handle's value) or ``error``. A
returned error or a recovered panic is an ordinary error reply; the program dying mid-call (``os.Exit``,
a panic in another goroutine, the OOM killer) is ``RuntimeExit`` and ends the machine. Its stdout and
stderr are the agent's fds 1 and 2, i.e. the call's logs.
"""

from nimbus import protocol
from nimbus.agent.base import Call, FunctionSpec, InvocationError, check_result_size
from nimbus.agent.child import FramedChild, prepare_executable, reported_error


class GoRuntime:
    """Drives the Go program: spawn, a ``ping`` to see it serve, then one ``exec`` at a time."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.path: str | None = None
        self.child = FramedChild("the Go program")

    def prepare(self) -> None:
        """Make the artifact executable, before the task directory turns read-only."""
        self.path = prepare_executable(self.spec)

    def load(self) -> None:
        """Start the program and wait for its ``pong``: a binary that cannot serve fails the init."""
        self.child.start([self.path or prepare_executable(self.spec)])
        header, _ = self.child.request({"type": protocol.PING})
        if header["type"] != protocol.PONG:
            self.child.stop(kill=True)
            raise InvocationError("RuntimeProtocolError", f"the Go program answered a ping with {header['type']!r}",
                                  fatal=True)

    def invoke(self, event: bytes, call: Call) -> bytes:
        """Run one call in the program and return its JSON result."""
        header, blob = self.child.request({"type": protocol.EXEC, "invocation_id": call.invocation_id}, event)
        if header["type"] == protocol.RESULT:
            return check_result_size(blob)
        if header["type"] == protocol.ERROR:
            raise reported_error(header)
        self.child.stop(kill=True)
        raise InvocationError("RuntimeProtocolError", f"the Go program answered an exec with {header['type']!r}",
                              fatal=True)

    def close(self) -> None:
        """Close the channel (the program exits 0 on its end) and reap it."""
        self.child.stop()


def runtime(spec: FunctionSpec) -> GoRuntime:
    """Entry point of the runtime registry in ``nimbus.agent.main``."""
    return GoRuntime(spec)
