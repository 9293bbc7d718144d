"""Guest images for the Firecracker driver: an ext4 root file system with a runtime and the agent as init.

This builds the *small tree* variant: no package manager and no network. The files a guest needs are
copied from this host — the base Python interpreter (not the venv) with a trimmed standard library, the
shared libraries it and its extension modules link against (found with ``ldd``), the dynamic loader,
and the Nimbus files the agent imports — into a directory, and ``mkfs.ext4 -d`` turns that directory
into an image. It takes seconds and the python3 image is a few tens of MiB.

Guest layout::

    /sbin/init                  ``#!/usr/local/bin/python3.X -IS`` → nimbus.agent.init (PID 1)
    /usr/local/bin/python3.X    the interpreter; its prefix is /usr/local, found from its own location
    /usr/local/lib/python3.X/   the standard library and lib-dynload (no tests, IDLE, tkinter, ensurepip)
    /lib/x86_64-linux-gnu/      every shared library ``ldd`` named, libpython included (its RUNPATH
                                points at the host's prefix, so it must sit where ld.so looks anyway)
    /lib64/ld-linux-x86-64.so.2 the dynamic loader, at the path baked into every executable
    /opt/nimbus/nimbus/         ``__init__.py``, ``protocol.py`` and ``agent/`` (as bwrap binds them)
    /etc/                       passwd, group, hosts, nsswitch.conf, ld.so.cache, nimbus-image.json
    /proc /sys /dev /tmp /run /var/task /opt/layer   empty mount points

Images are cached as ``$NIMBUS_HOME/images/<runtime>-<hash12>.ext4``. The hash covers the recipe
version and the (path, size, sha256) of every file that goes in, and is computed from the host's files
*before* anything is built, so a cache hit costs one pass of hashing and nothing else; any change to the
interpreter, a library or an agent file gives a new image.
"""

from __future__ import annotations

import hashlib
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import cache_from_source
from pathlib import Path

import nimbus
from nimbus.errors import NimbusError
from nimbus.machines import bwrap

RECIPE_VERSION = 1  # bump when the layout or the selection rules change: every cached image is rebuilt
SUPPORTED_RUNTIMES = ("python3",)
PLANNED_RUNTIMES = ("nodejs", "go", "rust", "wasm")
IMAGES_DIR = "images"
HASH_CHARS = 12
GUEST_PREFIX = "/usr/local"
GUEST_LIB_DIR = "/lib/x86_64-linux-gnu"
OPT_NIMBUS = bwrap.OPT_DIR
RECORD_PATH = "/etc/nimbus-image.json"
MOUNT_POINTS = ("/proc", "/sys", "/dev", "/tmp", "/run", "/var/task", "/opt/layer", "/root")
# Parts of the standard library a function does not need in a guest: they are most of its size.
STDLIB_SKIP = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
    "__phello__", "pydoc_data",
})
STDLIB_SKIP_PREFIXES = ("config-",)  # config-3.X-<platform>/ holds the static libpython for embedding
DYNLOAD_SKIP_PREFIXES = ("_tkinter", "_test", "_ctypes_test", "xxlimited", "_xxtestfuzz", "xxsubtype")
# Free space left in the file system on top of the files: a function's /tmp and /var/task are tmpfs,
# so the root needs little, but ext4's own metadata (journal, inode tables) takes a share.
HEADROOM_MB = 16
HEADROOM_FRACTION = 0.2
SIZE_ROUND_MB = 8
INODE_HEADROOM = 1024
MKFS_TIMEOUT_S = 300.0
LDD_TIMEOUT_S = 30.0

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


# ---------------------------------------------------------------- the recipe


def _check_runtime(runtime: str) -> None:
    if runtime in SUPPORTED_RUNTIMES:
        return
    if runtime in PLANNED_RUNTIMES:
        raise ImageError(f"images for the {runtime} runtime are not built yet; supported: "
                         f"{', '.join(SUPPORTED_RUNTIMES)}")
    raise ImageError(f"unknown runtime {runtime!r}; supported: {', '.join(SUPPORTED_RUNTIMES)}")


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


def _etc_entries() -> list[Entry]:
    entries = [Entry(f"/etc/{name}", data=text.encode()) for name, text in bwrap._ETC_FILES.items()]
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
    return entries


def _init_script(python: str) -> bytes:
    # -I: ignore PYTHON* variables and the script's directory; -S: no site (the agent is stdlib only).
    # One flag word: Linux passes everything after the interpreter in a shebang as a single argument.
    return (
        f"#!{python} -IS\n"
        '"""PID 1 of a Nimbus guest: hands over to nimbus.agent.init (see its docstring)."""\n'
        "import sys\n"
        f"sys.path.insert(0, {OPT_NIMBUS!r})\n"
        "from nimbus.agent.init import main\n"
        "main(sys.argv[1:])\n"
    ).encode()


def plan(runtime: str) -> list[Entry]:
    """Every entry of ``runtime``'s guest tree but the record, sorted by path; nothing is copied."""
    _check_runtime(runtime)
    python, prefixes = bwrap.base_python()
    stdlib = _stdlib_dir(prefixes)
    version = _version()
    guest_python = f"{GUEST_PREFIX}/bin/python{version}"
    guest_stdlib = f"{GUEST_PREFIX}/lib/python{version}"
    entries = [
        Entry(guest_python, source=python, mode=0o755),
        Entry(f"{GUEST_PREFIX}/bin/python3", link=f"python{version}"),
        Entry("/sbin/init", data=_init_script(guest_python), mode=0o755),
    ]
    binaries = [python]
    for path in _stdlib_files(stdlib):
        entries.append(Entry(f"{guest_stdlib}/{path.relative_to(stdlib)}", source=path,
                             mode=0o755 if path.suffix == ".so" else 0o644))
        if path.parent.name == "lib-dynload" and path.suffix == ".so":
            binaries.append(path)
    for name, host in _needed_libraries(binaries).items():
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


def _hash_entries(runtime: str, entries: list[Entry]) -> str:
    digest = hashlib.sha256(f"nimbus-image recipe {RECIPE_VERSION} {runtime}\n".encode())
    for entry in entries:
        size, sha = _digest(entry)
        kind = "link" if entry.link is not None else "file"
        digest.update(f"{kind} {entry.path} {entry.mode:o} {size} {sha}\n".encode())
    return digest.hexdigest()


def content_hash(runtime: str) -> str:
    """sha256 (hex) of the recipe version and every (path, mode, size, sha256) that goes into the image."""
    return _hash_entries(runtime, plan(runtime))


# ---------------------------------------------------------------- building


def _record(runtime: str, digest: str) -> dict:
    return {
        "runtime": runtime,
        "recipe": RECIPE_VERSION,
        "content_hash": digest,
        "python": ".".join(map(str, sys.version_info[:3])),
        "init": "/sbin/init",
        "agent": f"{OPT_NIMBUS}/nimbus/agent",
    }


def _write_tree(entries: list[Entry], dest: Path) -> None:
    for mount in MOUNT_POINTS:
        (dest / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    for entry in entries:
        target = dest / entry.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
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
    """Fill the empty or absent directory ``dest`` with ``runtime``'s guest tree; returns the record."""
    if entries is None:
        entries = plan(runtime)
    if digest is None:
        digest = _hash_entries(runtime, entries)
    dest.mkdir(parents=True, exist_ok=True)
    _write_tree(entries, dest)
    _compile_nimbus(dest)
    _ldconfig(dest)
    record = _record(runtime, digest)
    (dest / RECORD_PATH.lstrip("/")).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def image_path(home: Path, runtime: str, digest: str) -> Path:
    return Path(home) / IMAGES_DIR / f"{runtime}-{digest[:HASH_CHARS]}.ext4"


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


def build_image(home: Path, runtime: str, *, size_mb: int | None = None, progress: Progress | None = None) -> Path:
    """``runtime``'s image under ``home``/images, built unless an image of the same content is there."""
    say = progress or (lambda message: None)
    _check_runtime(runtime)
    say(f"hashing the files of the {runtime} image")
    entries = plan(runtime)
    digest = _hash_entries(runtime, entries)
    image = image_path(home, runtime, digest)
    if image.is_file():
        say(f"cached: {image}")
        return image
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".build-{runtime}-", dir=image.parent) as scratch:
        tree = Path(scratch) / "tree"
        say(f"copying {len(entries)} files into the tree")
        build_tree(runtime, tree, entries=entries, digest=digest)
        used, inodes = _tree_usage(tree)
        if size_mb is None:
            wanted = used * (1 + HEADROOM_FRACTION) / (1 << 20) + HEADROOM_MB
            size_mb = int(-(-wanted // SIZE_ROUND_MB) * SIZE_ROUND_MB)
        partial = Path(scratch) / image.name
        say(f"making a {size_mb} MiB ext4 file system")
        _mkfs(tree, partial, f"nimbus-{runtime}"[:16], size_mb, inodes + INODE_HEADROOM)
        os.replace(partial, image)  # same directory tree and file system: atomic
    say(f"built {image}")
    return image


def list_images(home: Path) -> list[Path]:
    """The cached images under ``home``, by name."""
    directory = Path(home) / IMAGES_DIR
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.ext4") if p.is_file())
