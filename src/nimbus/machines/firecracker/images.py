"""Guest images for the Firecracker driver: an ext4 root file system with a runtime and the agent as init.

One job, one module (~780 lines): deciding what a runtime's guest needs and laying it into one image.
The two bases and the per-runtime additions share the plan (files, libraries, the agent) and the
hash that names an image, so splitting them would pass that plan across modules for no reader's gain.

Two bases (``--base``):

* **tree** (default): no package manager and no network. The files a guest needs are copied from this
  host — the base Python interpreter (not the venv) with a trimmed standard library, the shared libraries
  it and its extension modules link against (found with ``ldd``), the dynamic loader, and the Nimbus
  files the agent imports — into a directory, and ``mkfs.ext4 -d`` turns that directory into an image.
  It takes seconds; the python3 tree is about 70 MiB (a third of it libpython), nodejs adds node's
  ~95 MiB and wasm the wasmtime package's ~30 MiB.
* **debootstrap**: ``debootstrap --variant=minbase --include=python3,…`` of a Debian suite (bookworm)
  from a mirror (this host's apt mirror by default), then the same Nimbus files on top; the agent runs
  with Debian's own python3. Minutes and a network; a full Debian userland for those who want one.

Each runtime's image is python3's plus what the bwrap driver gives that runtime on the host:

* ``nodejs``: the host's ``node`` (as the agent finds it, on PATH) at /usr/bin/node — in glibc's
  default search path, since the kernel starts init with no PATH — and the libraries ``ldd`` names for
  it; with debootstrap, Debian's ``nodejs`` package instead.
* ``wasm``: the wasmtime Python package, native library included, at ``WASMTIME_SITE/wasmtime`` where
  ``nimbus.agent.wasm`` looks (as bwrap binds it), plus what that library links against.
* ``rust``: rustc's x86_64-unknown-linux-gnu executables link glibc and ``libgcc_s.so.1`` (unwinding);
  the latter is added (Debian's minbase has it).
* ``go``: the compiler builds with ``CGO_ENABLED=0``, so the executables are static: nothing to add.
* ``provided`` (custom runtimes): bash as /bin/sh, coreutils, grep, sed and curl, and /usr/bin/python3
  (see :mod:`nimbus.machines.firecracker.userland`).

Every image has ``/opt/nimbus/bin/python3``, the agent's interpreter at the path bwrap machines have it,
and its /sbin/init starts with bwrap's environment (``SANDBOX_ENV``), not the kernel's (no PATH at all).

Guest layout of the tree base::

    /sbin/init                  ``#!/usr/local/bin/python3.X -IS`` → nimbus.agent.init (PID 1)
    /usr/local/bin/python3.X    the interpreter; its prefix is /usr/local, found from its own location
    /usr/local/lib/python3.X/   the standard library and lib-dynload (no tests, IDLE, tkinter, ensurepip)
    /lib/x86_64-linux-gnu/      every shared library ``ldd`` named, libpython included (its RUNPATH
                                points at the host's prefix, so it must sit where ld.so looks anyway)
    /lib64/ld-linux-x86-64.so.2 the dynamic loader, at the path baked into every executable
    /usr/bin/node               nodejs only
    /bin → usr/bin, /usr/bin/   provided only: bash (also as sh), coreutils, grep, sed, curl, python3 (a link)
    /opt/nimbus/bin/python3     a link to the interpreter
    /opt/nimbus/nimbus/         ``__init__.py``, ``protocol.py`` and ``agent/`` (as bwrap binds them)
    /opt/nimbus/site/wasmtime/  wasm only
    /etc/                       passwd, group, hosts, nsswitch.conf, ld.so.cache, nimbus-image.json
    /proc /sys /dev /tmp /run /var/task /opt/layer   empty mount points

/etc/nimbus-image.json records the runtime, base, content hash and the runtime's tools (versions and
guest paths). Images are cached as ``$NIMBUS_HOME/images/<runtime>-<hash12>.ext4`` (tree) or
``<runtime>-debootstrap-<hash12>.ext4``. For the tree the hash covers the recipe version and the (path,
size, sha256) of every file that goes in, computed from the host's files *before* anything is built, so
a cache hit costs one pass of hashing and nothing else; any change to the interpreter, a library or an
agent file gives a new image. A debootstrap image cannot be hashed by its output before it exists, so
its hash covers its inputs: suite, mirror, variant and packages, plus every Nimbus file put on top.

One module though over the usual size: the two bases are one recipe (the same Nimbus entries, hash,
record and ext4 step) that differ only in where the userland comes from.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import cache_from_source
from pathlib import Path

import nimbus
from nimbus.agent.contract import (
    LAYER_DIR,
    LAYER_MODULES_LINK,
    OPT_DIR,
    SANDBOX_ENV,
    TASK_DIR,
    WASMTIME_SITE,
)
from nimbus.errors import NimbusError
from nimbus.machines import layout
from nimbus.machines.firecracker import userland

RECIPE_VERSION = 3  # bump when the layout or the selection rules change: every cached image is rebuilt
SUPPORTED_RUNTIMES = ("python3", "nodejs", "go", "rust", "wasm", "provided")
BASES = ("tree", "debootstrap")
DEFAULT_BASE = "tree"
IMAGES_DIR = "images"
EXT4_SUFFIX = ".ext4"
HASH_CHARS = 12
GUEST_PREFIX = "/usr/local"
GUEST_LIB_DIR = "/lib/x86_64-linux-gnu"
GUEST_NODE = "/usr/bin/node"  # in glibc's default PATH: the guest's init starts with no PATH at all
OPT_NIMBUS = OPT_DIR
RECORD_PATH = "/etc/nimbus-image.json"
MOUNT_POINTS = ("/proc", "/sys", "/dev", "/tmp", "/run", TASK_DIR, LAYER_DIR, "/root")
# Parts of the standard library a function does not need in a guest: they are most of its size.
STDLIB_SKIP = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
    "__phello__", "pydoc_data",
})
STDLIB_SKIP_PREFIXES = ("config-",)  # config-3.X-<platform>/ holds the static libpython for embedding
DYNLOAD_SKIP_PREFIXES = ("_tkinter", "_test", "_ctypes_test", "xxlimited", "_xxtestfuzz", "xxsubtype")
# What rustc's x86_64-unknown-linux-gnu std links besides the loader (Go's are static: CGO_ENABLED=0).
RUST_LIBRARIES = ("libgcc_s.so.1", "libc.so.6")
HOST_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
# Free space left in the file system on top of the files: a function's /tmp and /var/task are tmpfs,
# so the root needs little, but ext4's own metadata (journal, inode tables) takes a share.
HEADROOM_MB = 16
HEADROOM_FRACTION = 0.2
SIZE_ROUND_MB = 8
INODE_HEADROOM = 1024
MKFS_TIMEOUT_S = 300.0
LDD_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 30.0
OUTPUT_TAIL_LINES = 20  # quoted in the error when a long step fails
# The debootstrap base.
DEFAULT_SUITE = "bookworm"  # Debian 12
DEFAULT_MIRROR = "http://deb.debian.org/debian"  # when this host's apt names no Debian mirror
DEBOOTSTRAP_VARIANT = "minbase"
DEBOOTSTRAP_PACKAGES = {  # --include, per runtime; python3 always (it runs init and the agent)
    "python3": ("python3",),
    "nodejs": ("python3", "nodejs"),
    "go": ("python3",),
    "rust": ("python3",),  # libgcc-s1 and libc6 are in minbase
    "wasm": ("python3",),
    "provided": userland.DEBOOTSTRAP_PACKAGES,
}
DEBIAN_PYTHON = "/usr/bin/python3"
DEBOOTSTRAP_TIMEOUT_S = 3600.0
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# What a debootstrap tree keeps that a guest never uses: downloaded .debs and the package lists.
DEBOOTSTRAP_PRUNE = ("var/cache/apt/archives", "var/lib/apt/lists", "var/cache/debconf")

Progress = Callable[[str], None]


class ImageError(NimbusError):
    """An image could not be built: an unsupported runtime, a missing tool or a failed step."""


@dataclass(frozen=True)
class Entry:
    """One thing in the guest tree: a copied file (``source``), a written file (``data``) or a symlink."""

    path: str  # absolute, in the guest
    source: Path | None = None
    data: bytes | None = None
    link: str | None = None
    mode: int = 0o644


@dataclass(frozen=True)
class ImageName:
    """What an image's file name says: runtime, base and the first characters of its content hash."""

    runtime: str
    base: str
    digest: str


# ---------------------------------------------------------------- the recipe


def _check_runtime(runtime: str) -> None:
    if runtime not in SUPPORTED_RUNTIMES:
        raise ImageError(f"unknown runtime {runtime!r}; supported: {', '.join(SUPPORTED_RUNTIMES)}")


def _check_base(base: str) -> None:
    if base not in BASES:
        raise ImageError(f"unknown base {base!r}; one of: {', '.join(BASES)}")


def _version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _stdlib_dir(prefixes: tuple[Path, ...]) -> Path:
    for prefix in prefixes:
        candidate = prefix / "lib" / f"python{_version()}"
        if (candidate / "os.py").is_file():
            return candidate
    raise ImageError(f"cannot find the standard library of Python {_version()} under {prefixes}")


def _stdlib_files(stdlib: Path) -> list[Path]:
    """The standard library's files worth shipping: sources, fresh plain bytecode and lib-dynload."""
    suffix = f".{sys.implementation.cache_tag}.pyc"
    found: list[Path] = []
    for root, dirs, files in os.walk(stdlib):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith(STDLIB_SKIP_PREFIXES))
        for name in sorted(files):
            if here.name == "__pycache__" and not name.endswith(suffix):
                continue  # optimised (.opt-1/.opt-2) bytecode: the guest never runs with -O
            if here.name == "lib-dynload" and name.startswith(DYNLOAD_SKIP_PREFIXES):
                continue
            path = here / name
            if path.is_file():
                found.append(path)
    return found


def _needed_libraries(binaries: list[Path]) -> dict[str, Path]:
    """{name: host path} of every shared library ``ldd`` names for ``binaries``, the loader under its path."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise ImageError("ldd not found (it comes with libc-bin)")
    libraries: dict[str, Path] = {}
    for binary in binaries:
        try:
            done = subprocess.run([ldd, str(binary)], capture_output=True, text=True, timeout=LDD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"ldd {binary} failed: {exc}") from exc
        if done.returncode != 0:
            continue  # "not a dynamic executable": nothing to add
        for line in done.stdout.splitlines():
            line = line.strip()
            if "=>" in line:
                name, _, rest = line.partition("=>")
                target = rest.split("(")[0].strip()
                if target == "not found":
                    raise ImageError(f"{binary} needs {name.strip()}, which ldd cannot find")
                if target:
                    libraries[name.strip()] = Path(target)
            elif line.startswith("/"):  # the loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
                path = line.split("(")[0].strip()
                libraries[path] = Path(path)
    return libraries


def _host_library(name: str) -> Path:
    """The host's copy of the shared library ``name``, looked up where Debian's ld.so looks."""
    for directory in HOST_LIB_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate
    raise ImageError(f"the shared library {name} is not in {', '.join(HOST_LIB_DIRS)}")


def find_node() -> Path:
    """The host's ``node``, found on PATH as the agent finds it, resolved to the real binary."""
    found = shutil.which("node")
    if found is None:
        raise ImageError("node is not installed on this host (apt-get install nodejs): no nodejs image")
    return Path(os.path.realpath(found))


def _wasmtime_package() -> Path:
    package = layout.wasmtime_package()
    if package is None:
        raise ImageError("the wasmtime Python package is not installed (pip install wasmtime): no wasm image")
    return package


def _package_files(package: Path, dest: str) -> list[Entry]:
    """A Python package's files (no bytecode caches) as entries below ``dest``; native libraries executable."""
    entries = []
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            mode = 0o755 if path.suffix == ".so" else 0o644
            entries.append(Entry(f"{dest}/{path.relative_to(package)}", source=path, mode=mode))
    return entries


def _etc_entries() -> list[Entry]:
    entries = [Entry(f"/etc/{name}", data=text.encode()) for name, text in layout.ETC_FILES.items()]
    entries.append(Entry("/etc/ld.so.conf", data=f"{GUEST_LIB_DIR}\n{GUEST_PREFIX}/lib\n".encode()))
    return entries


def _nimbus_entries() -> list[Entry]:
    """The files the agent imports, as bwrap binds them, at /opt/nimbus/nimbus (sources only)."""
    package = Path(nimbus.__file__).resolve().parent
    dest = f"{OPT_NIMBUS}/nimbus"
    entries = [Entry(f"{dest}/{name}", source=package / name) for name in ("__init__.py", "protocol.py")]
    agent = package / "agent"
    for path in sorted(agent.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            entries.append(Entry(f"{dest}/agent/{path.relative_to(agent)}", source=path))
    # As in bwrap machines: ES modules inside a nodejs layer find their sibling packages through it.
    entries.append(Entry(LAYER_MODULES_LINK, link=os.path.relpath(LAYER_DIR, os.path.dirname(LAYER_MODULES_LINK))))
    return entries


def _init_script(python: str) -> bytes:
    # -I: ignore PYTHON* variables and the script's directory; -S: no site (the agent is stdlib only).
    # One flag word: Linux passes everything after the interpreter in a shebang as a single argument.
    return (
        f"#!{python} -IS\n"
        '"""PID 1 of a Nimbus guest: hands over to nimbus.agent.init (see its docstring)."""\n'
        "import os, sys\n"
        "# The kernel starts init with HOME=/ and TERM=linux, no PATH: the agent gets what bwrap's gets.\n"
        "os.environ.clear()\n"
        f"os.environ.update({SANDBOX_ENV!r})\n"
        f"sys.path.insert(0, {OPT_NIMBUS!r})\n"
        "from nimbus.agent.init import main\n"
        "main(sys.argv[1:])\n"
    ).encode()


def _runtime_parts(runtime: str) -> tuple[list[Entry], list[Path], list[str]]:
    """What ``runtime`` adds to python3's tree: (entries, binaries to ldd, libraries named outright)."""
    if runtime == "nodejs":
        node = find_node()
        return [Entry(GUEST_NODE, source=node, mode=0o755)], [node], []
    if runtime == "wasm":
        entries = _package_files(_wasmtime_package(), f"{WASMTIME_SITE}/wasmtime")
        return entries, [e.source for e in entries if e.path.endswith(".so")], []
    if runtime == "rust":
        return [], [], list(RUST_LIBRARIES)
    if runtime == "provided":
        try:
            found = userland.tree_userland()
        except userland.HostMissing as exc:
            raise ImageError(str(exc)) from None
        entries = [Entry(guest, source=host, mode=0o755) for guest, host in found.files]
        entries += [Entry(guest, link=target) for guest, target in found.links]
        entries.append(Entry("/usr/bin/python3", link=f"{GUEST_PREFIX}/bin/python{_version()}"))
        return entries, [host for _, host in found.files], []
    return [], [], []  # python3 needs nothing more; go's executables are static


def plan(runtime: str) -> list[Entry]:
    """Every entry of ``runtime``'s tree-base image but the record, sorted by path; nothing is copied."""
    _check_runtime(runtime)
    python, prefixes = layout.base_python()
    stdlib = _stdlib_dir(prefixes)
    version = _version()
    guest_python = f"{GUEST_PREFIX}/bin/python{version}"
    guest_stdlib = f"{GUEST_PREFIX}/lib/python{version}"
    entries = [
        Entry(guest_python, source=python, mode=0o755),
        Entry(f"{GUEST_PREFIX}/bin/python3", link=f"python{version}"),
        Entry(layout.PYTHON_LINK, link=guest_python),
        Entry("/sbin/init", data=_init_script(guest_python), mode=0o755),
    ]
    binaries = [python]
    for path in _stdlib_files(stdlib):
        entries.append(Entry(f"{guest_stdlib}/{path.relative_to(stdlib)}", source=path,
                             mode=0o755 if path.suffix == ".so" else 0o644))
        if path.parent.name == "lib-dynload" and path.suffix == ".so":
            binaries.append(path)
    extra, extra_binaries, named = _runtime_parts(runtime)
    entries += extra
    binaries += extra_binaries
    libraries = _needed_libraries(binaries)
    for name in named:
        if name not in libraries:
            host = _host_library(name)
            libraries[name] = host
            libraries.update(_needed_libraries([host]))
    for name, host in libraries.items():
        guest = name if name.startswith("/") else f"{GUEST_LIB_DIR}/{name}"
        entries.append(Entry(guest, source=host.resolve(), mode=0o755))
    entries += _etc_entries()
    entries += _nimbus_entries()
    return sorted(entries, key=lambda e: e.path)


def _digest(entry: Entry) -> tuple[int, str]:
    if entry.link is not None:
        data = entry.link.encode()
        return len(data), hashlib.sha256(data).hexdigest()
    if entry.data is not None:
        return len(entry.data), hashlib.sha256(entry.data).hexdigest()
    digest = hashlib.sha256()
    size = 0
    with open(entry.source, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _hash_entries(runtime: str, entries: list[Entry], header: str = "") -> str:
    digest = hashlib.sha256(f"nimbus-image recipe {RECIPE_VERSION} {runtime}\n{header}".encode())
    for entry in entries:
        size, sha = _digest(entry)
        kind = "link" if entry.link is not None else "file"
        digest.update(f"{kind} {entry.path} {entry.mode:o} {size} {sha}\n".encode())
    return digest.hexdigest()


def content_hash(runtime: str) -> str:
    """sha256 (hex) of the recipe version and every (path, mode, size, sha256) that goes into the image."""
    return _hash_entries(runtime, plan(runtime))


# ---------------------------------------------------------------- the record


def _glibc_version() -> str:
    return os.confstr("CS_GNU_LIBC_VERSION").split()[-1] if hasattr(os, "confstr") else "unknown"


def _probe_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"{' '.join(argv)} failed: {exc}") from exc
    if done.returncode != 0:
        raise ImageError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}")
    return done.stdout.strip()


def _tree_tools(runtime: str) -> dict[str, dict[str, str]]:
    """{tool: {version, path}} of a tree-base image: the host's versions, since they are its files."""
    version = _version()
    tools = {
        "python": {"version": ".".join(map(str, sys.version_info[:3])), "path": f"{GUEST_PREFIX}/bin/python{version}"},
        "glibc": {"version": _glibc_version(), "path": f"{GUEST_LIB_DIR}/libc.so.6"},
    }
    if runtime == "nodejs":
        tools["node"] = {"version": _probe_version([str(find_node()), "--version"]).lstrip("v"), "path": GUEST_NODE}
    elif runtime == "wasm":
        tools["wasmtime"] = {"version": importlib.metadata.version("wasmtime"), "path": f"{WASMTIME_SITE}/wasmtime"}
    elif runtime == "rust":
        tools["libgcc_s"] = {"version": "1", "path": f"{GUEST_LIB_DIR}/libgcc_s.so.1"}
    elif runtime == "go":
        tools["go"] = {"version": "static executables (CGO_ENABLED=0)", "path": f"{TASK_DIR}/bootstrap"}
    elif runtime == "provided":
        tools.update(userland.tools(Path("/")))  # the host's packages: their files are the image's
    return tools


def _record(runtime: str, digest: str, base: str, tools: dict, **extra) -> dict:
    return {
        "runtime": runtime,
        "base": base,
        "recipe": RECIPE_VERSION,
        "content_hash": digest,
        "python": tools["python"]["version"],
        "tools": tools,
        "init": "/sbin/init",
        "agent": f"{OPT_NIMBUS}/nimbus/agent",
        **extra,
    }


def _write_record(dest: Path, record: dict) -> None:
    (dest / RECORD_PATH.lstrip("/")).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- building a tree


def _write_tree(entries: list[Entry], dest: Path) -> None:
    for mount in MOUNT_POINTS:
        (dest / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    for entry in entries:
        target = dest / entry.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.is_file():
            target.unlink()  # a debootstrap tree may have its own (an /etc/hosts): ours wins
        if entry.link is not None:
            os.symlink(entry.link, target)
            continue
        if entry.source is not None:
            shutil.copy2(entry.source, target)  # keeps mtimes, so the stdlib's bytecode stays valid
        else:
            target.write_bytes(entry.data)
        os.chmod(target, entry.mode)


def _compile_nimbus(dest: Path) -> None:
    """Bytecode for the agent's files, hash-checked so it stays valid whatever mtimes the image keeps."""
    root = dest / OPT_NIMBUS.lstrip("/")
    for source in sorted(root.rglob("*.py")):
        guest_path = "/" + str(source.relative_to(dest))
        cfile = Path(cache_from_source(str(source)))
        py_compile.compile(str(source), cfile=str(cfile), dfile=guest_path, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)


def _ldconfig(dest: Path) -> None:
    """An /etc/ld.so.cache for the tree; the libraries sit in ld.so's default directories anyway."""
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig is None:
        return
    subprocess.run([ldconfig, "-r", str(dest)], capture_output=True, timeout=LDD_TIMEOUT_S)


def build_tree(runtime: str, dest: Path, *, entries: list[Entry] | None = None, digest: str | None = None) -> dict:
    """Fill the empty or absent directory ``dest`` with ``runtime``'s tree-base image; returns the record."""
    if entries is None:
        entries = plan(runtime)
    if digest is None:
        digest = _hash_entries(runtime, entries)
    dest.mkdir(parents=True, exist_ok=True)
    _write_tree(entries, dest)
    _compile_nimbus(dest)
    _ldconfig(dest)
    record = _record(runtime, digest, "tree", _tree_tools(runtime))
    _write_record(dest, record)
    return record


# ---------------------------------------------------------------- the debootstrap base


def host_mirror(sources: tuple[Path, ...] = APT_SOURCES) -> str:
    """The first Debian archive (not the security one) this host's apt uses, else ``DEFAULT_MIRROR``.

    Reads one-line ``deb URI suite …`` lists and deb822 ``.sources`` files alike.
    """
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.suffix in (".list", ".sources"))
        elif source.is_file():
            files.append(source)
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        uris = re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, flags=re.MULTILINE)
        uris += [u for line in re.findall(r"^\s*URIs:\s*(.+)$", text, flags=re.MULTILINE) for u in line.split()]
        for uri in uris:
            if re.search(r"/debian/?$", uri) and "security" not in uri:
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def debootstrap_command(runtime: str, dest: Path, suite: str, mirror: str) -> list[str]:
    """The debootstrap run that makes ``runtime``'s Debian base in ``dest``."""
    include = ",".join(DEBOOTSTRAP_PACKAGES[runtime])
    return ["debootstrap", f"--variant={DEBOOTSTRAP_VARIANT}", f"--include={include}", suite, str(dest), mirror]


def debootstrap_entries(runtime: str) -> list[Entry]:
    """What Nimbus puts on top of a debootstrap tree: init (on Debian's python3), the agent, wasmtime, sh → bash."""
    entries = [Entry("/sbin/init", data=_init_script(DEBIAN_PYTHON), mode=0o755),
               Entry(layout.PYTHON_LINK, link=DEBIAN_PYTHON)]
    if runtime == "wasm":
        entries += _package_files(_wasmtime_package(), f"{WASMTIME_SITE}/wasmtime")
    elif runtime == "provided":
        entries += [Entry(guest, link=target) for guest, target in userland.debootstrap_links()]
    entries += _nimbus_entries()
    return sorted(entries, key=lambda e: e.path)


def _debootstrap_header(runtime: str, suite: str, mirror: str) -> str:
    packages = ",".join(DEBOOTSTRAP_PACKAGES[runtime])
    return f"debootstrap {DEBOOTSTRAP_VARIANT} {suite} {mirror} include={packages}\n"


def debootstrap_hash(runtime: str, suite: str, mirror: str) -> str:
    """sha256 of the recipe, the debootstrap inputs (variant, suite, mirror, packages) and Nimbus's files."""
    _check_runtime(runtime)
    return _hash_entries(runtime, debootstrap_entries(runtime), _debootstrap_header(runtime, suite, mirror))


def _debootstrap_tools(runtime: str, tree: Path) -> dict[str, dict[str, str]]:
    versions = userland.dpkg_versions(tree, ("python3", "libc6", "nodejs", "libgcc-s1"))
    tools = {
        "python": {"version": versions.get("python3", "unknown"), "path": DEBIAN_PYTHON},
        "glibc": {"version": versions.get("libc6", "unknown"), "path": f"{GUEST_LIB_DIR}/libc.so.6"},
    }
    if runtime == "nodejs":
        tools["node"] = {"version": versions.get("nodejs", "unknown"), "path": "/usr/bin/node"}
    elif runtime == "wasm":
        tools["wasmtime"] = {"version": importlib.metadata.version("wasmtime"), "path": f"{WASMTIME_SITE}/wasmtime"}
    elif runtime == "rust":
        tools["libgcc_s"] = {"version": versions.get("libgcc-s1", "unknown"), "path": f"{GUEST_LIB_DIR}/libgcc_s.so.1"}
    elif runtime == "go":
        tools["go"] = {"version": "static executables (CGO_ENABLED=0)", "path": f"{TASK_DIR}/bootstrap"}
    elif runtime == "provided":
        tools.update(userland.tools(tree))
    return tools


def run_streamed(argv: list[str], say: Progress, *, cwd: Path | None = None, timeout: float | None = None,
                 tail_lines: int = OUTPUT_TAIL_LINES) -> tuple[int, list[str]]:
    """Run ``argv``, handing each output line to ``say`` (long builds show progress); return its exit
    status and its last ``tail_lines`` lines, for the error. ``OSError`` when it cannot be started; on
    Ctrl-C or the timeout it is killed, not left running."""
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.strip():
                say(line)
        code = proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    return code, list(tail)


def _run_streamed(argv: list[str], say: Progress, timeout: float) -> None:
    try:
        code, tail = run_streamed(argv, say, timeout=timeout)
    except OSError as exc:
        raise ImageError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if code != 0:
        raise ImageError(f"{' '.join(argv[:2])} … exited with {code}:\n" + "\n".join(tail))


def _unmount_below(tree: Path) -> None:
    """Lazily unmount what an interrupted debootstrap left mounted in ``tree`` (its /proc, /sys), deepest first.

    Deleting the scratch tree with the host's /proc still mounted inside would walk into it.
    """
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    root = str(tree.resolve())
    points = [line.split()[1].encode().decode("unicode_escape") for line in lines if len(line.split()) > 1]
    for point in sorted((p for p in points if p == root or p.startswith(root + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=PROBE_TIMEOUT_S)


def build_debootstrap_tree(runtime: str, dest: Path, *, suite: str = DEFAULT_SUITE, mirror: str | None = None,
                           progress: Progress | None = None, digest: str | None = None) -> dict:
    """Debootstrap ``runtime``'s Debian base into the absent or empty ``dest`` and add Nimbus; returns the record."""
    say = progress or (lambda message: None)
    _check_runtime(runtime)
    mirror = mirror or host_mirror()
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root (it creates device nodes and chroots)")
    entries = debootstrap_entries(runtime)
    if digest is None:
        digest = _hash_entries(runtime, entries, _debootstrap_header(runtime, suite, mirror))
    dest.mkdir(parents=True, exist_ok=True)
    say(f"debootstrap {suite} ({DEBOOTSTRAP_VARIANT}) from {mirror}")
    try:
        _run_streamed(debootstrap_command(runtime, dest, suite, mirror), say, DEBOOTSTRAP_TIMEOUT_S)
    finally:
        _unmount_below(dest)
    say("adding the agent and init")
    for prune in DEBOOTSTRAP_PRUNE:
        directory = dest / prune
        if directory.is_dir():
            for child in directory.iterdir():
                if child.is_file() or child.is_symlink():
                    child.unlink()
                elif child.name != "partial":
                    shutil.rmtree(child)
    _write_tree(entries, dest)
    _compile_nimbus(dest)
    record = _record(runtime, digest, "debootstrap", _debootstrap_tools(runtime, dest), suite=suite, mirror=mirror,
                     variant=DEBOOTSTRAP_VARIANT, packages=list(DEBOOTSTRAP_PACKAGES[runtime]))
    _write_record(dest, record)
    return record


# ---------------------------------------------------------------- images


def image_path(home: Path, runtime: str, digest: str, base: str = DEFAULT_BASE) -> Path:
    middle = "" if base == DEFAULT_BASE else f"{base}-"
    return Path(home) / IMAGES_DIR / f"{runtime}-{middle}{digest[:HASH_CHARS]}.ext4"


def parse_image_name(path: Path) -> ImageName | None:
    """The runtime, base and hash an image's file name carries; None for a file that is not an image."""
    match = re.fullmatch(rf"([a-z0-9]+)-(?:([a-z]+)-)?([0-9a-f]{{{HASH_CHARS}}})\.ext4", Path(path).name)
    if match is None or match.group(1) not in SUPPORTED_RUNTIMES:
        return None
    base = match.group(2) or DEFAULT_BASE
    if base not in BASES:
        return None
    return ImageName(match.group(1), base, match.group(3))


def _tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes rounded to 4 KiB blocks, number of inodes) of a directory tree."""
    total, inodes = 0, 0
    for root, dirs, files in os.walk(tree):
        inodes += len(dirs) + len(files)
        for name in files:
            size = os.lstat(os.path.join(root, name)).st_size
            total += -(-size // 4096) * 4096
    return total, inodes


def _mkfs(tree: Path, image: Path, label: str, size_mb: int, inodes: int) -> None:
    mkfs = shutil.which("mkfs.ext4") or ("/sbin/mkfs.ext4" if os.path.exists("/sbin/mkfs.ext4") else None)
    if mkfs is None:
        raise ImageError("mkfs.ext4 not found (install e2fsprogs)")
    command = [mkfs, "-F", "-q", "-d", str(tree), "-L", label, "-N", str(inodes), str(image), f"{size_mb}M"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=MKFS_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageError(f"mkfs.ext4 failed: {exc}") from exc
    if done.returncode != 0:
        raise ImageError(f"mkfs.ext4 exited with {done.returncode}: {(done.stderr or done.stdout).strip()}")


def build_image(home: Path, runtime: str, *, base: str = DEFAULT_BASE, suite: str | None = None,
                mirror: str | None = None, size_mb: int | None = None, progress: Progress | None = None) -> Path:
    """``runtime``'s image under ``home``/images, built unless an image of the same content is there."""
    say = progress or (lambda message: None)
    _check_runtime(runtime)
    _check_base(base)
    if base == "tree":
        say(f"hashing the files of the {runtime} image")
        entries = plan(runtime)
        digest = _hash_entries(runtime, entries)
    else:
        suite = suite or DEFAULT_SUITE
        mirror = mirror or host_mirror()
        digest = debootstrap_hash(runtime, suite, mirror)
    image = image_path(home, runtime, digest, base)
    if image.is_file():
        say(f"cached: {image}")
        return image
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".build-{runtime}-", dir=image.parent) as scratch:
        tree = Path(scratch) / "tree"
        if base == "tree":
            say(f"copying {len(entries)} files into the tree")
            build_tree(runtime, tree, entries=entries, digest=digest)
        else:
            build_debootstrap_tree(runtime, tree, suite=suite, mirror=mirror, progress=say, digest=digest)
        say("making the ext4 file system")
        tree_image(tree, image, f"nimbus-{runtime}", size_mb=size_mb)
    say(f"built {image}")
    return image


def tree_image(tree: Path, image: Path, label: str, *, size_mb: int | None = None) -> Path:
    """Make ``image``, an ext4 file system holding ``tree``; written beside it and renamed into place.

    Sized from the tree with headroom unless ``size_mb`` is given. Also what the Firecracker driver
    makes of a dependency layer's directory, to attach it as a read-only drive.
    """
    used, inodes = _tree_usage(tree)
    if size_mb is None:
        wanted = used * (1 + HEADROOM_FRACTION) / (1 << 20) + HEADROOM_MB
        size_mb = int(-(-wanted // SIZE_ROUND_MB) * SIZE_ROUND_MB)
    partial = image.with_name(f".{image.name}.{os.getpid()}.partial")
    try:
        _mkfs(tree, partial, label[:16], size_mb, inodes + INODE_HEADROOM)
        os.replace(partial, image)  # same directory: atomic
    finally:
        partial.unlink(missing_ok=True)
    return image


def list_images(home: Path) -> list[Path]:
    """The cached images under ``home``, by name."""
    directory = Path(home) / IMAGES_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.ext4") if p.is_file())


def find_image(home: Path, runtime: str) -> Path | None:
    """The newest cached image of ``runtime`` under ``home`` (either base, by modification time), or None."""
    found = [p for p in list_images(home) if (name := parse_image_name(p)) is not None and name.runtime == runtime]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name))
