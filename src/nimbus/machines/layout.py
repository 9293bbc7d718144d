"""The guest's file system as the host builds it, shared by bwrap sandboxes and Firecracker images.

The paths the agent relies on are in :mod:`nimbus.agent.contract`; this module holds what only the host
needs to lay them out: the interpreter it runs, the wasmtime package, and the sandbox's ``/etc`` files.
"""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path

from nimbus.agent.contract import OPT_DIR, SANDBOX_GID, SANDBOX_UID
from nimbus.errors import MachineStartError

SANDBOX_HOSTNAME = "nimbus"
SANDBOX_USER = "sandbox"  # the passwd name of a machine's own uid
# The interpreter as the sandbox runs it: a link to the host's, so that the sandbox's command lines
# (its pid 1's included) name no host path.
PYTHON_LINK = f"{OPT_DIR}/bin/python3"

ETC_FILES = {
    "passwd": (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"nobody:x:{SANDBOX_UID}:{SANDBOX_GID}:nobody:/tmp:/usr/sbin/nologin\n"
    ),
    "group": f"root:x:0:\nnogroup:x:{SANDBOX_GID}:\n",
    "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{SANDBOX_HOSTNAME}\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
}


def etc_files(uid: int = SANDBOX_UID, gid: int = SANDBOX_GID) -> dict[str, str]:
    """The sandbox's passwd, group, hosts and nsswitch.conf, naming the machine's own uid and gid."""
    if uid == SANDBOX_UID:
        return dict(ETC_FILES)
    return {**ETC_FILES,
            "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n{SANDBOX_USER}:x:{uid}:{gid}:{SANDBOX_USER}:/tmp:"
                      "/usr/sbin/nologin\n",
            "group": f"root:x:0:\n{SANDBOX_USER}:x:{gid}:\n"}


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


def wasmtime_package() -> Path | None:
    """The installed ``wasmtime`` package directory (located without importing it), or None."""
    try:
        spec = find_spec("wasmtime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(os.path.realpath(next(iter(spec.submodule_search_locations))))


def parent_dirs(paths: list[str]) -> list[str]:
    """Every directory above ``paths`` (not ``/``), parents before children, each once: what a sandbox must
    create before it can mount on ``paths`` (bwrap machines and the build sandbox alike)."""
    out: list[str] = []
    for path in paths:
        for parent in reversed(Path(path).parents):
            text = str(parent)
            if text != "/" and text not in out:
                out.append(text)
    return out


__all__ = ["ETC_FILES", "PYTHON_LINK", "SANDBOX_HOSTNAME", "base_python", "etc_files", "parent_dirs",
           "wasmtime_package"]
