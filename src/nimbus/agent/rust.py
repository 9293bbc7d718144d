"""The ``rust`` runtime: the function is an executable whose ``main`` loops over JSON lines.

See docs/architecture.md#runtime-contract.

It is started once per machine with its stdin and stdout on pipes to the agent and its stderr on the
agent's fd 2 (so ``eprintln!`` lands in the call's logs). Each call writes the event as one line and reads
one result line back (:mod:`nimbus.agent.lines`). A line that is not JSON fails that call only; a line
over the result limit, or output beyond one line per event, puts the stream out of step and ends the
machine, as does the program exiting.
"""

import os

from nimbus.agent import lines
from nimbus.agent.base import Call, FunctionSpec, InvocationError
from nimbus.agent.child import Child, prepare_executable
from nimbus.agent.contract import RESULT_MAX


class LineProgram:
    """A child process serving the line protocol on its stdin and stdout."""

    def __init__(self, what: str) -> None:
        self.child = Child(what)
        self.channel: lines.LineChannel | None = None

    def start(self, argv: list[str]) -> None:
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        try:
            self.child.spawn(argv, {0: stdin_read, 1: stdout_write})
        except InvocationError:
            os.close(stdin_write)
            os.close(stdout_read)
            raise
        self.channel = lines.LineChannel(stdin_write, stdout_read, self.child.pidfd)

    def exchange(self, event: bytes) -> bytes:
        """One event line out, one result line (checked to be JSON) back."""
        if self.child.exit_reason:
            raise self._died()
        try:
            line = self.channel.exchange(lines.event_line(event), RESULT_MAX)
        except lines.PeerGone:
            raise self._died() from None
        except lines.LineTooLong:
            self.stop(kill=True)
            raise lines.too_long(RESULT_MAX) from None
        except lines.OutOfStep as exc:
            self.stop(kill=True)
            raise InvocationError("InvalidResult", f"{exc}: one event, one result line", fatal=True) from None
        return lines.parse_result(line)

    def stop(self, kill: bool = False) -> None:
        """Close stdin (the program's loop ends at EOF) and stdout, and reap it."""
        if self.channel is not None:
            self.channel.close()
        if self.child.pid:
            self.child.stop(kill)

    def _died(self) -> InvocationError:
        return self.child.died_error(self.channel.close)


class RustRuntime:
    """Runs the function's executable and hands it one event line per call."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.path: str | None = None
        self.program = LineProgram("the Rust program")

    def prepare(self) -> None:
        """Make the artifact executable, before the task directory turns read-only."""
        self.path = prepare_executable(self.spec)

    def load(self) -> None:
        """Start the program; it waits for its first line (the line protocol has no handshake)."""
        self.program.start([self.path or prepare_executable(self.spec)])

    def invoke(self, event: bytes, call: Call) -> bytes:
        """Run one call and return the program's result line."""
        return self.program.exchange(event)

    def close(self) -> None:
        """End of file on its stdin, then reap it."""
        self.program.stop()


def runtime(spec: FunctionSpec) -> RustRuntime:
    """Entry point of the runtime registry in ``nimbus.agent.main``."""
    return RustRuntime(spec)
