"""The guest agent: the process inside every machine that loads one function and runs its calls.

Launched by the machine driver (bwrap now, Firecracker later) as::

    python3 -I -S -c "import sys; sys.path.insert(0, '/opt/nimbus'); \\
        from nimbus.agent.main import main; main(sys.argv[1:])" --fd 3 --task-dir /var/task

or, as a Firecracker guest's agent, with ``--vsock-port 9999`` instead of ``--fd 3``: it then listens on
that vsock port for the machine's whole life and serves each connection the host makes in turn, since
restoring a snapshot closes the connection the machine had when it was taken (the function it loaded, if
any, stays loaded). There the machine ends when the host stops the VM, or on a protocol violation.

It reads ``nimbus.protocol`` frames from the connected fd and answers each in turn
(docs/architecture.md#frame-protocol):
``ping`` → ``pong``; ``init`` (once) → ``init_ok`` | ``error``; ``exec`` → ``result`` | ``error``;
``snapshot`` (a machine made forkable, before any ``exec``) → ``snapshot_ok``, after which it only forks
(:mod:`nimbus.agent.forks`). The end of the stream exits 0; an unknown frame type or a malformed frame
exits non-zero, since the host never sends one. Stdlib only, importing nothing of nimbus but the
protocol, and only cheap modules at start: every cold start pays for them.
"""

import os
import sys
import time

from nimbus import protocol
from nimbus.agent.base import Call, FunctionSpec, InvocationError, too_deep
from nimbus.agent.channel import HOST_READ_AHEAD, VSOCK_PORT_MAX, FdStream, VsockUnavailable, accept, listen_vsock
from nimbus.agent.contract import TASK_DIR
from nimbus.agent.logs import LogCapture

DEFAULT_FD = 3
DEFAULT_TASK_DIR = TASK_DIR
EXIT_OK = 0  # the host closed the channel
EXIT_CHANNEL = 1  # the channel failed (reset, write error)
EXIT_PROTOCOL = 2  # the host sent something it never should
EXIT_USAGE = 64  # bad command line (sysexits' EX_USAGE)
EXIT_UNAVAILABLE = 69  # --vsock-port on a system without AF_VSOCK (EX_UNAVAILABLE)
EXIT_CRASH = 70  # a bug in the agent itself (EX_SOFTWARE)
USAGE = "usage: main [--fd N | --vsock-port PORT] [--task-dir PATH] [--seal-fd N] [--fork-fd N]"
TREE_FILE_MODE, TREE_EXEC_MODE = 0o644, 0o755
SEAL_REQUEST, SEAL_DONE = b"s", b"k"  # asked of, and answered by, a template machine's init (_seal)
INIT_TAIL_MAX = 4096  # characters of a failed init's output put in its error's stack when it has none
ENTROPY_MAX_BYTES = 512  # an init's "entropy" (hex): far more than the 32 bytes the host sends
RNDRESEEDCRNG = 0x5207  # <linux/random.h> _IO('R', 0x07): reseed the kernel's CRNG from its input pool now

# Runtime id → the agent module that implements it (imported only when a machine is initialised with it).
RUNTIMES = {"python3": "python3", "nodejs": "nodejs", "go": "go", "rust": "rust", "wasm": "wasm",
            "provided": "provided"}


class Options:
    """The command line, parsed by hand: argparse costs ~20 ms to import in every machine."""

    __slots__ = ("fd", "task_dir", "seal_fd", "vsock_port", "fork_fd")

    def __init__(self, fd: int = DEFAULT_FD, task_dir: str = DEFAULT_TASK_DIR, seal_fd: int | None = None,
                 vsock_port: int | None = None, fork_fd: int | None = None) -> None:
        self.fd = fd
        self.task_dir = task_dir
        self.seal_fd = seal_fd  # where the machine's init makes the task dir read-only on request
        self.vsock_port = vsock_port  # listen here for the host instead of using ``fd`` (Firecracker guests)
        self.fork_fd = fork_fd  # a function template's fork control socket (nimbus.agent.forks)


def parse_args(argv: list[str]) -> Options:
    """Read ``--fd N`` or ``--vsock-port PORT``, ``--task-dir PATH``, ``--seal-fd N`` and ``--fork-fd N``
    (also as ``--fd=N``).

    ValueError on anything else, and on ``--fd`` and ``--vsock-port`` together: the channel is one or
    the other.
    """
    options = Options()
    args = list(argv)
    seen = set()
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name not in ("--fd", "--task-dir", "--seal-fd", "--vsock-port", "--fork-fd"):
            raise ValueError(f"unknown argument {arg!r}")
        if not eq:
            if not args:
                raise ValueError(f"{name} needs a value")
            value = args.pop(0)
        seen.add(name)
        if name == "--vsock-port":
            if not (value.isascii() and value.isdigit()) or int(value) > VSOCK_PORT_MAX:
                raise ValueError(f"--vsock-port must be a port number from 0 to {VSOCK_PORT_MAX}, not {value!r}")
            options.vsock_port = int(value)
        elif name in ("--fd", "--seal-fd", "--fork-fd"):
            fd = int(value)
            if fd < 0:
                raise ValueError(f"{name} must be a file descriptor number")
            setattr(options, {"--fd": "fd", "--seal-fd": "seal_fd", "--fork-fd": "fork_fd"}[name], fd)
        else:
            options.task_dir = os.path.abspath(value)
    if "--fd" in seen and "--vsock-port" in seen:
        raise ValueError("--fd and --vsock-port are exclusive: the channel is an inherited fd or a vsock, not both")
    return options


def _write_tree(spec: FunctionSpec, blob: bytes) -> None:
    """Write a package sent as a file tree (``protocol.decode_tree`` checked every name and size)."""
    try:
        entries = protocol.decode_tree(blob)
    except protocol.ProtocolError as exc:
        raise InvocationError("InvalidCode", f"cannot unpack the package: {exc}", fatal=True) from None
    made = {spec.task_dir}
    try:
        for name, kind, content in entries:
            fd = _create(spec, made, name, kind)
            if fd is None:
                continue
            try:
                view = content
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
    except OSError as exc:
        raise InvocationError("InvalidCode", f"cannot unpack the package: {exc}", fatal=True) from None


def _create(spec: FunctionSpec, made: set, name: str, kind: str) -> int | None:
    """Make ``name`` (a checked relative path) in the task directory: a directory (None), or a new file's fd.

    ``O_EXCL | O_NOFOLLOW``: a file is never written twice, nor through a link, whatever the package holds.
    """
    path = os.path.join(spec.task_dir, name)
    parent = path if kind == "d" else os.path.dirname(path)
    if parent not in made:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        made.add(parent)
    if kind == "d":
        return None
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                   TREE_EXEC_MODE if kind == "x" else TREE_FILE_MODE)


def _write_zip(spec: FunctionSpec, blob: bytes) -> None:
    """Unpack a package sent as its zip (one too big to send as a tree) as strictly as a tree.

    Every name is checked and normalised as the host did (``protocol.package_path``), links are refused,
    files are made as by :func:`_create`, exec bits kept, and no entry writes more than the size it
    declared (nor all more than ``protocol.UNPACKED_MAX``). Only such machines import zipfile.
    """
    import io
    import zipfile
    import zlib

    try:
        from lzma import LZMAError as lzma_error  # noqa: N813 - a class bound in a local, maybe to another
    except ImportError:  # a Python without lzma: zipfile cannot read such entries at all
        lzma_error = NotImplementedError

    def fail(message: str) -> InvocationError:
        return InvocationError("InvalidCode", f"cannot unpack the package: {message}", fatal=True)

    made = {spec.task_dir}
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            infos = archive.infolist()
            if len(infos) > protocol.TREE_ENTRIES_MAX:
                raise fail(f"{len(infos)} entries, over {protocol.TREE_ENTRIES_MAX}")
            if sum(info.file_size for info in infos) > protocol.UNPACKED_MAX:
                raise fail(f"it unpacks to more than {protocol.UNPACKED_MAX} bytes")
            for info in infos:
                why = protocol.zip_name_error(info.filename)
                mode = info.external_attr >> 16
                if why is None and mode & 0o170000 == 0o120000:  # S_IFLNK: stat is one import more
                    why = "is a symbolic link"
                if why is not None:
                    raise fail(f"entry {info.filename[:200]!r} {why}")
                name = protocol.package_path(info.filename)
                if not name:
                    continue
                kind = "d" if info.is_dir() else "x" if mode & 0o111 else ""
                fd = _create(spec, made, name, kind)
                if fd is None:
                    continue
                try:
                    left = info.file_size
                    with archive.open(info) as source:
                        while chunk := source.read(min(left + 1, 1 << 20)):
                            left -= len(chunk)
                            if left < 0:
                                raise fail(f"entry {name!r} holds more than its {info.file_size} bytes")
                            view = memoryview(chunk)
                            while view:
                                view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError, RuntimeError,
            zlib.error, lzma_error, OSError) as exc:
        raise fail(str(exc)) from None


def _write_code(spec: FunctionSpec, code: bytes) -> None:
    """Put the function's code in the task directory: one source file, or a package (a tree, or a zip)."""
    if spec.filename == protocol.TREE_FILENAME:
        _write_tree(spec, code)
        return
    if spec.filename == protocol.ZIP_FILENAME:
        _write_zip(spec, code)
        return
    try:
        with open(os.path.join(spec.task_dir, spec.filename), "wb") as file:
            file.write(code)
    except OSError as exc:
        raise InvocationError("InvalidCode", f"cannot write {spec.filename}: {exc}", fatal=True) from None


def _seal(fd: int | None) -> None:
    """Have the machine's init make the task directory read-only, now the code is in it (template machines).

    Before any of the function's code runs, so no call can rewrite the code later calls load (Lambda's
    /var/task is read-only too). One request on ``fd``, then it is closed. Booted machines have no init
    that may remount (no ``fd``): their task directory stays writable by the function.
    """
    if fd is None:
        return
    try:
        os.write(fd, SEAL_REQUEST)
        answer = os.read(fd, 1)
    except OSError as exc:
        answer = f"{exc}".encode()
    finally:
        os.close(fd)
    if answer != SEAL_DONE:
        raise InvocationError("SealFailed", "the machine could not make the task directory read-only: "
                              f"{answer.decode(errors='replace') or 'its init did not answer'}", fatal=True)


def _reseed(header: dict) -> None:
    """Mix the host's fresh bytes into this machine's randomness before any function code runs.

    Every machine restored from one Firecracker snapshot wakes with the same kernel entropy pool and
    the same Python ``random`` state, so without this, clones would hand out the same "random" keys and
    ids. The bytes are written to ``/dev/urandom`` (mixed in, never trusted alone), then the kernel is
    asked to reseed its CRNG at once (``RNDRESEEDCRNG``; root only, which the guest's agent is; kernels
    with VMGenID do it themselves on restore), and a ``random`` module imported before the snapshot is
    reseeded from the result. A machine that was not restored is sent none and skips all of it.
    """
    entropy = header.get("entropy")
    if entropy is None:
        return
    if not isinstance(entropy, str) or len(entropy) > 2 * ENTROPY_MAX_BYTES:
        raise InvocationError("InvalidInit", "entropy must be a hex string of at most "
                              f"{ENTROPY_MAX_BYTES} bytes")
    try:
        seed = bytes.fromhex(entropy)
    except ValueError:
        raise InvocationError("InvalidInit", "entropy must be a hex string") from None
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:  # no /dev/urandom to write (not a guest): nothing to reseed
        return
    try:
        os.write(fd, seed)
        try:
            import fcntl

            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError:  # not root, or a kernel before 4.17: the mixed-in bytes still count at the next reseed
            pass
    finally:
        os.close(fd)
    if "random" in sys.modules:
        sys.modules["random"].seed()


def _run_hooks(getter: str, reverse: bool = False) -> None:
    """Run the function's SnapStart runtime hooks, as Lambda does around a snapshot.

    ``snapshot_restore_py`` (the library Lambda's python runtimes include, bundled with the SDK) keeps
    what the function registered; ``get_before_snapshot`` hooks run in the template before it forks, in
    reverse order of registration, ``get_after_restore`` ones in each fork before its first call, in order.
    A function that never imported the library has none. A hook that raises fails the snapshot (no
    template is kept) or the fork (its first call answers the error).
    """
    module = sys.modules.get("snapshot_restore_py")
    registry = getattr(module, getter, None) if module is not None else None
    if not callable(registry):
        return
    try:
        hooks = list(registry())
        for func, args, kwargs in reversed(hooks) if reverse else hooks:
            func(*args, **kwargs)
    except Exception as exc:
        kind = "BeforeSnapshotHookError" if reverse else "AfterRestoreHookError"
        raise InvocationError(kind, f"a SnapStart runtime hook failed: {type(exc).__name__}: {exc}",
                              fatal=True) from None


def _apply_environment(spec: FunctionSpec) -> None:
    """Give the process the function's environment and working directory before its code loads."""
    env = spec.environment()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(spec.task_dir)


def _make_runtime(spec: FunctionSpec):
    module = RUNTIMES.get(spec.runtime)
    if module is None:
        known = ", ".join(sorted(RUNTIMES))
        raise InvocationError("UnknownRuntime", f"runtime {spec.runtime!r} is not one of {known}", fatal=True)
    import importlib

    return importlib.import_module(f"nimbus.agent.{module}").runtime(spec)


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


class Agent:
    """Serves one channel: reads a frame, answers it, until the host hangs up."""

    def __init__(self, channel: FdStream | None, task_dir: str, logs: LogCapture, seal_fd: int | None = None,
                 fork_fd: int | None = None, fork_program: bytes = b"", fork_server=None) -> None:
        self.channel = channel
        self.task_dir = task_dir
        self.seal_fd = seal_fd
        self.fork_fd = fork_fd  # set: this machine may become its version's function template
        self.fork_program = fork_program  # the seccomp filter each fork of it installs
        self.fork_server = fork_server  # nimbus.agent.forks.serve, given by the runtime template that made it
        self.logs = logs
        self.spec: FunctionSpec | None = None
        self.runtime = None
        self.init_seen = False
        self.pristine = True  # no call ran here yet: its state is the version's as loaded
        self.restore_error: InvocationError | None = None  # an after-restore hook of a fork failed
        self.handlers = {protocol.PING: self.on_ping, protocol.INIT: self.on_init, protocol.EXEC: self.on_exec,
                         protocol.SNAPSHOT: self.on_snapshot}

    def serve(self) -> int:
        """Answer frames until the channel ends; return the exit status."""
        while True:
            try:
                header, blob = self.channel.recv_frame(protocol.HOST_TYPES)
            except EOFError:
                return EXIT_OK
            except protocol.ProtocolError as exc:
                self.logs.diag(f"closing the channel: {exc}")
                return EXIT_PROTOCOL
            except OSError as exc:
                self.logs.diag(f"channel failed: {exc}")
                return EXIT_CHANNEL
            reply, reply_blob = self.handlers[header["type"]](header, blob)
            reply["id"] = header.get("id")
            try:
                self.send(reply, reply_blob)
            except OSError as exc:
                self.logs.diag(f"channel failed: {exc}")
                return EXIT_CHANNEL
            if reply["type"] == protocol.SNAPSHOT_OK:
                self.fork_server(self, self.fork_fd, self.fork_program)  # never returns
            after_reply = getattr(self.runtime, "after_reply", None)
            if after_reply is not None:
                # What the runtime owes its own process once the host has its answer; it may use the time
                # until the host's next frame arrives on this fd (none is read ahead: the host waits for us).
                after_reply(-1 if self.channel.has_pending() else self.channel.read_fd)

    def send(self, header: dict, blob: bytes) -> None:
        """Send a reply; should it break the frame limits anyway, say so instead of going silent."""
        try:
            frame = protocol.encode(header, blob)
        except protocol.ProtocolError as exc:
            error = InvocationError("AgentError", f"the reply could not be encoded: {exc}", fatal=True)
            frame = protocol.encode({"type": protocol.ERROR, "id": header.get("id"), "error": error.to_dict(),
                                     "fatal": True})
        self.channel.sendall(frame)

    def close(self) -> None:
        """Stop the runtime's helpers (a child process, the wasm thread) and close the channel."""
        if self.runtime is not None:
            self.runtime.close()
        if self.channel is not None:
            self.channel.close()

    # ------------------------------------------------------------------ one handler per frame type

    def on_ping(self, header: dict, blob: bytes) -> tuple[dict, bytes]:
        return {"type": protocol.PONG}, b""

    def on_init(self, header: dict, blob: bytes) -> tuple[dict, bytes]:
        """Load the function this machine will serve for the rest of its life."""
        started = time.perf_counter()
        runtime = None
        try:
            if self.init_seen:
                raise InvocationError("AlreadyInitialized", "this machine was initialised already", fatal=True)
            self.init_seen = True
            spec = FunctionSpec(header, self.task_dir)
            _reseed(header)
            runtime = _make_runtime(spec)
            _write_code(spec, blob)
            prepare = getattr(runtime, "prepare", None)
            if prepare is not None:
                prepare()  # what the runtime itself writes in the task directory (links, exec bits)
            seal_fd, self.seal_fd = self.seal_fd, None
            _seal(seal_fd)
            _apply_environment(spec)
            runtime.load()
        except InvocationError as exc:
            if runtime is not None:
                runtime.close()  # no child process may outlive a failed init
            exc.fatal = True  # code may be half-loaded: the machine can serve no one now
            reply = self.error_reply(exc, started)
            if not reply["error"]["stack"] and reply["logs"]:
                # The host keeps an init's error, not its logs: a runtime that died says why on stderr.
                reply["error"]["stack"] = f"the last output before it failed:\n{reply['logs'][-INIT_TAIL_MAX:]}"
            return reply, b""
        self.spec, self.runtime = spec, runtime
        return {"type": protocol.INIT_OK, "duration_ms": _elapsed_ms(started)}, b""

    def on_snapshot(self, header: dict, blob: bytes) -> tuple[dict, bytes]:
        """Become the version's function template, once loaded and before any call ran (``serve`` switches)."""
        started = time.perf_counter()
        try:
            if self.runtime is None:
                raise InvocationError("NotInitialized", "snapshot before a successful init")
            if self.fork_fd is None or self.fork_server is None:
                raise InvocationError("NotForkable", "this machine was not made to be a function template")
            if not getattr(self.runtime, "forkable", False):
                raise InvocationError("NotForkable", f"the {self.spec.runtime} runtime cannot be forked")
            if not self.pristine:
                raise InvocationError("NotForkable", "this machine served a call: its state is no longer the "
                                      "version's as loaded")
            _run_hooks("get_before_snapshot", reverse=True)
        except InvocationError as exc:
            return self.error_reply(exc, started), b""
        return {"type": protocol.SNAPSHOT_OK}, b""

    def resume(self, channel: int) -> None:
        """In a fork of the function template: serve the new machine's own channel. Never returns."""
        self.fork_fd = None
        self.pristine = False  # a fork is a machine, never a template
        self.logs = LogCapture()
        self.logs.start()
        self.channel = FdStream(channel, read_ahead=HOST_READ_AHEAD)
        try:
            _run_hooks("get_after_restore")
        except InvocationError as exc:  # the first call answers it, and the machine is not used again
            self.runtime, self.restore_error = None, exc
        status = self.serve()
        self.close()
        os._exit(status)

    def on_exec(self, header: dict, blob: bytes) -> tuple[dict, bytes]:
        """Run one call; the reply carries the output (or the error) and the call's logs."""
        started = time.perf_counter()
        self.pristine = False
        self.logs.begin()  # what came after the last answer is no part of this call
        try:
            if self.restore_error is not None:
                raise self.restore_error
            if self.runtime is None:
                raise InvocationError("NotInitialized", "exec before a successful init", fatal=True)
            if not getattr(self.runtime, "checks_nesting", False) and protocol.nesting_over(blob):
                raise too_deep()
            output = self.runtime.invoke(blob, Call(header, self.spec))
        except InvocationError as exc:
            return self.error_reply(exc, started), b""
        duration_ms = _elapsed_ms(started)
        logs, truncated = self.logs.collect()
        reply = {"type": protocol.RESULT, "duration_ms": duration_ms, "logs": logs, "logs_truncated": truncated}
        return reply, output

    def error_reply(self, exc: InvocationError, started: float) -> dict:
        """An ``error`` frame header, with the logs written so far (they explain most failures)."""
        duration_ms = _elapsed_ms(started)
        logs, truncated = self.logs.collect()
        return {"type": protocol.ERROR, "error": exc.to_dict(), "duration_ms": duration_ms, "logs": logs,
                "logs_truncated": truncated, "fatal": exc.fatal}


def _listen_host(port: int):
    """Listen on vsock ``port`` for the host; exit with a clear message if there can be no such listener."""
    try:
        return listen_vsock(port)
    except VsockUnavailable as exc:
        print(f"nimbus-agent: --vsock-port {port}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_UNAVAILABLE) from None
    except OSError as exc:
        print(f"nimbus-agent: cannot listen for the host on vsock port {port}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CHANNEL) from None


def serve_listener(agent: "Agent", listener) -> int:
    """Serve the host's connections to ``listener`` one after another, with one ``agent`` (one function).

    A connection that ends or resets is followed by the next: that is how a restored snapshot is
    reached again. A protocol violation ends the machine, as in the fd mode.
    """
    while True:
        try:
            agent.channel = accept(listener)
        except OSError as exc:
            agent.logs.diag(f"cannot accept the host's connection: {exc}")
            return EXIT_CHANNEL
        status = agent.serve()
        agent.channel.close()
        if status == EXIT_PROTOCOL:
            return status


def main(argv: list[str] | None = None, fork_program: bytes = b"", fork_server=None) -> None:
    """Run the agent until the host is done with it, then exit the process.

    With ``--fork-fd``, the machine may become a function template: ``fork_server`` is then
    :func:`nimbus.agent.forks.serve` (passed in, so the agent imports it only in such machines) and
    ``fork_program`` the seccomp filter each fork installs.
    """
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
        channel = FdStream(options.fd, read_ahead=HOST_READ_AHEAD) if options.vsock_port is None else None
    except (ValueError, OSError) as exc:
        print(f"nimbus-agent: {exc}\n{USAGE}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    listener = _listen_host(options.vsock_port) if channel is None else None
    logs = LogCapture()
    logs.start()
    agent = Agent(channel, options.task_dir, logs, options.seal_fd, options.fork_fd, fork_program, fork_server)
    try:
        status = agent.serve() if listener is None else serve_listener(agent, listener)
    except BaseException:  # a bug of the agent's: report it to the host's diagnostics, not to the logs
        import traceback

        logs.diag(f"crashed:\n{traceback.format_exc()}")
        status = EXIT_CRASH
    agent.close()
    # os._exit, not sys.exit: threads or atexit hooks left by user code must not keep a finished
    # machine alive.
    os._exit(status)
