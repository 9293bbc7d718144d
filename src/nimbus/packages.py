"""Function packages: a zip of many files (python3, nodejs, provided), checked before anything of it is stored.

A package is refused, with a message naming the entry, when it is not a zip, holds too many entries,
unpacks to more than ``UNPACKED_MAX`` (Lambda's 250 MB) or to more than a machine's ``/var/task`` holds,
compresses suspiciously well (a zip bomb), names an absolute path, a ``..`` component, a backslash or a
NUL, holds a symbolic link (the machine's agent does not make links; one pointing out of the tree is
called that), holds two entries that unpack to one path (a duplicate, or a file where a directory must
be), or does not contain the module its handler names (for ``provided``: a ``bootstrap`` at its top level,
whatever the handler says). Machines get it as :func:`to_machine` says.
"""

from __future__ import annotations

import io
import lzma
import mmap
import stat
import zipfile
import zlib
from dataclasses import dataclass

from nimbus import protocol
from nimbus.errors import InvalidRequest, PayloadTooLarge

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
ENTRIES_MAX = protocol.TREE_ENTRIES_MAX
UNPACKED_MAX = protocol.UNPACKED_MAX  # as Lambda's unzipped deployment package
# The /var/task tmpfs of every machine (bwrap's TASK_DIR_MB, the Firecracker guest's DEFAULT_TASK_SIZE).
# A file there takes whole pages; a MiB is left for what the runtime adds (nodejs' link to its layer).
TASK_DIR_BYTES = 256 << 20
TASK_DIR_FREE = 1 << 20
PAGE = mmap.PAGESIZE
# Up to this much unpacked, a package is sent to machines as a tree; above it, as its zip.
TREE_MAX = 8 << 20
RATIO_MAX = 200  # uncompressed / compressed, per entry over 1 MiB: text compresses ~10x, bombs ~1000x
RATIO_FLOOR = 1 << 20
PACKAGED_RUNTIMES = ("python3", "nodejs", "provided")
BOOTSTRAP = "bootstrap"  # a custom runtime's entry point, in the package's root (the agent makes it executable)
NODE_SUFFIXES = (".js", ".mjs", ".cjs")
# RuntimeError: an encrypted entry; LZMAError: a corrupt ZIP_LZMA one.
UNREADABLE = (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError, zlib.error,
              lzma.LZMAError, OSError)


@dataclass(frozen=True)
class Package:
    """What a checked package holds: entry count, unpacked size, and the file the handler loads."""

    entries: int
    unpacked: int
    handler_file: str


def is_zip(data: bytes) -> bool:
    return data.startswith(ZIP_MAGIC) or data.startswith(EMPTY_ZIP_MAGIC)


def handler_candidates(runtime: str, handler: str) -> list[str]:
    """The files, relative to the package root, that the handler's module may be."""
    if runtime == "provided":
        return [BOOTSTRAP]  # the handler is the bootstrap's to read, and names no file
    module = handler.rpartition(".")[0]
    if runtime == "python3":
        path = module.replace(".", "/") if "/" not in module else module
        return [f"{path}.py", f"{path}/__init__.py"]
    if module.endswith(NODE_SUFFIXES):
        return [module]
    return [module + suffix for suffix in NODE_SUFFIXES] + [f"{module}/index{suffix}" for suffix in NODE_SUFFIXES]


def _bad_name(name: str) -> str | None:
    if "\0" in name:
        return "has a NUL in its name"
    if "\\" in name:
        return "has a backslash in its name (zip paths use /)"
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in name.split("/"):
        return "has a '..' component"
    return None


class _Paths:
    """The paths a package's entries unpack to (:func:`nimbus.protocol.package_path`), refusing collisions.

    Two entries that unpack to one path, or a file where another entry needs a directory, would fail
    every machine's unpacking; names differing only in case are different files (Linux file systems).
    """

    def __init__(self) -> None:
        self.files: dict[str, str] = {}  # path → the entry that is that file
        self.dirs: dict[str, str] = {}  # path → the entry that made it a directory (itself, or one inside it)

    def add(self, name: str, is_dir: bool) -> None:
        path = protocol.package_path(name)
        if not path:
            return  # "./": the package's root
        parts = path.split("/")
        for end in range(1, len(parts) + (1 if is_dir else 0)):
            parent = "/".join(parts[:end])
            if parent in self.files:
                raise _duplicate(name, self.files[parent], f"{parent!r} would be both a file and a directory")
            self.dirs.setdefault(parent, name)
        if is_dir:
            return
        if path in self.files:
            raise _duplicate(name, self.files[path], f"both unpack to {path!r}")
        if path in self.dirs:
            raise _duplicate(name, self.dirs[path], f"{path!r} would be both a file and a directory")
        self.files[path] = name


def _duplicate(name: str, other: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"package entry {name!r} is a duplicate of entry {other!r}: {why}")


def check(data: bytes, runtime: str, handler: str, memory_mb: int | None = None) -> Package:
    """Check a package for ``runtime`` with ``handler``; ``InvalidRequest``/``PayloadTooLarge`` say why not.

    With ``memory_mb``, also that the function's memory can hold its files and the Init blob they come
    in: /var/task is a tmpfs, whose pages count against the machine's memory limit (a cgroup's, or a
    microVM's RAM), so a bigger package could never finish unpacking.
    """
    if runtime not in PACKAGED_RUNTIMES:
        raise InvalidRequest(f"zip packages are for python3 and nodejs, and for provided (custom runtimes); a "
                             f"{runtime} function is one source file")
    if len(data) > protocol.BLOB_MAX:
        raise PayloadTooLarge(f"the package is {len(data)} bytes; a machine takes at most {protocol.BLOB_MAX}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise InvalidRequest(f"the package is not a readable zip: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > ENTRIES_MAX:
            raise InvalidRequest(f"the package has {len(infos)} entries; the limit is {ENTRIES_MAX}")
        paths = _Paths()
        total = pages = 0
        for info in infos:
            name = info.filename
            why = _bad_name(name)
            if why is not None:
                raise InvalidRequest(f"package entry {name!r} {why}")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                try:
                    target = archive.read(info)[:4096].decode(errors="replace")
                except UNREADABLE as exc:
                    raise InvalidRequest(f"package entry {name!r} cannot be unpacked: {exc}") from None
                parts = (name.rpartition("/")[0] + "/" + target).split("/")
                depth, outside = 0, target.startswith("/")
                for part in parts:
                    depth = depth - 1 if part == ".." else depth + (part not in ("", "."))
                    outside = outside or depth < 0
                where = "out of the package" if outside else "inside the package"
                raise InvalidRequest(f"package entry {name!r} is a symbolic link {where} (to {target!r}); "
                                     "links are not supported: put the file itself in the zip")
            if info.file_size > RATIO_FLOOR and info.file_size > RATIO_MAX * max(info.compress_size, 1):
                raise InvalidRequest(f"package entry {name!r} unpacks {info.compress_size} bytes into "
                                     f"{info.file_size}: refused as a zip bomb")
            total += info.file_size
            if total > UNPACKED_MAX:
                raise PayloadTooLarge(f"the package unpacks to more than {UNPACKED_MAX} bytes (at entry {name!r})")
            pages += -(-info.file_size // PAGE)
            if pages * PAGE > TASK_DIR_BYTES - TASK_DIR_FREE:
                raise PayloadTooLarge(f"the package's files take more than the {TASK_DIR_BYTES - TASK_DIR_FREE} "
                                      f"bytes a machine's /var/task holds for them (at entry {name!r}; each file "
                                      f"takes whole pages of {PAGE} bytes)")
            paths.add(name, info.is_dir())
        held = len(data) if total > TREE_MAX else total  # the Init blob a machine holds while it unpacks
        if memory_mb is not None and pages * PAGE + held >= memory_mb << 20:
            raise InvalidRequest(f"a machine holds {held} bytes of this package while it writes {pages * PAGE} "
                                 f"to /var/task, which is memory too: a function of memory_mb {memory_mb} cannot "
                                 f"hold them; give it more than {-(-(pages * PAGE + held) // (1 << 20))} MiB")
        files = paths.files
        candidates = handler_candidates(runtime, handler)
        found = next((c for c in candidates if c in files), None)
        if found is None and runtime == "provided":
            raise InvalidRequest(f"a provided package needs its executable {BOOTSTRAP!r} at its top level (not in a "
                                 f"folder); the package's top level has {_top_level(files)}")
        if found is None:
            raise InvalidRequest(f"the handler {handler!r} names a module the package does not have (looked for "
                                 f"{', '.join(candidates)}; the package's top level has "
                                 f"{_top_level(files)})")
        try:
            bad = archive.testzip()
        except UNREADABLE as exc:
            raise InvalidRequest(f"the package cannot be unpacked: {exc}") from None
        if bad is not None:
            raise InvalidRequest(f"package entry {bad!r} is corrupt (its CRC does not match)")
        return Package(entries=len(infos), unpacked=total, handler_file=found)


def _top_level(files: dict[str, str]) -> str:
    names = sorted({f.split("/")[0] + ("/" if "/" in f else "") for f in files})
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "nothing"


def check_bootstrap(data: bytes, memory_mb: int | None = None) -> None:
    """Check a ``provided`` function's single file: the bootstrap itself (a script, or an executable).

    The agent holds the Init blob while it writes the file to /var/task, a tmpfs counted as the
    machine's memory, as for a package (:func:`check`).
    """
    if not data.strip():
        raise InvalidRequest("the bootstrap is empty: give a script starting with #! or an executable")
    held = len(data) + -(-len(data) // PAGE) * PAGE
    if memory_mb is not None and held >= memory_mb << 20:
        raise InvalidRequest(f"a machine holds {held} bytes while it writes this {len(data)}-byte bootstrap to "
                             f"/var/task, which is memory too: a function of memory_mb {memory_mb} cannot; give it "
                             f"more than {-(-held // (1 << 20))} MiB")


def to_machine(data: bytes) -> bytes:
    """What Init sends for a checked package: its tree when it unpacks to at most ``TREE_MAX``, else its zip.

    A tree spares the agent zipfile's imports: 20 cold starts of a small package through the API took
    a median 15 ms with its tree, 27 ms with its zip. A zip is at most 50 MiB, so it fits a frame
    whatever it unpacks to, and the host never builds or caches a tree bigger than ``TREE_MAX``. The
    agent unpacks both as strictly (``_write_tree``, ``_write_zip``); :func:`is_zip` tells them apart.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        unpacked = sum(info.file_size for info in archive.infolist())
    return to_tree(data) if unpacked <= TREE_MAX else data


def to_tree(data: bytes) -> bytes:
    """A checked package as the tree blob an agent unpacks without zipfile (see ``nimbus.protocol``).

    Executable bits are kept from the entries' Unix modes; ``./`` prefixes and directory slashes go.
    """
    entries = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name = protocol.package_path(info.filename)
            if not name:
                continue
            if info.is_dir():
                entries.append((name, "d", b""))
            else:
                executable = (info.external_attr >> 16) & 0o111
                entries.append((name, "x" if executable else "", archive.read(info)))
    return protocol.encode_tree(entries)


__all__ = ["Package", "check", "check_bootstrap", "handler_candidates", "is_zip", "to_machine", "to_tree",
           "PACKAGED_RUNTIMES", "TASK_DIR_BYTES", "TREE_MAX", "UNPACKED_MAX"]
