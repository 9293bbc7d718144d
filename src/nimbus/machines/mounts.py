"""Detached read-only mounts made on the host, for a template's child to attach in its own namespace.

A template's child builds its mount namespace inside the template's sandbox, where host paths are not
visible. The node (root, in the host's mount namespace) therefore clones the directory into a detached
mount with ``open_tree(OPEN_TREE_CLONE)``, makes it read-only, ``nosuid``, ``nodev`` and private with
``mount_setattr``, and sends the descriptor; the child attaches it with ``move_mount`` (see
:mod:`nimbus.agent.template`). A clone can be attached once, so each machine gets its own.

Python 3.11 wraps none of these calls: they go through libc's ``syscall()``. Their numbers are the same
on every architecture but alpha (system calls added since 5.1 share one table).
"""

from __future__ import annotations

import ctypes
import os

SYS_OPEN_TREE = 428
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MS_PRIVATE = 1 << 18
# Not noexec: a layer's compiled extension modules (.so) are mapped executable.
READ_ONLY_ATTRS = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    """``struct mount_attr`` (``MOUNT_ATTR_SIZE_VER0``, 32 bytes)."""

    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _failed(what: str, path: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what} {path}: {os.strerror(err)}")


def read_only_clone(path: str) -> int:
    """A close-on-exec descriptor of a detached, recursive, read-only copy of the mount tree at ``path``.

    The caller sends it on and closes it. ``OSError`` when the kernel lacks the calls (before 5.12) or
    the node lacks ``CAP_SYS_ADMIN``.
    """
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path),
                       OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    if fd < 0:
        raise _failed("open_tree", path)
    attr = MountAttr(attr_set=READ_ONLY_ATTRS, propagation=MS_PRIVATE)
    if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr),
                     ctypes.sizeof(attr)) != 0:
        error = _failed("mount_setattr", path)
        os.close(fd)
        raise error
    return fd


def unsupported(path: str) -> str | None:
    """Why :func:`read_only_clone` cannot work here (a kernel before 5.12, no privilege), or None.

    Tried once on ``path``, a directory of the node's own with nothing mounted below it.
    """
    try:
        os.close(read_only_clone(path))
    except OSError as exc:
        return str(exc)
    return None


__all__ = ["read_only_clone", "unsupported"]
