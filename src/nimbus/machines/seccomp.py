"""The seccomp filter every machine and every build sandbox runs under, built with libseccomp.

The kernel is the attack surface a sandbox cannot hide, so the filter takes away the system calls a
function (or a build script) has no business making: mounting, namespaces, tracing other processes,
the kernel keyring, eBPF, perf, userfaultfd, loading kernels or modules, rebooting, swap, the clock,
accounting, quotas, file handles that bypass the mount namespace, io_uring, the new mount API and
terminal input injection. Everything else is allowed (a default-allow list like Docker's default
profile in spirit, but with a deny list so new, harmless syscalls of newer libcs keep working).

Denied calls fail with ``EPERM``, so programs see an ordinary permission error rather than being
killed. ``clone`` is allowed unless its flags ask for a new namespace (checked bit by bit with a
masked compare); ``clone3`` passes its flags in memory a filter cannot read, so it fails with
``ENOSYS`` and glibc, Go and libuv fall back to ``clone``, the approach of runc and Docker.

The filter covers the native architecture and the compat ABIs it can execute (x86 and x32 on
x86_64, arm on aarch64); a syscall from any other ABI kills the process (libseccomp's default
bad-arch action), so a 32-bit ``int 0x80`` cannot walk around it.

bwrap takes the compiled BPF program with ``--seccomp FD`` and installs it in the sandbox's last
process just before ``exec``, after it has built the namespaces (which need the calls denied here).
The program is exported once per node (:func:`program_file`) to a file; each sandbox gets its own
read-only descriptor of it (bwrap reads the descriptor to its end, so one cannot be shared).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import platform
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger("nimbus.machines.seccomp")

# Denied outright with EPERM. Names unknown to an architecture (iopl on aarch64) are skipped there.
DENIED = (
    # mounts and the filesystem tree
    "mount", "umount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    # namespaces
    "unshare", "setns",
    # other processes' memory and descriptors
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel keyring
    "keyctl", "add_key", "request_key",
    # eBPF, perf, userfaultfd, io_uring: large, often-exploited kernel surfaces
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # kernels and modules
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module",
    # the machine itself
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "vhangup",
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex",
    "lookup_dcookie", "nfsservctl", "uselib", "_sysctl", "sysfs",
    # file handles open any inode of a filesystem, whatever the mount namespace shows
    "open_by_handle_at", "name_to_handle_at",
    # raw hardware access
    "iopl", "ioperm", "vm86", "vm86old",
    # fanotify watches whole filesystems
    "fanotify_init",
)

# clone(2) flags that make a namespace. (CLONE_NEWTIME is 0x80 for unshare/clone3 only: in clone's
# flags that bit belongs to the exit signal.)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                         CLONE_NEWPID, CLONE_NEWNET)

# ioctls that push input into a terminal (TIOCSTI) or drive the console (TIOCLINUX).
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# Socket families a function may make: Unix sockets (asyncio, libuv and Go use socketpairs), IPv4 and
# IPv6 (the machine's own loopback; builds fetch dependencies), and route netlink, which glibc's
# getaddrinfo reads the interfaces with. Every other family (vsock, a way to the hypervisor on a VM
# host; packet, alg, bluetooth, can, tipc, xdp...) fails with EAFNOSUPPORT, as on a kernel without it.
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6, AF_NETLINK)
NETLINK_ROUTE = 0
AF_MAX = 64  # above every family the kernel knows (46 in 6.x): refused whatever a future kernel adds
# personality(2) may only be queried: setting it could turn ASLR off (ADDR_NO_RANDOMIZE) for what the
# function executes, or make its data executable (READ_IMPLIES_EXEC).
PERSONALITY_QUERY = 0xFFFFFFFF


class SeccompUnavailable(Exception):
    """libseccomp (or its Python binding) is missing, or it cannot build the filter here."""


def _binding():
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: "Unable to find libseccomp"
        raise SeccompUnavailable(f"pyseccomp/libseccomp not usable: {exc}") from None
    return pyseccomp


def _arches(sc) -> list[int]:
    """The native architecture first, then the compat ABIs the kernel also runs on it."""
    native = sc.system_arch()
    extra = {sc.Arch.X86_64: (sc.Arch.X86, sc.Arch.X32), sc.Arch.AARCH64: (sc.Arch.ARM,)}.get(native, ())
    return [native, *extra]


# What a function template's machine may call besides (nimbus.agent.forks): each fork makes its own user
# namespace and the others with ``unshare``, and mounts its /proc and /tmp in them. Every fork then installs
# the full filter on top, so calls never see these allowed; the template's own module code does.
SNAPSHOT_ALLOWED = ("unshare", "mount")


def build(sc=None, *, snapshot: bool = False):
    """The filter as a ``pyseccomp.SyscallFilter`` (not loaded): default allow, the deny rules above.

    ``snapshot``: the function template's filter, which allows :data:`SNAPSHOT_ALLOWED`.
    """
    sc = sc or _binding()
    native = sc.system_arch()
    filt = sc.SyscallFilter(sc.ALLOW)
    for arch in _arches(sc)[1:]:
        try:
            filt.add_arch(arch)
        except OSError as exc:  # a libseccomp without that ABI: its syscalls get the bad-arch kill
            log.debug("seccomp: cannot add arch %#x: %s", arch, exc)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED:
        if snapshot and name in SNAPSHOT_ALLOWED:
            continue
        if sc.resolve_syscall(sc.Arch.NATIVE, name) == -1:
            continue  # __NR_SCMP_ERROR: this libseccomp knows no such syscall
        try:
            filt.add_rule(eperm, name)
        except OSError as exc:
            log.debug("seccomp: no rule for %s: %s", name, exc)
    # s390 passes clone's flags second; every other architecture first.
    flags_arg = 1 if native in (sc.Arch.S390, sc.Arch.S390X) else 0
    for flag in CLONE_NAMESPACE_FLAGS:
        filt.add_rule(eperm, "clone", sc.Arg(flags_arg, sc.MASKED_EQ, flag, flag))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for request in (TIOCSTI, TIOCLINUX):
        filt.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    no_family = sc.ERRNO(errno.EAFNOSUPPORT)
    for call in ("socket", "socketpair"):
        for family in range(AF_MAX):
            if family not in SOCKET_FAMILIES:
                filt.add_rule(no_family, call, sc.Arg(0, sc.EQ, family))
        filt.add_rule(no_family, call, sc.Arg(0, sc.GE, AF_MAX))
    filt.add_rule(no_family, "socket", sc.Arg(0, sc.EQ, AF_NETLINK), sc.Arg(2, sc.NE, NETLINK_ROUTE))
    # The 32-bit socketcall(2) passes the family in memory, out of the filter's sight (x86 has had
    # direct socket calls since Linux 4.3, which glibc uses).
    if sc.resolve_syscall(sc.Arch.X86, "socketcall") >= 0 and sc.Arch.X86 in _arches(sc):
        try:
            filt.add_rule(sc.ERRNO(errno.ENOSYS), "socketcall")
        except OSError as exc:
            log.debug("seccomp: no rule for socketcall: %s", exc)
    filt.add_rule(eperm, "personality", sc.Arg(0, sc.NE, PERSONALITY_QUERY))
    return filt


@cache
def program(snapshot: bool = False) -> bytes:
    """The compiled BPF program (``struct sock_filter`` array) as bwrap's ``--seccomp`` reads it."""
    filt = build(snapshot=snapshot)
    with tempfile.TemporaryFile() as out:
        filt.export_bpf(out)
        out.seek(0)
        data = out.read()
    if not data or len(data) % 8:
        raise SeccompUnavailable(f"libseccomp exported a BPF program of {len(data)} bytes")
    return data


def program_file(directory: Path, snapshot: bool = False) -> Path:
    """Write the program under ``directory`` (once; the name carries its hash) and return the path."""
    data = program(snapshot)
    digest = hashlib.sha256(data).hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"seccomp-{platform.machine()}-{digest}.bpf"
    try:
        if path.read_bytes() == data:
            return path
    except OSError:
        pass
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def open_program(path: Path) -> int:
    """A fresh read-only descriptor of the program for one bwrap (inheritable; the caller closes it)."""
    fd = os.open(path, os.O_RDONLY)
    os.set_inheritable(fd, True)
    return fd


def describe() -> tuple[bool, str]:
    """Whether a filter can be built here, and a line for ``nimbus doctor``."""
    try:
        sc = _binding()
        size = len(program())
    except (SeccompUnavailable, OSError) as exc:
        return False, f"unavailable: {exc}"
    names = ", ".join(_arch_name(sc, arch) for arch in _arches(sc))
    native = sum(1 for name in DENIED if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0)
    return True, (f"libseccomp filter of {size // 8} BPF instructions ({names}): {native} syscalls of this "
                  "architecture and namespace-creating clone denied with EPERM, clone3 with ENOSYS")


def _arch_name(sc, arch: int) -> str:
    for key, value in vars(sc.Arch).items():
        if value == arch and not key.startswith("_") and key != "NATIVE":
            return key.lower()
    return hex(arch)


__all__ = ["DENIED", "SeccompUnavailable", "build", "describe", "open_program", "program", "program_file"]
