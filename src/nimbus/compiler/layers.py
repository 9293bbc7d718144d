"""Dependency layers: a package's ``requirements.txt`` or ``package.json`` resolved into a read-only tree.

A layer is built once per ``sha256(runtime, platform, recipe, manifest files)`` and kept in the build
cache (``kind = "layer"``), so every function with the same dependencies on every node sharing the store
mounts the same layer. Machines see it read-only at ``/opt/layer`` (python3: the ``pip --target`` tree;
nodejs: the contents of ``node_modules``).

Fetching runs on the host with the operator's package tools and their configuration (``pip.conf``,
``.npmrc``): ``pip install --only-binary=:all: --target`` takes wheels only, and installing a wheel
unpacks files (pip byte-compiles them; it does not run them); ``npm ci --ignore-scripts`` runs no
package script. So no package code runs on the host. A package that ships only an sdist is refused
(building one runs its ``setup.py``); npm packages with install scripts are rebuilt by ``npm rebuild``
in the builder sandbox (no network, only its own directories writable).

What a manifest may ask for is checked first: requirement lines only (no pip options such as ``-r
/etc/shadow`` or ``--index-url``, no URLs or paths), and npm dependencies from the registry only (no
``file:``, ``link:``, git or tarball URLs, in package.json or the lock file), so a manifest cannot read
host files or fetch from where the operator did not configure.

``LayerDirs`` keeps layers unpacked on this node, under ``<home>/layers/<sha256>``, fetched from the
store the first time a machine needs one.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nimbus.compiler.base import OUT_DIR, SRC_DIR, Build, BuildFailed, Job, clip
from nimbus.errors import InvalidRequest, NotFound, Unavailable

log = logging.getLogger("nimbus.compiler")

RECIPE = "layer-1"  # bump when the way a layer is made changes: every layer is then built anew
UNPACKED_MAX = 250 << 20  # as Lambda's unzipped function + layers
MANIFEST_MAX = 1 << 20
DEFAULT_TIMEOUT_S = 300.0
STALE_UNPACK_S = 3600.0  # a half-unpacked layer directory this old belongs to no running unpack
REQUIREMENTS = "requirements.txt"
PACKAGE_JSON = "package.json"
NODE_LOCKS = ("package-lock.json", "npm-shrinkwrap.json")
NODE_SCRIPT_HOOKS = ("preinstall", "install", "postinstall")
LAYERED_RUNTIMES = ("python3", "nodejs")
# npm dependency specs that name a registry version: a range, a tag or an alias to another registry package.
NPM_FORBIDDEN = ("file:", "link:", "git:", "git+", "github:", "gitlab:", "bitbucket:", "http:", "https:",
                 "workspace:", "portal:", "patch:")


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """What a package asks for: the runtime and its manifest files (name, bytes) from the package root."""

    runtime: str
    files: tuple[tuple[str, bytes], ...]

    def key(self, platform_id: str) -> str:
        h = hashlib.sha256()
        for part in (self.runtime, platform_id, RECIPE):
            h.update(part.encode() + b"\0")
        for name, data in self.files:
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()

    @property
    def source_sha256(self) -> str:
        h = hashlib.sha256()
        for name, data in self.files:
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return h.hexdigest()


# ---------------------------------------------------------------------------- what a package asks for


def spec_of(runtime: str, package: bytes) -> LayerSpec | None:
    """The layer a zip package needs, checked; None when it declares no dependencies."""
    if runtime not in LAYERED_RUNTIMES:
        return None
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        names = set(archive.namelist())

        def read(name: str) -> bytes | None:
            if name not in names:
                return None
            info = archive.getinfo(name)
            if info.file_size > MANIFEST_MAX:
                raise InvalidRequest(f"{name} is {info.file_size} bytes; the limit is {MANIFEST_MAX}")
            return archive.read(info)

        if runtime == "python3":
            data = read(REQUIREMENTS)
            if data is None or not requirement_lines(data):
                return None
            return LayerSpec(runtime, ((REQUIREMENTS, data),))
        data = read(PACKAGE_JSON)
        if data is None or not npm_dependencies(data):
            return None
        files = [(PACKAGE_JSON, data)]
        for lock in NODE_LOCKS:
            lock_data = read(lock)
            if lock_data is not None:
                check_npm_lock(lock, lock_data)
                files.append((lock, lock_data))
                break
        return LayerSpec(runtime, tuple(files))


def requirement_lines(data: bytes) -> list[str]:
    """The requirements in a requirements.txt, each a PEP 508 name with versions, extras and markers.

    Options (``-r``, ``-e``, ``--index-url``…) and direct references (URLs, paths) are refused: they
    would read host files or fetch from places the operator did not configure.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"{REQUIREMENTS} is not UTF-8 text") from None
    lines, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if not line:
            continue
        if line.startswith("-"):
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: pip options ({line.split()[0]}) are not "
                                 "accepted; list requirements only (name and version), the node's pip "
                                 "configuration says where packages come from")
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: {line!r} is not a requirement: {exc}") from None
        if requirement.url:
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: {requirement.name} names a URL or path; only "
                                 "packages from the node's package index are accepted")
        lines.append(str(requirement))
    return lines


def npm_dependencies(data: bytes) -> dict[str, str]:
    """A package.json's ``dependencies`` (what a machine needs; dev dependencies are left out), checked."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{PACKAGE_JSON} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise InvalidRequest(f"{PACKAGE_JSON} must be a JSON object")
    deps = manifest.get("dependencies") or {}
    if not isinstance(deps, dict):
        raise InvalidRequest(f"{PACKAGE_JSON}: dependencies must be an object of name → version")
    for field in ("dependencies", "optionalDependencies", "peerDependencies", "overrides"):
        for name, spec in _flat(manifest.get(field) or {}):
            _check_npm_spec(f"{PACKAGE_JSON} {field}", name, spec)
    return deps


def _flat(value, prefix: str = ""):
    if isinstance(value, dict):
        for name, inner in value.items():
            yield from _flat(inner, f"{prefix}{name}" if not prefix else f"{prefix} > {name}")
    else:
        yield prefix, value


def _check_npm_spec(where: str, name: str, spec) -> None:
    if not isinstance(spec, str):
        raise InvalidRequest(f"{where}: {name!r} must map to a version string")
    target = spec[4:].split("@", 2)[-1] if spec.startswith("npm:") else spec
    lowered = target.strip().lower()
    if lowered.startswith(NPM_FORBIDDEN) or lowered.startswith(("/", ".", "~/")) or (
            "/" in lowered and not spec.startswith("npm:")):
        raise InvalidRequest(f"{where}: {name!r} is {spec!r}; only versions from the npm registry are "
                             "accepted (no files, links, git or tarball URLs)")


def check_npm_lock(name: str, data: bytes) -> None:
    """Refuse a lock file that installs anything from outside a registry, or links to host paths."""
    try:
        lock = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(lock, dict) or not isinstance(lock.get("packages", {}), dict):
        raise InvalidRequest(f"{name} must be an npm lock file (lockfileVersion 2 or 3, with \"packages\")")
    for path, entry in (lock.get("packages") or {}).items():
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{name}: entry {path!r} must be an object")
        if path and not path.startswith("node_modules/") and "/node_modules/" not in path:
            raise InvalidRequest(f"{name}: {path!r} is a local package (workspace or file:); only registry "
                                 "packages are accepted")
        if entry.get("link"):
            raise InvalidRequest(f"{name}: {path!r} is a link; only registry packages are accepted")
        resolved = entry.get("resolved")
        if resolved is not None and (not isinstance(resolved, str) or not resolved.startswith("https://")):
            raise InvalidRequest(f"{name}: {path!r} resolves to {resolved!r}; only https registry tarballs "
                                 "are accepted")


# ---------------------------------------------------------------------------- building


def platform_id(runtime: str, node_version: str = "") -> str:
    """What a layer's binaries are for: a wheel or a native module built here loads only on the same."""
    libc = "-".join(filter(None, platform.libc_ver())) or "unknown-libc"
    if runtime == "python3":
        return f"python{sys.version_info.major}.{sys.version_info.minor} {platform.machine()} {libc}"
    return f"node {node_version} {platform.machine()} {libc}"


class LayerBuilder:
    """Resolves a ``LayerSpec`` into a layer archive (a tar.gz of the tree machines mount).

    ``sandbox`` runs the jobs that must execute package code (``npm rebuild`` of packages with install
    scripts); it is the compiler's builder.
    """

    def __init__(self, home: Path, sandbox, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.home = Path(home)
        self.sandbox = sandbox
        self.timeout_s = timeout_s
        self._node_version: str | None = None

    async def platform(self, runtime: str) -> str:
        if runtime == "nodejs" and self._node_version is None:
            out = await self._run(["node", "--version"], Path("."), "node --version")
            self._node_version = out.strip()
        return platform_id(runtime, self._node_version or "")

    async def build(self, spec: LayerSpec, key: str, platform_id_: str) -> Build:
        """Fetch and install ``spec``'s dependencies into a fresh tree and pack it; ``BuildFailed`` says why not."""
        started = time.monotonic()
        work_root = self.home / "layers" / ".work"
        work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_root) as tmp:
            work = Path(tmp)
            for name, data in spec.files:
                (work / name).write_bytes(data)
            if spec.runtime == "python3":
                tree, output = await self._pip(work)
            else:
                tree, output = await self._npm(work, spec)
            size = _tree_size(tree)
            if size > UNPACKED_MAX:
                raise BuildFailed(f"the dependencies unpack to {size >> 20} MiB; the limit is "
                                  f"{UNPACKED_MAX >> 20} MiB", output)
            archive = await asyncio.to_thread(pack, tree)
        return Build(
            key=key, runtime=spec.runtime, toolchain=platform_id_, artifact=archive,
            artifact_sha256=hashlib.sha256(archive).hexdigest(), log=clip(output),
            duration_ms=round((time.monotonic() - started) * 1000, 1), cached=False,
            source_sha256=spec.source_sha256, kind="layer",
        )

    async def _pip(self, work: Path) -> tuple[Path, str]:
        tree = work / "python"
        argv = [sys.executable, "-m", "pip", "install", "--only-binary=:all:", "--target", str(tree),
                "--no-input", "--progress-bar", "off", "--disable-pip-version-check", "--no-warn-script-location",
                "-r", str(work / REQUIREMENTS)]
        try:
            output = await self._run(argv, work, "pip install")
        except BuildFailed as exc:
            hint = ""
            if "from versions: none" in exc.output or "No matching distribution" in exc.output:
                hint = (" (no wheel for this platform, or no such package; Nimbus installs wheels only, since "
                        "building a source distribution runs its setup code)")
            raise BuildFailed(f"resolving {REQUIREMENTS} failed{hint}", exc.output) from None
        shutil.rmtree(tree / "bin", ignore_errors=True)  # console scripts: nothing in a machine runs them
        return tree, output

    async def _npm(self, work: Path, spec: LayerSpec) -> tuple[Path, str]:
        locked = any(name in NODE_LOCKS for name, _ in spec.files)
        common = ["--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund", "--no-update-notifier"]
        argv = ["npm", "ci", *common] if locked else ["npm", "install", "--no-package-lock", *common]
        try:
            output = await self._run(argv, work, "npm ci" if locked else "npm install")
        except BuildFailed as exc:
            raise BuildFailed(f"resolving {PACKAGE_JSON} failed", exc.output) from None
        tree = work / "node_modules"
        tree.mkdir(exist_ok=True)
        shutil.rmtree(tree / ".bin", ignore_errors=True)  # links to host-absolute targets; nothing runs them
        scripted = _packages_with_install_scripts(tree)
        if scripted:
            output += await self._rebuild_in_sandbox(work, scripted)
        return tree, output

    async def _rebuild_in_sandbox(self, work: Path, scripted: list[str]) -> str:
        """Run the install scripts of ``scripted`` packages in the builder sandbox, without network."""
        bundle = await asyncio.to_thread(_tar_dir, work / "node_modules", "node_modules")
        script = ("set -e; tar -xf layer.tar; rm layer.tar; HOME=/tmp npm rebuild --offline --no-audit --no-fund "
                  f"--foreground-scripts; tar -cf {OUT_DIR}/layer.tar node_modules")
        job = Job(runtime="nodejs", tool="/bin/sh", args=("-c", script),
                  files=(("layer.tar", bundle), (PACKAGE_JSON, (work / PACKAGE_JSON).read_bytes())),
                  artifact="layer.tar", timeout_s=self.timeout_s)
        result = await self.sandbox.run(job)
        if result.timed_out or result.status != 0 or result.artifact is None:
            why = "ran past its time limit" if result.timed_out else f"failed ({result.note or result.status})"
            raise BuildFailed(f"the install scripts of {', '.join(scripted[:5])} {why} in the builder sandbox "
                              f"(no network; {SRC_DIR})", result.output)
        shutil.rmtree(work / "node_modules")
        await asyncio.to_thread(_untar, result.artifact, work)
        return f"\nran the install scripts of {', '.join(scripted)} in the builder sandbox:\n{result.output}"

    async def _run(self, argv: list[str], cwd: Path, what: str) -> str:
        env = dict(os.environ, PIP_NO_INPUT="1", npm_config_update_notifier="false", npm_config_fund="false")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except FileNotFoundError:
            raise BuildFailed(f"{what}: {argv[0]} is not installed on this node") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                out, _ = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError) as exc:
            _kill_group(proc)
            await proc.wait()
            if isinstance(exc, TimeoutError):
                raise BuildFailed(f"{what} ran past its {self.timeout_s:g} s limit and was stopped",
                                  timed_out=True) from None
            raise
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise BuildFailed(f"{what} failed (exit status {proc.returncode})", text)
        return text


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def _packages_with_install_scripts(tree: Path) -> list[str]:
    """Packages under ``node_modules`` that npm would run a script for at install (``--ignore-scripts`` skipped it)."""
    found = []
    for manifest in sorted(tree.glob("**/package.json")):
        if manifest.parent.parent.name != "node_modules" and manifest.parent.parent.parent.name != "node_modules":
            continue  # a package.json inside a package's own tree, not a package root
        try:
            data = json.loads(manifest.read_bytes())
        except (ValueError, OSError):
            continue
        scripts = data.get("scripts") if isinstance(data, dict) else None
        hooks = isinstance(scripts, dict) and any(scripts.get(h) for h in NODE_SCRIPT_HOOKS)
        if hooks or (manifest.parent / "binding.gyp").is_file():  # npm runs node-gyp rebuild for those
            found.append(str(data.get("name") or manifest.parent.name))
    return found


def _tree_size(tree: Path) -> int:
    return sum(p.lstat().st_size for p in tree.rglob("*") if not p.is_dir())


def _tar_dir(path: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path, arcname=arcname)
    return buffer.getvalue()


def _untar(data: bytes, dest: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        tar.extractall(dest, filter="data")


def pack(tree: Path) -> bytes:
    """The tree as a gzipped tar, entries sorted and owned by nobody in particular (same tree → same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for path in sorted(tree.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(tree)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isfile():
                with open(path, "rb") as file:
                    tar.addfile(info, file)
            else:
                tar.addfile(info)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- layers on this node


class LayerDirs:
    """Layers unpacked on this node, ``<home>/layers/<sha256>``: fetched and unpacked once, then shared.

    The directory is made under a temporary name and renamed into place, so a machine never mounts a
    half-unpacked layer, and two calls needing the same layer unpack it once.
    """

    def __init__(self, home: Path, fetch: Callable[[str], Awaitable[bytes]]) -> None:
        self.root = Path(home) / "layers"
        self.fetch = fetch
        self._pending: dict[str, asyncio.Task[str]] = {}

    async def path(self, sha256: str) -> str:
        """The host path of layer ``sha256``, unpacked if it was not yet."""
        final = self.root / sha256
        if final.is_dir():
            return str(final)
        task = self._pending.get(sha256)
        if task is None:
            task = asyncio.create_task(self._unpack(sha256, final))
            self._pending[sha256] = task
            task.add_done_callback(lambda _t: self._pending.pop(sha256, None))
        return await asyncio.shield(task)

    async def _unpack(self, sha256: str, final: Path) -> str:
        # Failures here are the node's, not the caller's: 503, and the next call tries again.
        try:
            data = await self.fetch(sha256)
        except NotFound:
            raise Unavailable(f"layer {sha256} is not in the store (collected while in use?)") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise Unavailable(f"layer {sha256} read from the store does not match its hash")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=self.root))
        try:
            await asyncio.to_thread(_untar, data, tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except FileExistsError:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise Unavailable(f"cannot unpack layer {sha256} on this node: {exc}") from exc
        log.info("unpacked layer %s (%d bytes) into %s", sha256[:12], len(data), final)
        return str(final)

    def prune(self, keep: set[str]) -> int:
        """Remove unpacked layers not in ``keep`` (gc: the store no longer has them); how many went.

        Files beside them named ``<sha256>.<suffix>`` (the Firecracker driver's ext4 image of a layer)
        go with their layer.
        """
        removed = 0
        if not self.root.is_dir():
            return 0
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                if entry.name != ".work" and time.time() - entry.stat().st_mtime > STALE_UNPACK_S:
                    shutil.rmtree(entry, ignore_errors=True)  # a leftover of an unpack that died
                continue
            if entry.is_file():
                if entry.name.split(".", 1)[0] not in keep:
                    entry.unlink(missing_ok=True)
                continue
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed


__all__ = ["LayerBuilder", "LayerDirs", "LayerSpec", "pack", "platform_id", "requirement_lines", "spec_of"]
