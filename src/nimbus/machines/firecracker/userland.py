"""The userland of the ``provided`` runtime's guest image: what a Lambda custom runtime's bootstrap expects.

A ``provided`` function brings its own runtime: an executable ``bootstrap`` that talks to the Lambda
Runtime API the agent serves on the guest's own loopback (127.0.0.1:9001). AWS's own examples are shell
scripts that loop over ``curl`` (the developer guide's tutorial runs ``set -euo pipefail``, ``source``,
``mktemp``, ``grep``, ``tr``, ``cut``), and awslambdaric-based ones run ``python3``. So the image is
python3's (the agent needs it anyway, and ``/usr/bin/python3`` links to it) plus:

* bash, with ``/bin/sh`` → bash as on Amazon Linux (``provided.al2``/``al2023``): the tutorial's
  ``pipefail`` and ``source`` are not POSIX sh, and Debian's dash refuses them;
* coreutils, grep and sed;
* curl and the libraries ``ldd`` names for it. No ca-certificates: a guest has no network but its loopback.
* No node: Lambda's provided images have none either (a function that wants one ships it).

The tree base takes the executables of the host's own Debian packages (:data:`TREE_PACKAGES`, as dpkg's
file lists name them under ``bin/`` and ``sbin/``), so it needs a dpkg host with them installed; the
debootstrap base installs :data:`DEBOOTSTRAP_PACKAGES` (bash, coreutils, grep and sed are Essential, so
minbase has them). Both lay the guest out merged-usr: the tree's ``/bin`` is a link to ``usr/bin``.

A leaf module: ``images`` turns what it returns into entries of its plan.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

RUNTIME = "provided"
TREE_PACKAGES = ("bash", "coreutils", "grep", "sed", "curl")
DEBOOTSTRAP_PACKAGES = ("python3", "curl")  # plus minbase's Essential bash, coreutils, grep, sed
DPKG_INFO = Path("/var/lib/dpkg/info")
DPKG_STATUS = "var/lib/dpkg/status"  # relative to a root: the host's, or a debootstrap tree's
SHELL = "/bin/sh"
SHELL_LINK = ("/usr/bin/sh", "bash")  # (guest path, target): /bin/sh once /bin is usr/bin
BIN_LINK = ("/bin", "usr/bin")  # the tree base only; a debootstrap tree is merged-usr already
CURL = "/usr/bin/curl"
# dpkg lists pre-merged-usr paths (/bin/cat); the guest keeps one copy, under /usr.
_MERGED = {"/bin/": "/usr/bin/", "/sbin/": "/usr/sbin/"}
_EXEC_DIRS = ("/bin/", "/sbin/", "/usr/bin/", "/usr/sbin/")


class HostMissing(Exception):
    """The host lacks what the tree base copies (a package, or dpkg itself); the message says which."""


@dataclass(frozen=True)
class Userland:
    """What goes into a tree: executables copied from the host, and symbolic links."""

    files: tuple[tuple[str, Path], ...]  # (guest path, host file), each executable
    links: tuple[tuple[str, str], ...]  # (guest path, link target)


def _guest_path(listed: str) -> str:
    for old, new in _MERGED.items():
        if listed.startswith(old):
            return new + listed[len(old):]
    return listed


def _listed_files(package: str, info: Path) -> list[str]:
    for name in (f"{package}.list", f"{package}:amd64.list"):
        try:
            return (info / name).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
    raise HostMissing(f"{package} is not installed on this host (apt-get install {package}), or this host has "
                      "no dpkg: no provided image on the tree base (--base debootstrap installs it instead)")


def tree_userland(packages: tuple[str, ...] = TREE_PACKAGES, info: Path | None = None) -> Userland:
    """The executables of the host's ``packages`` (dpkg's lists in ``info``, by default the host's), at
    merged-usr guest paths, and the links."""
    info = DPKG_INFO if info is None else info
    files: dict[str, Path] = {}
    links: dict[str, str] = {}
    for package in packages:
        for listed in _listed_files(package, info):
            if not listed.startswith(_EXEC_DIRS) or listed.count("/") != listed.startswith("/usr/") + 2:
                continue  # only files directly in a bin or sbin directory
            guest = _guest_path(listed)
            if os.path.islink(listed):
                target = os.readlink(listed)
                if "/" not in target:  # a sibling (rbash → bash); anything else is not the package's to give
                    links[guest] = target
            elif os.path.isfile(listed) and os.access(listed, os.X_OK):
                files[guest] = Path(os.path.realpath(listed))
    links[SHELL_LINK[0]] = SHELL_LINK[1]
    links[BIN_LINK[0]] = BIN_LINK[1]
    for guest in links:
        files.pop(guest, None)  # a package's own /usr/bin/sh (none do) would lose to the link
    return Userland(tuple(sorted(files.items())), tuple(sorted(links.items())))


def debootstrap_links() -> tuple[tuple[str, str], ...]:
    """What goes on top of a debootstrap tree: /bin/sh is bash, not Debian's dash."""
    return (SHELL_LINK,)


def dpkg_versions(root: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """{package: version} of the installed ``packages``, read from ``root``'s dpkg status file."""
    try:
        status = (root / DPKG_STATUS).read_text(errors="replace")
    except OSError:
        return {}
    found = {}
    for stanza in status.split("\n\n"):
        name = re.search(r"^Package:\s*(\S+)", stanza, flags=re.MULTILINE)
        version = re.search(r"^Version:\s*(\S+)", stanza, flags=re.MULTILINE)
        if name and version and name.group(1) in packages and "installed" in stanza:
            found[name.group(1)] = version.group(1)
    return found


def tools(root: Path) -> dict[str, dict[str, str]]:
    """The image record's tools beyond python: the shell, coreutils and curl, versions from ``root``'s dpkg."""
    versions = dpkg_versions(root, ("bash", "coreutils", "curl"))
    return {
        "sh": {"version": f"bash {versions.get('bash', 'unknown')}", "path": SHELL},
        "coreutils": {"version": versions.get("coreutils", "unknown"), "path": "/usr/bin"},
        "curl": {"version": versions.get("curl", "unknown"), "path": CURL},
    }


__all__ = ["DEBOOTSTRAP_PACKAGES", "RUNTIME", "TREE_PACKAGES", "HostMissing", "Userland", "debootstrap_links",
           "dpkg_versions", "tools", "tree_userland"]
