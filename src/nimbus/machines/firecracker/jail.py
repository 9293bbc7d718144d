"""Starting Firecracker through its ``jailer``: the command line, the jail's layout, and staging files into it.

Why the jailer: Firecracker's own sandboxing (seccomp, a minimal device model) assumes a second line of
defence around the VMM process. The jailer provides it: it copies the ``firecracker`` binary into a fresh
directory, ``pivot_root``s into it in a new mount namespace, puts the process in its own cgroups (the
machine's memory and CPU limits, written before the guest runs a single instruction), sets rlimits,
optionally joins a network namespace and a new PID namespace, then drops to an unprivileged uid/gid and
execs Firecracker. A VMM that a guest manages to take over then sees one directory, one uid and the
limits of one machine. Running ``firecracker`` directly (:func:`direct_argv`) skips all of that; it is
only for hosts configured so on purpose, and :func:`warn_unconfined` says so in the log.

The jail, as the jailer builds it (``<exec_file_name>`` is the name of the Firecracker binary)::

    <chroot_base>/<exec_file_name>/<id>/root/          chroot_dir(spec): "/" for the jailed Firecracker
        <exec_file_name>                               the jailer's private copy of the binary
        <exec_file_name>.pid                           the VMM's pid, written by the jailer
        run/firecracker.socket                         the API socket (spec.api_sock, inside the jail)
        vmlinux, rootfs.ext4                           hard-linked in by stage_files() before the jailer runs

Every path Firecracker is given (``--api-sock``, the boot source and drives over the API, the vsock's
``uds_path``) is a path *inside* the jail; :func:`api_socket_path` and :func:`vsock_path` are the same
sockets as the host sees them.

Staging hard-links rather than copies because a rootfs image is large and a machine starts often; a link
is one inode with two names. So staged files are never handed to the jail's uid (a VMM owning the
inode could rewrite the image every other machine boots from), only made readable by it; and a
writable rootfs linked into two jails would be one disk written by two guests: callers give each
machine its own writable image (or attach the shared one read-only, as the driver does). Linking fails
across file systems (``EXDEV``); then the file is copied, with a warning, since that is slow and uses disk.

What is exercised here: ``tests/unit/test_jail.py`` checks the argv against the rules of Firecracker's
``jailer.md`` (flag names, value formats, the ``--`` separator, the id rule), the cgroup values, the jail
layout, and staging into a real directory (links, ownership, the ``EXDEV`` fallback). What is not: no
``jailer`` or ``firecracker`` binary exists on the hosts where Nimbus is developed, so the jailer's own
behaviour (mounts, namespaces, cgroup creation, dropping privileges) is taken from its documentation.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from nimbus.errors import MachineStartError

log = logging.getLogger("nimbus.machines.jail")

# jailer.md: "alphanumeric characters and hyphens. The maximum length is currently 64 characters."
ID_MAX_LEN = 64
_ID_RE = re.compile(r"[A-Za-z0-9-]+")

DEFAULT_JAILER = Path("/usr/local/bin/jailer")
DEFAULT_FIRECRACKER = Path("/usr/local/bin/firecracker")
DEFAULT_CHROOT_BASE = Path("/srv/jailer")  # the jailer's own default, passed explicitly anyway
DEFAULT_CGROUP_VERSION = 2  # the jailer defaults to 1; current hosts run the unified hierarchy
DEFAULT_API_SOCK = "/run/firecracker.socket"  # Firecracker's own default, inside the jail
DEFAULT_VSOCK_UDS = "/vsock.sock"
DEFAULT_KERNEL_NAME = "vmlinux"
DEFAULT_ROOTFS_NAME = "rootfs.ext4"
CPU_PERIOD_US = 100_000
# Stated explicitly although it is the jailer's default: that default only applies when no
# --resource-limit is given at all, so adding any other limit later would silently drop it.
# fsize is left unset on purpose: RLIMIT_FSIZE stops writes at any offset past the limit, which would
# kill the VMM writing a snapshot's memory file or the far end of a large writable drive.
DEFAULT_RESOURCE_LIMITS: tuple[tuple[str, int], ...] = (("no-file", 2048),)
RESOURCE_NAMES = ("fsize", "no-file")  # the resources jailer.md documents for --resource-limit
CGROUP_VERSIONS = (1, 2)
READ_ALL = 0o444


def _jail_relative(path: str, what: str) -> PurePosixPath:
    """``path`` (as the jailed Firecracker sees it) relative to the jail's root; ValueError if it could escape."""
    p = PurePosixPath(path)
    if not p.is_absolute():
        raise ValueError(f"{what} must be an absolute path inside the jail, got {path!r}")
    rel = p.relative_to("/")
    if not rel.parts or any(part in ("..", ".") for part in rel.parts):
        raise ValueError(f"{what} must name a file inside the jail without '.' or '..', got {path!r}")
    return rel


@dataclass(frozen=True)
class JailSpec:
    """Everything the jailer is told about one microVM. Validated on construction; see :meth:`check`.

    ``memory_mb`` and ``vcpus`` become the machine's cgroup limits. ``netns`` is the path of a network
    namespace handle to join; ``None`` (the default) leaves the VMM without one, and Nimbus machines
    have no network. ``firecracker_args`` are extra arguments for Firecracker, after ``--api-sock``.
    """

    id: str
    memory_mb: int
    vcpus: int
    uid: int
    gid: int
    exec_file: Path = DEFAULT_FIRECRACKER
    jailer: Path = DEFAULT_JAILER
    chroot_base_dir: Path = DEFAULT_CHROOT_BASE
    cgroup_version: int = DEFAULT_CGROUP_VERSION
    parent_cgroup: str | None = None  # None: the jailer's default, <exec_file_name>
    netns: Path | None = None
    daemonize: bool = False
    new_pid_ns: bool = True
    resource_limits: tuple[tuple[str, int], ...] = DEFAULT_RESOURCE_LIMITS
    api_sock: str = DEFAULT_API_SOCK
    vsock_uds: str = DEFAULT_VSOCK_UDS
    firecracker_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise ValueError(f"jail id must be letters, digits and hyphens, got {self.id!r}")
        if len(self.id) > ID_MAX_LEN:
            raise ValueError(f"jail id is {len(self.id)} characters; the jailer allows {ID_MAX_LEN}")
        for name in ("uid", "gid"):
            value = getattr(self, name)
            # bool is an int subclass; True as a uid is a mistake, not 1.
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("memory_mb", "vcpus"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("exec_file", "jailer", "chroot_base_dir"):
            value = getattr(self, name)
            if not isinstance(value, Path) or not value.is_absolute():
                raise ValueError(f"{name} must be an absolute Path, got {value!r}")
        if self.exec_file.name in ("", ".", ".."):
            raise ValueError(f"exec_file must name a file, got {self.exec_file}")
        if self.netns is not None and (not isinstance(self.netns, Path) or not self.netns.is_absolute()):
            raise ValueError(f"netns must be an absolute Path or None, got {self.netns!r}")
        if self.cgroup_version not in CGROUP_VERSIONS:
            raise ValueError(f"cgroup_version must be 1 or 2, got {self.cgroup_version!r}")
        if self.parent_cgroup is not None:
            parent = PurePosixPath(self.parent_cgroup)
            if parent.is_absolute() or not parent.parts or ".." in parent.parts:
                raise ValueError(f"parent_cgroup must be a relative path without '..', got {self.parent_cgroup!r}")
        seen = set()
        for resource, value in self.resource_limits:
            if resource not in RESOURCE_NAMES:
                raise ValueError(f"resource limit {resource!r} is not one of {RESOURCE_NAMES}")
            if resource in seen:
                raise ValueError(f"resource limit {resource!r} given twice")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"resource limit {resource} must be an int >= 0, got {value!r}")
            seen.add(resource)
        _jail_relative(self.api_sock, "api_sock")
        _jail_relative(self.vsock_uds, "vsock_uds")
        for arg in self.firecracker_args:
            # The jailer passes --id itself; the socket is spec.api_sock so the host knows where it is.
            if arg.split("=", 1)[0] in ("--id", "--api-sock"):
                raise ValueError(f"{arg!r} is set by the jailer or by api_sock, not in firecracker_args")

    def check(self) -> None:
        """Raise :class:`MachineStartError` unless the jailer and Firecracker binaries are files on this host."""
        for name in ("jailer", "exec_file"):
            path = getattr(self, name)
            if not path.is_file():
                raise MachineStartError(f"{name} {path} does not exist or is not a file")

    def cgroups(self) -> list[str]:
        """The ``<cgroup_file>=<value>`` settings for this machine's memory and CPU limits."""
        memory_bytes = self.memory_mb * 1024 * 1024
        quota_us = self.vcpus * CPU_PERIOD_US  # vcpus full cores' worth of time per period
        if self.cgroup_version == 2:
            return [f"memory.max={memory_bytes}", f"cpu.max={quota_us} {CPU_PERIOD_US}"]
        # v1: the period first, so the quota is never checked against a different period.
        return [f"memory.limit_in_bytes={memory_bytes}",
                f"cpu.cfs_period_us={CPU_PERIOD_US}", f"cpu.cfs_quota_us={quota_us}"]


def jailer_argv(spec: JailSpec) -> list[str]:
    """The jailer's command line for ``spec``; Firecracker's own arguments follow ``--``."""
    argv = [str(spec.jailer),
            "--id", spec.id,
            "--exec-file", str(spec.exec_file),
            "--uid", str(spec.uid),
            "--gid", str(spec.gid),
            "--chroot-base-dir", str(spec.chroot_base_dir),
            "--cgroup-version", str(spec.cgroup_version)]
    for setting in spec.cgroups():
        argv += ["--cgroup", setting]
    if spec.parent_cgroup is not None:
        argv += ["--parent-cgroup", spec.parent_cgroup]
    if spec.netns is not None:
        argv += ["--netns", str(spec.netns)]
    for resource, value in spec.resource_limits:
        argv += ["--resource-limit", f"{resource}={value}"]
    if spec.daemonize:
        argv.append("--daemonize")
    if spec.new_pid_ns:
        argv.append("--new-pid-ns")
    argv += ["--", "--api-sock", spec.api_sock, *spec.firecracker_args]
    return argv


def chroot_dir(spec: JailSpec) -> Path:
    """The jail's root on the host: ``<chroot_base>/<exec_file_name>/<id>/root``."""
    return spec.chroot_base_dir / spec.exec_file.name / spec.id / "root"


def api_socket_path(spec: JailSpec) -> Path:
    """Firecracker's API socket as the host sees it."""
    return chroot_dir(spec) / _jail_relative(spec.api_sock, "api_sock")


def vsock_path(spec: JailSpec) -> Path:
    """The vsock device's Unix socket (``uds_path`` is ``spec.vsock_uds``) as the host sees it."""
    return chroot_dir(spec) / _jail_relative(spec.vsock_uds, "vsock_uds")


def pid_file_path(spec: JailSpec) -> Path:
    """Where the jailer writes the VMM's pid (it differs from the jailer's own with ``--new-pid-ns``)."""
    return chroot_dir(spec) / f"{spec.exec_file.name}.pid"


def _inside(root: Path, name: str, what: str) -> Path:
    """``root/name`` for a single path component ``name``; ValueError if it is not one, or leads outside."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{what} must be a plain file name inside the jail, got {name!r}")
    target = root / name
    if not target.resolve().is_relative_to(root.resolve()):  # e.g. a symlink already sitting there
        raise ValueError(f"{what} {name!r} would lead outside the jail {root}")
    return target


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst``; copy it, with a warning, when they are on different file systems."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        log.warning("cannot hard-link %s into the jail (another file system); copying it to %s instead, "
                    "which is slow and uses disk: keep images on the chroot base's file system", src, dst)
        shutil.copy2(src, dst)


def stage_files(spec: JailSpec, kernel: Path | None, rootfs: Path, *,
                kernel_name: str = DEFAULT_KERNEL_NAME, rootfs_name: str = DEFAULT_ROOTFS_NAME,
                extra: dict[str, Path] | None = None) -> dict[str, str]:
    """Hard-link ``kernel`` and ``rootfs`` into the jail, readable by the jail's uid/gid, before the jailer runs.

    Returns ``{"kernel": "/vmlinux", "rootfs": "/rootfs.ext4"}``: the paths Firecracker is given over its
    API. ``kernel`` may be None (a snapshot restore boots no kernel); ``extra`` maps more jail file names
    to their sources (a snapshot's state and memory files), returned under their names. Also makes the
    directories the API and vsock sockets go in, owned by the jail's uid/gid, since Firecracker creates
    the sockets but not their directories. Raises ValueError for a name that would
    leave the jail, and FileExistsError if the jail already holds a file of that name.
    """
    root = chroot_dir(spec)
    root.mkdir(parents=True, exist_ok=True)  # the jailer leaves an existing root as it is
    staged: dict[str, str] = {}
    files = [("kernel", kernel, kernel_name), ("rootfs", rootfs, rootfs_name)]
    files += [(name, src, name) for name, src in (extra or {}).items()]
    for key, src, name in files:
        if src is None:
            continue
        dst = _inside(root, name, f"{key} name")
        if not Path(src).is_file():
            raise ValueError(f"{key} {src} is not a file")
        link_or_copy(Path(src), dst)
        # Readable, never owned, by the jail's uid: a link is the shared inode itself, and a VMM that
        # owned it could rewrite the image (or snapshot) every other machine boots from.
        mode = dst.stat().st_mode
        if mode & READ_ALL != READ_ALL:
            os.chmod(dst, mode | READ_ALL)
        staged[key] = f"/{name}"
    for sock in (spec.api_sock, spec.vsock_uds):
        parent = _jail_relative(sock, "socket path").parent
        current = root
        for part in parent.parts:
            current = current / part
            current.mkdir(exist_ok=True)
            if not current.resolve().is_relative_to(root.resolve()):
                raise ValueError(f"socket directory {current} leads outside the jail {root}")
            os.chown(current, spec.uid, spec.gid)
    return staged


def cgroup_dirs(spec: JailSpec, cgroup_root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """The cgroup directories the jailer makes for this machine; the host removes them once the VMM is gone.

    jailer.md: ``<cgroup_base>/<parent_cgroup>/<id>`` for each hierarchy that holds a controller named in
    ``--cgroup``; v2 has one hierarchy, v1 one per controller (found here by its mount directory's name).
    """
    parent = spec.parent_cgroup or spec.exec_file.name
    if spec.cgroup_version == 2:
        return [cgroup_root / parent / spec.id]
    found = []
    controllers = {setting.split(".", 1)[0] for setting in spec.cgroups()}
    if cgroup_root.is_dir():
        for mount in sorted(cgroup_root.iterdir()):
            if controllers & set(mount.name.split(",")) and not mount.is_symlink():
                found.append(mount / parent / spec.id)
    return found


def direct_argv(firecracker: Path, api_sock: Path) -> list[str]:
    """Firecracker started without the jailer: only when configured so; call :func:`warn_unconfined` too."""
    return [str(firecracker), "--api-sock", str(api_sock)]


def warn_unconfined(machine_id: str | None = None) -> None:
    """Log that a VMM runs without the jailer. The driver calls this once, when it starts in that mode."""
    which = f"machine {machine_id}: " if machine_id else ""
    log.warning("%sfirecracker runs without the jailer: the VMM is unconfined (no chroot, no cgroup limits, "
                "no dropped privileges); a guest that escapes the VMM has this node's privileges", which)
