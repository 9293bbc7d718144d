"""Per-machine cgroups: memory, pids and CPU limits, and killing a whole sandbox at once.

Works on the unified hierarchy (cgroup v2: one directory per machine with ``memory.max``,
``pids.max``, ``cpu.max`` and ``cgroup.kill``) and on the legacy one (cgroup v1: one directory per
controller, ``memory/…``, ``pids/…``, ``cpu/…``), and on hybrid hosts where each controller lives in
whichever of the two it is bound to.

Machine cgroups are made *below the node's own cgroup* (read from ``/proc/self/cgroup``), in
``<own>/nimbus/<machine-id>``: that is the part of the tree a node is allowed to manage (a systemd
service with ``Delegate=yes``, a container, a user session), and it keeps every machine inside whatever
limits were put on the node itself. On a pure v2 host whose own cgroup also holds the node process,
the "no internal processes" rule forbids enabling controllers there, so when the node is alone in its
cgroup it moves itself into the leaf ``<own>/nimbus-node`` first; when other processes share it,
cgroups are declared unavailable and the driver falls back to rlimits.

A machine process joins its cgroup before bwrap starts (:meth:`Cgroup.shell_join` for a ``/bin/sh``
launcher that then execs bwrap, or :meth:`Cgroup.join` as a ``preexec_fn``), so bwrap and everything
it forks are inside from the first instruction.

Usage::

    hierarchy = Hierarchy.detect()          # CgroupUnavailable when the tree is missing or read-only
    cgroup = hierarchy.create(machine_id, Limits(memory_bytes=..., pids_max=..., cpus=1.0))
    ... spawn ["/bin/sh", "-c", cgroup.shell_join() + 'exec "$@"', "name", *argv] ...
    cgroup.kill(); cgroup.remove()          # once the processes are gone
    hierarchy.close()
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nimbus.machines.cgroups")

CONTROLLERS = ("memory", "pids", "cpu")
BASE_NAME = "nimbus"  # the directory under the node's own cgroup that holds one directory per machine
NODE_LEAF = "nimbus-node"  # v2 only: where the node moves itself when its own cgroup must become a parent
CPU_PERIOD_US = 100_000
KILL_PASSES = 5  # v1 has no cgroup.kill: SIGKILL what is listed, a few passes to catch racing forks


class CgroupUnavailable(Exception):
    """No cgroup hierarchy this process may manage; the message says why."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one machine may use. ``None`` leaves that resource unlimited."""

    memory_bytes: int | None = None
    pids_max: int | None = None
    cpus: float | None = None  # CFS quota in CPUs (1.0 = one full core)


@dataclass(frozen=True, slots=True)
class _Mount:
    version: int  # 1 or 2
    path: Path  # where the hierarchy is mounted
    root: str  # which cgroup of the hierarchy is the mount's root (not "/" inside some containers)
    controllers: frozenset[str]  # v1: what the hierarchy carries; v2: empty (read cgroup.controllers)


@dataclass(frozen=True, slots=True)
class _Part:
    """One directory of a machine's cgroup and the controllers it limits there."""

    version: int
    path: Path
    controllers: frozenset[str]


def _join_file(version: int) -> str:
    """The file a single-threaded process writes "0" to, to move itself into a cgroup.

    On v1 that is ``tasks``: moving one thread (the caller) skips the kernel's write-lock on every
    thread group, whose RCU grace period made each ``cgroup.procs`` join cost 5-20 ms here (0.3 ms
    through ``tasks``). The joiners (a fresh ``sh`` launcher, a forked child) have one thread, so this
    moves the whole process. v2 accepts processes only through ``cgroup.procs``.
    """
    return "tasks" if version == 1 else "cgroup.procs"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_mounts() -> list[_Mount]:
    mounts: list[_Mount] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # "<id> <parent> <maj:min> <root> <mountpoint> <opts> [optional fields] - <fstype> <source> <superopts>"
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            root, point = _unescape(fields[3]), _unescape(fields[4])
            if tail[0] == "cgroup2":
                mounts.append(_Mount(2, Path(point), root, frozenset()))
            elif tail[0] == "cgroup":
                opts = frozenset(tail[2].split(","))
                mounts.append(_Mount(1, Path(point), root, opts & frozenset(CONTROLLERS)))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def _read_own_cgroups() -> tuple[str | None, dict[str, str]]:
    """Return (the v2 path, {v1 controller: path}) from /proc/self/cgroup."""
    unified, legacy = None, {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hid, _, rest = line.rstrip("\n").partition(":")
            names, _, path = rest.partition(":")
            if hid == "0" and names == "":
                unified = path
            else:
                for name in names.split(","):
                    legacy[name] = path
    return unified, legacy


def _own_dir(mount: _Mount, path: str) -> Path | None:
    """The directory of cgroup ``path`` under ``mount``, or None when the mount does not show it."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None  # we live outside the part of the hierarchy this mount exposes
    rel = path[len(root):].lstrip("/")
    return mount.path / rel if rel else mount.path


def _enable_v2(parent: Path, wanted: frozenset[str]) -> frozenset[str]:
    """Enable ``wanted`` controllers for the children of ``parent``; return those that are on."""
    for name in sorted(wanted):
        try:
            _write(parent / "cgroup.subtree_control", f"+{name}")
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise  # internal processes: the caller may be able to fix that
            log.debug("cannot enable %s in %s: %s", name, parent, exc)
    return wanted & frozenset((parent / "cgroup.subtree_control").read_text().split())


class Cgroup:
    """One machine's cgroup: one directory on v2, up to one per controller on v1."""

    def __init__(self, name: str, parts: tuple[_Part, ...]) -> None:
        self.name = name
        self.parts = parts
        # Precomputed for join(), which runs in a forked child: no allocation-heavy work there.
        self._procs_files = tuple(os.fsencode(p.path / _join_file(p.version)) for p in parts)

    @property
    def controllers(self) -> frozenset[str]:
        """The controllers whose limits this cgroup enforces."""
        out: frozenset[str] = frozenset()
        for part in self.parts:
            out |= part.controllers
        return out

    def join(self) -> None:
        """Move the calling process into this cgroup (every part). Safe to run between fork and exec."""
        for path in self._procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" means the writing process, on v1 and v2
            finally:
                os.close(fd)

    def open_join_files(self) -> list[int]:
        """Descriptors a process may write "0" to, to join this cgroup (the caller closes them).

        For a process that cannot open cgroupfs itself (a template's child, in its own mount namespace):
        cgroupfs checks the credentials of whoever opened the file, here the node.
        """
        fds: list[int] = []
        try:
            for path in self._procs_files:
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def shell_join(self) -> str:
        """``sh`` commands that move the shell into this cgroup (and stop it if that fails).

        For launching through ``/bin/sh -c '<this>exec "$@"' …``, the cheap way to join before exec.
        """
        lines = "".join(f"echo 0 >{shlex.quote(os.fsdecode(path))}; " for path in self._procs_files)
        return f"set -e; {lines}"

    def pids(self) -> set[int]:
        """The processes in this cgroup now (host pids)."""
        found: set[int] = set()
        for part in self.parts:
            try:
                text = (part.path / "cgroup.procs").read_text()
            except OSError:
                continue
            found.update(int(tok) for tok in text.split())
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup; ``cgroup.kill`` where the kernel has it."""
        for part in self.parts:
            if part.version == 2:
                try:
                    _write(part.path / "cgroup.kill", "1")
                    return  # atomic for the whole subtree, forks included
                except OSError:
                    pass  # kernels before 5.14: fall through to the listing loop
        for _ in range(KILL_PASSES):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer took from this cgroup (0 when unknown)."""
        for part in self.parts:
            if "memory" not in part.controllers:
                continue
            name = "memory.events" if part.version == 2 else "memory.oom_control"
            try:
                text = (part.path / name).read_text()
            except OSError:
                return 0
            for line in text.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def remove(self) -> bool:
        """Remove the directories; False when some are still busy (processes not yet gone)."""
        done = True
        for part in self.parts:
            try:
                part.path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    log.warning("cannot remove cgroup %s: %s", part.path, exc)
                done = False
        return done


class Hierarchy:
    """Where machine cgroups are made on this host, and which controllers they get."""

    def __init__(self, bases: tuple[_Part, ...]) -> None:
        self.bases = bases

    @property
    def controllers(self) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for base in self.bases:
            out |= base.controllers
        return out

    @property
    def version(self) -> int:
        """2 when every controller is on the unified hierarchy, else 1 (legacy or hybrid)."""
        return 2 if all(b.version == 2 for b in self.bases) else 1

    def describe(self) -> str:
        return ", ".join(f"{'+'.join(sorted(b.controllers))} on v{b.version} at {b.path}" for b in self.bases)

    @classmethod
    def detect(cls, wanted: tuple[str, ...] = CONTROLLERS) -> Hierarchy:
        """Find writable hierarchies for ``wanted`` controllers; ``CgroupUnavailable`` when none is."""
        try:
            mounts = _read_mounts()
            unified_path, legacy_paths = _read_own_cgroups()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read this process's cgroups: {exc}") from None
        reasons: list[str] = []
        bases: list[_Part] = []
        left = set(wanted)
        # Legacy hierarchies first: a controller bound to a v1 hierarchy is absent from v2.
        for name in wanted:
            mount = next((m for m in mounts if m.version == 1 and name in m.controllers), None)
            if mount is None or name not in legacy_paths:
                continue
            if any(name in b.controllers for b in bases):
                continue  # co-mounted with one already handled (cpu,cpuacct with cpu…)
            own = _own_dir(mount, legacy_paths[name])
            if own is None:
                reasons.append(f"{name}: own cgroup not visible under {mount.path}")
                continue
            base = own / BASE_NAME
            try:
                base.mkdir(exist_ok=True)
            except OSError as exc:
                reasons.append(f"{name}: cannot create {base}: {exc.strerror}")
                continue
            shared = mount.controllers & left
            bases.append(_Part(1, base, frozenset(shared)))
            left -= shared
        if left and unified_path is not None:
            mount = next((m for m in mounts if m.version == 2), None)
            if mount is not None:
                try:
                    bases.append(cls._unified_base(mount, unified_path, frozenset(left)))
                    left -= bases[-1].controllers
                except CgroupUnavailable as exc:
                    reasons.append(str(exc))
        if not bases:
            why = "; ".join(reasons) or "no cgroup hierarchy is mounted with the memory, pids or cpu controller"
            raise CgroupUnavailable(why)
        return cls(tuple(bases))

    @staticmethod
    def _unified_base(mount: _Mount, own_path: str, wanted: frozenset[str]) -> _Part:
        own = _own_dir(mount, own_path)
        if own is None:
            raise CgroupUnavailable(f"own cgroup {own_path} not visible under {mount.path}")
        if own.name == NODE_LEAF:
            own = own.parent  # an earlier driver of this process moved it there: the tree is ready
        try:
            available = frozenset((own / "cgroup.controllers").read_text().split()) & wanted
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read {own}/cgroup.controllers: {exc.strerror}") from None
        if not available:
            raise CgroupUnavailable(f"none of {', '.join(sorted(wanted))} is delegated to {own}")
        base = own / BASE_NAME
        try:
            base.mkdir(exist_ok=True)
            try:
                _enable_v2(own, available)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                Hierarchy._leave_own_cgroup(own)
                _enable_v2(own, available)
            enabled = _enable_v2(base, available)
        except OSError as exc:
            raise CgroupUnavailable(f"cannot set up {base}: {exc.strerror or exc}") from None
        if not enabled:
            raise CgroupUnavailable(f"cannot enable {', '.join(sorted(available))} in {base}")
        return _Part(2, base, enabled)

    @staticmethod
    def _leave_own_cgroup(own: Path) -> None:
        """Move this process into a leaf so ``own`` may enable controllers (v2's no-internal-process rule)."""
        others = set((own / "cgroup.procs").read_text().split()) - {str(os.getpid())}
        if others:
            raise CgroupUnavailable(
                f"{own} also holds processes {', '.join(sorted(others)[:5])}: run the node in a cgroup of its own "
                "(e.g. systemd-run --scope -p Delegate=yes) to get cgroup limits"
            )
        leaf = own / NODE_LEAF
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", "0")
        log.info("moved the node into %s so machine cgroups can have controllers", leaf)

    def create(self, name: str, limits: Limits) -> Cgroup:
        """Make ``<base>/<name>`` in every hierarchy and write ``limits``; OSError if that fails."""
        parts: list[_Part] = []
        cgroup = Cgroup(name, ())
        try:
            for base in self.bases:
                path = base.path / name
                path.mkdir()
                parts.append(_Part(base.version, path, base.controllers))
                cgroup = Cgroup(name, tuple(parts))
                _apply(parts[-1], limits)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def close(self) -> None:
        """Remove the base directories when no machine cgroup is left in them (other drivers may share them)."""
        for base in self.bases:
            try:
                base.path.rmdir()
            except OSError:
                pass


def _apply(part: _Part, limits: Limits) -> None:
    path, v1 = part.path, part.version == 1
    if "memory" in part.controllers and limits.memory_bytes is not None:
        if v1:
            _write(path / "memory.limit_in_bytes", str(limits.memory_bytes))
            # No swap: memsw (memory+swap) equal to the memory limit, where swap accounting exists.
            _try_write(path / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            _try_write(path / "memory.swappiness", "0")
        else:
            _write(path / "memory.max", str(limits.memory_bytes))
            _try_write(path / "memory.swap.max", "0")
    if "pids" in part.controllers and limits.pids_max is not None:
        _write(path / "pids.max", str(limits.pids_max))
    if "cpu" in part.controllers and limits.cpus is not None:
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        if v1:
            _write(path / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(path / "cpu.cfs_quota_us", str(quota))
        else:
            _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")


def _try_write(path: Path, value: str) -> None:
    try:
        _write(path, value)
    except OSError as exc:  # absent (no swap accounting) or refused: the limit is best effort
        log.debug("cannot write %s: %s", path, exc)
