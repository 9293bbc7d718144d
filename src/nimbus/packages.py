"""Function packages: a zip of many files (python3, nodejs), checked before anything of it is stored.

A package is refused, with a message naming the entry, when it is not a zip, holds too many entries,
unpacks to more than ``UNPACKED_MAX`` (Lambda's 250 MB) or compresses suspiciously well (a zip bomb),
names an absolute path, a ``..`` component, a backslash or a NUL, holds a symbolic link (the machine's
agent unpacks with ``zipfile``, which does not make links; one pointing out of the tree is called that),
or does not contain the module its handler names. Machines get it as a file tree
(:func:`to_tree`, :func:`nimbus.protocol.encode_tree`), which their agent writes into ``/var/task``.
"""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from dataclasses import dataclass

from nimbus import protocol
from nimbus.errors import InvalidRequest, PayloadTooLarge

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
ENTRIES_MAX = 10_000
UNPACKED_MAX = 250 << 20  # as Lambda's unzipped deployment package
RATIO_MAX = 200  # uncompressed / compressed, per entry over 1 MiB: text compresses ~10x, bombs ~1000x
RATIO_FLOOR = 1 << 20
PACKAGED_RUNTIMES = ("python3", "nodejs")
NODE_SUFFIXES = (".js", ".mjs", ".cjs")
UNREADABLE = (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zlib.error, OSError)


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


def check(data: bytes, runtime: str, handler: str) -> Package:
    """Check a package for ``runtime`` with ``handler``; ``InvalidRequest``/``PayloadTooLarge`` say why not."""
    if runtime not in PACKAGED_RUNTIMES:
        raise InvalidRequest(f"zip packages are for {' and '.join(PACKAGED_RUNTIMES)}; a {runtime} function is one "
                             "source file")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise InvalidRequest(f"the package is not a readable zip: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > ENTRIES_MAX:
            raise InvalidRequest(f"the package has {len(infos)} entries; the limit is {ENTRIES_MAX}")
        files, total = set(), 0
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
            if name in files:
                raise InvalidRequest(f"package entry {name!r} is in the zip twice")
            if not name.endswith("/"):
                files.add(name)
        candidates = handler_candidates(runtime, handler)
        found = next((c for c in candidates if c in files), None)
        if found is None:
            raise InvalidRequest(f"the handler {handler!r} names a module the package does not have (looked for "
                                 f"{', '.join(candidates)}; the package's top level has "
                                 f"{', '.join(sorted({f.split('/')[0] for f in files})[:10]) or 'nothing'})")
        try:
            bad = archive.testzip()
        except UNREADABLE as exc:
            raise InvalidRequest(f"the package cannot be unpacked: {exc}") from None
        if bad is not None:
            raise InvalidRequest(f"package entry {bad!r} is corrupt (its CRC does not match)")
        return Package(entries=len(infos), unpacked=total, handler_file=found)


def to_tree(data: bytes) -> bytes:
    """A checked package as the tree blob an agent unpacks without zipfile (see ``nimbus.protocol``).

    Executable bits are kept from the entries' Unix modes; ``./`` prefixes and directory slashes go.
    """
    entries = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            name = "/".join(part for part in info.filename.split("/") if part not in ("", "."))
            if not name:
                continue
            if info.is_dir():
                entries.append((name, "d", b""))
            else:
                executable = (info.external_attr >> 16) & 0o111
                entries.append((name, "x" if executable else "", archive.read(info)))
    return protocol.encode_tree(entries)


__all__ = ["Package", "check", "handler_candidates", "is_zip", "to_tree", "PACKAGED_RUNTIMES"]
