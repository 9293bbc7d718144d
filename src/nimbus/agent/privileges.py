"""Giving up root for good: what a machine's first process does on a root node before the agent runs.

A booted machine's interpreter (through the prologue ``nimbus.machines.bwrap`` puts before the agent) and
a template's child (``nimbus.agent.template``) both start as root with a few capabilities. Changing to the
machine's own uid clears the permitted and effective sets, but not the inheritable set, nor the bounding
set, so those are emptied first (that takes ``CAP_SETPCAP``), together with the ambient set. With
``no_new_privs`` already set, nothing the function executes can get any of them back.

A fork of a function template (:mod:`nimbus.agent.forks`) holds every capability of the user namespace it
made for itself, and keeps its uid: :func:`clear` empties all five sets instead.
"""

import ctypes
import errno
import os

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_COUNT = 64  # capability numbers the kernel may know; the ones it does not answer EINVAL


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def clear() -> None:
    """Empty every capability set: bounding, ambient, inheritable, permitted and effective."""
    _clear(all_sets=True)


def _clear(all_sets: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(CAP_COUNT):
        if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _fail(f"dropping capability {cap} from the bounding set")
    if libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0) != 0:
        _fail("clearing the ambient capabilities")
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        _fail("capget")
    for half in data:
        half.inheritable = 0
        if all_sets:
            half.effective = half.permitted = 0
    if libc.capset(ctypes.byref(header), data) != 0:
        _fail("clearing the capabilities")


def drop(uid: int, gid: int, owned: tuple[str, ...] = ()) -> None:
    """Become ``uid``/``gid`` with no groups and no capability in any set; ``owned`` dirs are chowned first."""
    for path in owned:
        os.chown(path, uid, gid)
    _clear(all_sets=False)  # the permitted and effective sets go with root, below
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # from uid 0 to another: the kernel clears the permitted and effective sets
