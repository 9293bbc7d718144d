"""The ``wasm`` runtime: a WASI command module run in the agent's process with wasmtime.

:func:`make_engine` is shared with the host's compiler: a serialized module only loads into an engine
configured exactly as the one that compiled it, so both sides build their engine here.

The artifact is ``Module(make_engine(), wasm).serialize()`` (made by the host's compiler, never taken
from a user as is: deserializing trusts the bytes to be wasmtime's own output). At ``init`` it is loaded
and instantiated once, and ``_start`` runs in a thread of its own for the rest of the machine's life,
speaking the line protocol of :mod:`nimbus.agent.lines` (docs/architecture.md#runtime-contract) over
two pipes: one JSON event per line on its WASI stdin, one JSON result per line on its WASI stdout;
WASI stderr is the agent's fd 2, so it lands in the call's logs. Module globals and linear memory
persist between calls, as a warm Lambda's do.

Limits: ``Store.set_limits`` caps linear memory at the function's ``memory_mb`` (``memory.grow`` past it
returns -1, which a module typically answers with a trap or an exit, reported as
``MemoryLimitExceeded``). Time: the engine has epoch interruption on and the store traps at the first
epoch tick; the agent, which waits for the result in ``poll`` with the call's deadline as its timeout,
ticks the epoch itself when that timeout passes, so no timer thread exists and nothing wakes up between
calls. Both end the machine, as a trap or ``proc_exit`` does: wasm state after a trap is not trusted.

wasmtime is imported only here, when a wasm machine is initialised (it costs ~33 ms). bwrap machines
do not see the host's virtualenv; the driver binds the wasmtime package alone at
``WASMTIME_SITE/wasmtime``.
"""

import os
import sys

from nimbus.agent import lines
from nimbus.agent.base import Call, FunctionSpec, InvocationError
from nimbus.agent.contract import RESULT_MAX, WASMTIME_SITE

INTERRUPT_GRACE_S = 0.5  # after the epoch tick, how long the trap gets to land before the call is given up
JOIN_S = 1.0  # how long close() waits for _start to return once its stdin is closed
WASM_PAGE = 64 * 1024


def make_engine():
    """The wasmtime engine every wasm machine and the compiler use (epoch interruption on)."""
    import wasmtime

    config = wasmtime.Config()
    config.epoch_interruption = True  # the call's deadline traps the module instead of killing the machine
    return wasmtime.Engine(config)


def import_wasmtime():
    """The wasmtime module, found in the machine's read-only bind when there is one."""
    if os.path.isdir(WASMTIME_SITE) and WASMTIME_SITE not in sys.path:
        sys.path.insert(0, WASMTIME_SITE)
    try:
        import wasmtime
    except ImportError as exc:
        raise InvocationError("RuntimeUnavailable", f"the wasm runtime needs wasmtime-py: {exc}", fatal=True) from None
    return wasmtime


def _describe(exc: BaseException) -> tuple[str, str]:
    """``(message, stack)`` of a wasmtime error: its cause (``wasm trap: …``) and the wasm backtrace."""
    text = str(exc).strip()
    head, marker, cause = text.partition("\nCaused by:")
    if not marker:
        return text, ""
    return " ".join(cause.split()), head.strip()


class WasmRuntime:
    """One module instance for the machine; its ``_start`` serves every call."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.wasmtime = None
        self.engine = None
        self.store = None
        self.instance = None
        self.channel: lines.LineChannel | None = None
        self.end_read = -1  # closed by the thread when _start ends
        self.thread = None
        self.ended = False  # _start has returned or raised
        self.outcome: BaseException | None = None  # what _start raised (None: it returned)
        self.broken = ""  # why this machine cannot serve another call

    # ------------------------------------------------------------------ init

    def load(self) -> None:
        """Deserialize the artifact, instantiate it with WASI on pipes, and start ``_start`` in a thread."""
        wasmtime = self.wasmtime = import_wasmtime()
        self.engine = make_engine()
        path = os.path.join(self.spec.task_dir, self.spec.filename)
        try:
            module = wasmtime.Module.deserialize_file(self.engine, path)
        except wasmtime.WasmtimeError as exc:
            raise InvocationError("InvalidCode", f"{self.spec.filename} is not a module serialized by this "
                                  f"wasmtime: {_describe(exc)[0]}", fatal=True) from None
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        self.store = wasmtime.Store(self.engine)
        self.store.set_limits(memory_size=self.spec.memory_mb << 20)
        self.store.set_epoch_deadline(1)  # the first tick traps, and only a call that ran out of time ticks
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        try:
            wasi = wasmtime.WasiConfig()
            wasi.argv = [self.spec.name]
            wasi.env = list(os.environ.items())  # the function's environment, set by the agent
            # WASI opens paths: /proc/self/fd/N gives it its own fd on the same pipe.
            wasi.stdin_file = f"/proc/self/fd/{stdin_read}"
            wasi.stdout_file = f"/proc/self/fd/{stdout_write}"
            wasi.inherit_stderr()
            self.store.set_wasi(wasi)
        except wasmtime.WasmtimeError as exc:
            for fd in (stdin_read, stdin_write, stdout_read, stdout_write):
                os.close(fd)
            raise InvocationError("RuntimeUnavailable", f"cannot set up WASI: {exc}", fatal=True) from None
        os.close(stdin_read)
        os.close(stdout_write)
        try:
            self.instance = linker.instantiate(self.store, module)
            start = self.instance.exports(self.store).get("_start")
            if not isinstance(start, wasmtime.Func):
                raise InvocationError("InvalidCode", "the module exports no _start function: it is not a WASI "
                                      "command module", fatal=True)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            os.close(stdin_write)
            os.close(stdout_read)
            message, stack = _describe(exc)
            if "exceeds memory limits" in message:  # its initial memory alone is over the limit
                kind, message = "MemoryLimitExceeded", f"{message} (the function has {self.spec.memory_mb} MiB)"
            else:  # a trap in its start function, or an import WASI does not provide
                kind = "Trap" if isinstance(exc, wasmtime.Trap) else "InvalidCode"
            raise InvocationError(kind, f"cannot instantiate the module: {message}", stack, fatal=True) from None
        except InvocationError:
            os.close(stdin_write)
            os.close(stdout_read)
            raise
        self.end_read, end_write = os.pipe()
        self.channel = lines.LineChannel(stdin_write, stdout_read, self.end_read)
        import threading

        self.thread = threading.Thread(target=self._run, args=(start, end_write), name="nimbus-wasm", daemon=True)
        self.thread.start()

    def _run(self, start, end_write: int) -> None:
        """The thread's whole life: ``_start`` until it returns or traps; then the end pipe closes."""
        try:
            start(self.store)
        except BaseException as exc:  # Trap, ExitTrap, WasmtimeError: reported by the next call
            self.outcome = exc
        finally:
            self.ended = True
            os.close(end_write)

    # ------------------------------------------------------------------ calls

    def invoke(self, event: bytes, call: Call) -> bytes:
        """Write the event line, wait for the result line or the deadline, return the result."""
        if self.broken:
            raise InvocationError("RuntimeExit", f"{self.broken} before this call", fatal=True)
        try:
            line = self.channel.exchange(lines.event_line(event), RESULT_MAX, call.remaining_ms() / 1000)
        except lines.NoReply:
            raise self._interrupt(call) from None
        except lines.PeerGone:
            raise self._ended_error(call) from None
        except lines.LineTooLong:
            self.broken = "the module's result stream is out of step"
            raise lines.too_long(RESULT_MAX) from None
        except lines.OutOfStep as exc:
            self.broken = "the module's result stream is out of step"
            raise InvocationError("InvalidResult", f"{exc}: one event, one result line", fatal=True) from None
        return lines.parse_result(line)

    def _interrupt(self, call: Call) -> InvocationError:
        """The deadline passed: tick the epoch (the module traps at its next wasm instruction) and report it."""
        self.engine.increment_epoch()
        self.broken = "the module was interrupted at a deadline"
        message = f"the call did not finish within its deadline of {call.deadline_ms:g} ms"
        if not self._wait_end(INTERRUPT_GRACE_S):
            message += " (the module is blocked in a WASI call and was left there)"
        return InvocationError("TimeoutError", message, fatal=True)

    def _ended_error(self, call: Call) -> InvocationError:
        """Why ``_start`` ended during the call, as the error the host hears."""
        self._wait_end(JOIN_S)
        wasmtime, outcome = self.wasmtime, self.outcome
        if isinstance(outcome, wasmtime.Trap) and outcome.trap_code == wasmtime.TrapCode.INTERRUPT:
            # Ticked by nobody but us, so only after a deadline (a race at the very edge of one).
            self.broken = "the module was interrupted at a deadline"
            return InvocationError("TimeoutError", f"the call did not finish within its deadline of "
                                   f"{call.deadline_ms:g} ms", fatal=True)
        full = self._memory_full()
        if isinstance(outcome, wasmtime.ExitTrap):
            self.broken = f"the module exited with code {outcome.code}"
            kind, message, stack = "RuntimeExit", f"{self.broken} during the call", ""
            if outcome.code == 0:
                full = False  # a clean exit is no allocation failure
        elif outcome is None:
            self.broken = "the module's _start returned"
            kind, message, stack, full = "RuntimeExit", f"{self.broken} (exit code 0) during the call", "", False
        elif isinstance(outcome, wasmtime.Trap | wasmtime.WasmtimeError):
            self.broken = "the module trapped"
            kind = "Trap"
            message, stack = _describe(outcome)
        else:  # a failure of wasmtime-py itself
            self.broken = "the wasm runtime failed"
            kind, message, stack = "AgentError", f"{type(outcome).__name__}: {outcome}", ""
        if full:
            # memory.grow most likely returned -1 at the limit and the module gave up: say that, not just
            # "unreachable" (wasmtime-py has no hook that reports a refused grow itself).
            kind = "MemoryLimitExceeded"
            message += (f"; its linear memory is at {self._memory_used() / (1 << 20):.1f} MiB of the function's "
                        f"limit of {self.spec.memory_mb} MiB, and memory.grow past the limit fails")
        return InvocationError(kind, message, stack, fatal=True)

    def _memory_used(self) -> int:
        """Bytes of the module's exported linear memory (0 without one); only after ``_start`` ended."""
        memory = self.instance.exports(self.store).get("memory")
        return memory.data_len(self.store) if isinstance(memory, self.wasmtime.Memory) else 0

    def _memory_full(self) -> bool:
        """True when the module's memory is within the last sixteenth of its limit: allocators grow in
        chunks, so a refused grow leaves up to a chunk unused below the limit."""
        limit = self.spec.memory_mb << 20
        return self._memory_used() + max(WASM_PAGE, limit // 16) > limit

    def _wait_end(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``_start`` to end; True if it has."""
        self.thread.join(seconds)
        return self.ended

    def close(self) -> None:
        """End of file on the module's stdin: a looping ``_start`` returns; wait a little for it."""
        if self.channel is not None:
            self.channel.close()
            if not self.broken:
                self.thread.join(JOIN_S)
            os.close(self.end_read)
            self.channel = None


def runtime(spec: FunctionSpec) -> WasmRuntime:
    """Entry point of the runtime registry in ``nimbus.agent.main``."""
    return WasmRuntime(spec)
