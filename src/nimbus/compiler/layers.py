"""Dependency layers: a package's ``requirements.txt`` or ``package.json`` resolved into a read-only tree.

A layer is built once per ``sha256(runtime, platform, recipe, manifest files)`` and kept in the build
cache (``kind = "layer"``), so every function with the same dependencies on every node sharing the store
mounts the same layer. Machines see it read-only at ``/opt/layer`` (python3: the ``pip --target`` tree;
nodejs: the contents of ``node_modules``).

Fetching runs on the host: ``pip install --only-binary=:all: --target`` takes wheels only, and installing
a wheel unpacks files (pip byte-compiles them; it does not run them); ``npm ci --ignore-scripts`` runs no
package script. So no package code runs on the host. A package that ships only an sdist is refused
(building one runs its ``setup.py``); npm packages with install scripts are rebuilt by ``npm rebuild``
in the builder sandbox (no network, only its own directories writable).

pip and npm run with an environment of Nimbus's making (:func:`resolver_env`), never the node's: PATH,
LANG, a private scratch HOME, and the few pip/npm settings Nimbus chooses. The operator's index and
registry settings (index-url, find-links, cert, proxy; registry, cafile, auth tokens) are honoured
through pip's and npm's own config files (the global ones, and the node user's, named explicitly), not
through environment variables: ``PIP_*``, ``npm_config_*`` and proxy variables of the node are not seen.
npm is handed the registry it is configured with as ``--registry``, and lock entries must resolve under it.

What a manifest may ask for is checked and re-emitted, so the resolvers never read the tenant's text:
``requirements.txt`` becomes canonical PEP 508 lines (no pip options such as ``-r /etc/shadow`` or
``--index-url``, no URLs or paths, no ``${VAR}``, which pip would expand); ``package.json`` becomes its
dependency sections only, each naming registry packages (a semver range, a dist-tag or an ``npm:``
alias; no ``file:``, ``link:``, git, gist or tarball URLs, no workspaces), and a lock file's entries
must be registry packages whose ``resolved``, when given, is under the configured registry. So a
manifest cannot read host files or the node's environment, or fetch from where the operator did not
configure. What the resolvers print is scrubbed of the node's environment values before a tenant sees it.

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
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from nimbus.compiler.base import OUT_DIR, SRC_DIR, Build, BuildFailed, Job, clip
from nimbus.errors import InvalidRequest, NotFound, Unavailable, redact
from nimbus.protocol import package_path

log = logging.getLogger("nimbus.compiler")

RECIPE = "layer-2"  # bump when the way a layer is made changes: every layer is then built anew
UNPACKED_MAX = 250 << 20  # as Lambda's unzipped function + layers
MANIFEST_MAX = 1 << 20
DEFAULT_TIMEOUT_S = 300.0
STALE_UNPACK_S = 3600.0  # a half-unpacked layer directory this old belongs to no running unpack
REQUIREMENTS = "requirements.txt"
PACKAGE_JSON = "package.json"
NODE_LOCKS = ("package-lock.json", "npm-shrinkwrap.json")
NODE_SCRIPT_HOOKS = ("preinstall", "install", "postinstall")
LAYERED_RUNTIMES = ("python3", "nodejs")
# Text in a canonical requirement that pip's requirement-file parser would act on: variables, comments,
# continuations, per-requirement options.
PIP_SIGNIFICANT = re.compile(r"[$#\\]|\s-")
NPM_DEPENDENCY_FIELDS = ("dependencies", "devDependencies", "optionalDependencies", "peerDependencies")
NPM_NAME = re.compile(r"^(?:@[a-z0-9~-][a-z0-9._~-]*/)?[a-z0-9~-][a-z0-9._~-]*$", re.IGNORECASE)
NPM_NAME_MAX = 214
NPM_SPEC_MAX = 256
# A dist-tag: npm reads a spec as a tag when it is no range, no URL, no path and no tarball file name.
NPM_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
NPM_FILE_SUFFIX = re.compile(r"\.(?:tgz|tar|tar\.gz)$", re.IGNORECASE)
# The resolvers' environment: nothing of the node's but PATH (see resolver_env).
FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"
NO_GIT = "/nonexistent/nimbus-resolvers-use-no-git"


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
    """The layer a zip package needs, checked and re-emitted; None when it declares no dependencies.

    The spec holds what the resolver will read: ``requirements.txt`` as canonical requirement lines,
    ``package.json`` as its checked dependency fields only; a lock file as it came (checked entry by
    entry; against the registry once the builder knows it, see :meth:`LayerBuilder.check`).
    """
    if runtime not in LAYERED_RUNTIMES:
        return None
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        # By the path an entry unpacks to, as the machine sees it: ``./requirements.txt`` is the manifest too.
        infos = {package_path(info.filename): info for info in archive.infolist() if not info.is_dir()}

        def read(name: str) -> bytes | None:
            info = infos.get(name)
            if info is None:
                return None
            if info.file_size > MANIFEST_MAX:
                raise InvalidRequest(f"{name} is {info.file_size} bytes; the limit is {MANIFEST_MAX}")
            return archive.read(info)

        if runtime == "python3":
            data = read(REQUIREMENTS)
            lines = requirement_lines(data) if data is not None else []
            if not lines:
                return None
            return LayerSpec(runtime, ((REQUIREMENTS, "".join(f"{line}\n" for line in lines).encode()),))
        data = read(PACKAGE_JSON)
        manifest = npm_manifest(data) if data is not None else {}
        if not manifest.get("dependencies"):
            return None
        files = [(PACKAGE_JSON, json.dumps(manifest, indent=2).encode() + b"\n")]
        for lock in NODE_LOCKS:
            lock_data = read(lock)
            if lock_data is not None:
                check_npm_lock(lock, lock_data)
                files.append((lock, lock_data))
                break
        return LayerSpec(runtime, tuple(files))


def requirement_lines(data: bytes) -> list[str]:
    """The requirements in a requirements.txt, each re-emitted canonically (a PEP 508 name with versions,
    extras and markers), so pip reads Nimbus's text, never the tenant's.

    Options (``-r``, ``-e``, ``--index-url``…) and direct references (URLs, paths) are refused: they
    would read host files or fetch from places the operator did not configure. So is ``${`` anywhere:
    pip expands ``${VAR}`` in requirement files from its environment.
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
        if "${" in line or "${" in line.replace(" ", ""):
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: ${{...}} (an environment variable) is not "
                                 "accepted; write the version out")
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
        canonical = str(requirement)
        if PIP_SIGNIFICANT.search(canonical):
            raise InvalidRequest(f"{REQUIREMENTS} line {start}: {line!r} holds text pip would read as an "
                                 "option, a comment or a variable ('$', '#', '\\' or ' -'); only names, "
                                 "versions, extras and markers are accepted")
        lines.append(canonical)
    if pending.strip():
        raise InvalidRequest(f"{REQUIREMENTS} line {start}: the file ends in a line continuation")
    return lines


def npm_dependencies(data: bytes) -> dict[str, str]:
    """A package.json's ``dependencies`` (what a machine needs), after checking the whole manifest."""
    return npm_manifest(data).get("dependencies", {})


def npm_manifest(data: bytes) -> dict:
    """The package.json npm will see: only the checked fields of the tenant's, re-emitted.

    Every dependency section must name registry packages (a semver range, a dist-tag, or an ``npm:``
    alias of a valid package name); ``workspaces`` are refused; everything else (scripts, config,
    publishConfig…) is left out, so it never reaches npm.
    """
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{PACKAGE_JSON} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise InvalidRequest(f"{PACKAGE_JSON} must be a JSON object")
    if "workspaces" in manifest:
        raise InvalidRequest(f"{PACKAGE_JSON}: workspaces are not accepted; a function's dependencies come "
                             "from the npm registry only")
    out: dict = {}
    name, version = manifest.get("name"), manifest.get("version")
    if isinstance(name, str) and valid_npm_name(name):
        out["name"] = name
    if isinstance(version, str) and _semver(version):
        out["version"] = version
    out.update((field, deps) for field, deps in _dependency_sections(PACKAGE_JSON, manifest).items() if deps)
    meta = manifest.get("peerDependenciesMeta")
    if meta is not None:
        if not isinstance(meta, dict) or not all(
                isinstance(v, dict) and set(v) <= {"optional"} and all(isinstance(o, bool) for o in v.values())
                for v in meta.values()):
            raise InvalidRequest(f"{PACKAGE_JSON}: peerDependenciesMeta must map names to {{\"optional\": true}}")
        for dep in meta:
            _check_npm_name(f"{PACKAGE_JSON} peerDependenciesMeta", dep)
        if meta:
            out["peerDependenciesMeta"] = meta
    for field in ("bundleDependencies", "bundledDependencies"):  # a packing matter: checked, not passed on
        bundled = manifest.get(field)
        if bundled is None or isinstance(bundled, bool):
            continue
        if not isinstance(bundled, list):
            raise InvalidRequest(f"{PACKAGE_JSON}: {field} must be a list of package names")
        for dep in bundled:
            _check_npm_name(f"{PACKAGE_JSON} {field}", dep)
    overrides = manifest.get("overrides")
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise InvalidRequest(f"{PACKAGE_JSON}: overrides must be an object")
        _check_overrides(overrides, "")
        if overrides:
            out["overrides"] = overrides
    return out


def valid_npm_name(name: str) -> bool:
    """npm's documented package-name rules (``validate-npm-package-name``): URL-safe, at most 214
    characters, not starting with ``.`` or ``_``; capitals are allowed, as old packages have them."""
    return (isinstance(name, str) and len(name) <= NPM_NAME_MAX and bool(NPM_NAME.match(name))
            and name.lower() not in ("node_modules", "favicon.ico"))


def _semver(text: str) -> bool:
    from semantic_version import Version

    try:
        Version(text)
    except ValueError:
        return False
    return True


def _range_or_tag(text: str) -> bool:
    """True for an npm semver range (``^1.2``, ``1.x || >=3``, ``*``) or a dist-tag (``latest``)."""
    from semantic_version import NpmSpec

    if NPM_TAG.match(text) and not NPM_FILE_SUFFIX.search(text):
        return True
    try:
        NpmSpec(text)
    except ValueError:
        return False
    return True


def _check_npm_name(where: str, name) -> None:
    if not valid_npm_name(name):
        raise InvalidRequest(f"{where}: {name!r} is not a valid npm package name")


def _check_npm_spec(where: str, name: str, spec) -> None:
    if not isinstance(spec, str):
        raise InvalidRequest(f"{where}: {name!r} must map to a version string")
    if _registry_spec(spec):
        return
    raise InvalidRequest(f"{where}: {name!r} is {spec!r}; only packages from the npm registry are accepted "
                         "(a semver range, a dist-tag or npm:<name>@<range>; no files, links, git, gists "
                         "or tarball URLs)")


def _registry_spec(spec: str) -> bool:
    """A spec npm resolves from the registry: a range or tag, or an ``npm:`` alias of a valid name."""
    if len(spec) > NPM_SPEC_MAX:
        return False
    if spec.startswith("npm:"):
        target = spec[4:]
        at = target.find("@", 1)  # a scoped name starts with @
        alias, version = (target, "") if at < 0 else (target[:at], target[at + 1:])
        return valid_npm_name(alias) and _range_or_tag(version.strip())
    return _range_or_tag(spec.strip())


def _check_overrides(overrides: dict, path: str) -> None:
    """npm ``overrides``: selectors (``name`` or ``name@range``, ``.`` for the package itself) mapping to a
    spec, a ``$name`` reference to a direct dependency, or a nested object of the same."""
    for selector, value in overrides.items():
        where = f"{PACKAGE_JSON} overrides{path}"
        if selector != ".":
            at = selector.find("@", 1)
            base, version = (selector, None) if at < 0 else (selector[:at], selector[at + 1:])
            _check_npm_name(where, base)
            if version is not None and not _range_or_tag(version):
                raise InvalidRequest(f"{where}: {selector!r} selects no registry version")
        if isinstance(value, dict):
            _check_overrides(value, f"{path} > {selector}")
        elif isinstance(value, str) and value.startswith("$"):
            _check_npm_name(where, value[1:])
        else:
            _check_npm_spec(where, selector, value)


def _dependency_sections(where: str, holder: dict) -> dict[str, dict]:
    """The dependency sections of a package.json or a lock entry, by field, every name and spec checked."""
    sections = {}
    for field in NPM_DEPENDENCY_FIELDS:
        deps = holder.get(field)
        if deps is None:
            continue
        if not isinstance(deps, dict):
            raise InvalidRequest(f"{where}: {field} must be an object of name → version")
        for dep, spec in deps.items():
            _check_npm_name(f"{where} {field}", dep)
            _check_npm_spec(f"{where} {field}", dep, spec)
        sections[field] = deps
    return sections


def check_npm_lock(name: str, data: bytes, registry: str | None = None) -> None:
    """Refuse a lock file that installs anything from outside the registry, or links to host paths.

    Without ``registry`` (when the package arrives) the entries' shape is checked; with it (before
    every resolve, :meth:`LayerBuilder.check`) every ``resolved`` must also be under that registry.
    Nothing is rewritten: npm reads the lock as the tenant wrote it.
    """
    try:
        lock = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{name} is not valid JSON: {exc}") from None
    if (not isinstance(lock, dict) or not isinstance(lock.get("packages"), dict)
            or lock.get("lockfileVersion") not in (2, 3)):
        raise InvalidRequest(f"{name} must be an npm lock file (lockfileVersion 2 or 3, with \"packages\")")
    for path, entry in lock["packages"].items():
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{name}: entry {path!r} must be an object")
        if path and not _lock_path(path):
            raise InvalidRequest(f"{name}: {path!r} is a local package (workspace or file:); only registry "
                                 "packages are accepted")
        if entry.get("link"):
            raise InvalidRequest(f"{name}: {path!r} is a link; only registry packages are accepted")
        if "workspaces" in entry:
            raise InvalidRequest(f"{name}: {path or 'the root'!r} has workspaces; they are not accepted")
        if path:
            version = entry.get("version")
            if not isinstance(version, str) or not _semver(version):
                raise InvalidRequest(f"{name}: {path!r} has version {version!r}; only registry versions "
                                     "(x.y.z) are accepted")
            if "name" in entry:
                _check_npm_name(f"{name} {path!r}", entry["name"])
        elif "resolved" in entry:
            raise InvalidRequest(f"{name}: the root entry cannot be resolved from anywhere")
        _check_resolved(name, path, entry.get("resolved"), registry)
        _dependency_sections(f"{name} {path!r}", entry)
    _check_legacy_lock(name, lock.get("dependencies") or {}, registry)


def _lock_path(path: str) -> bool:
    parts = path.split("/node_modules/")
    if not parts[0].startswith("node_modules/"):
        return False
    parts[0] = parts[0][len("node_modules/"):]
    return all(valid_npm_name(part) for part in parts)


def _check_resolved(name: str, path: str, resolved, registry: str | None) -> None:
    if resolved is None:
        return  # npm fetches name@version from --registry
    ok = isinstance(resolved, str) and resolved.startswith(("https://", "http://"))
    if ok and registry is not None:
        ok = under_registry(resolved, registry)
    if not ok:
        where = f"the configured registry {registry}" if registry else "an npm registry"
        raise InvalidRequest(f"{name}: {path!r} resolves to {resolved!r}; only tarballs from {where} are "
                             "accepted (or leave \"resolved\" out)")


def _check_legacy_lock(name: str, deps, registry: str | None, path: str = "dependencies") -> None:
    """The ``dependencies`` tree lockfileVersion 2 keeps for old npm versions: the same rules."""
    if not isinstance(deps, dict):
        raise InvalidRequest(f"{name}: {path} must be an object")
    for dep, entry in deps.items():
        where = f"{path} > {dep}"
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{name}: {where!r} must be an object")
        _check_npm_name(f"{name} {where!r}", dep)
        version = entry.get("version")
        alias = version[4:].rpartition("@") if isinstance(version, str) and version.startswith("npm:") else None
        if not isinstance(version, str) or not (
                _semver(version) or (alias and valid_npm_name(alias[0]) and _semver(alias[2]))):
            raise InvalidRequest(f"{name}: {where!r} has version {version!r}; only registry versions are accepted")
        _check_resolved(name, where, entry.get("resolved"), registry)
        _check_legacy_lock(name, entry.get("dependencies") or {}, registry, where)


def under_registry(url: str, registry: str) -> bool:
    """True when ``url`` is on ``registry``'s scheme, host and port, under its path (no ``..``, no userinfo)."""
    try:
        u, r = urlsplit(url), urlsplit(registry)
        port_u, port_r = u.port, r.port
    except ValueError:
        return False
    if (u.scheme, u.hostname, port_u) != (r.scheme, r.hostname, port_r) or u.username or u.password:
        return False
    segments = unquote(u.path).split("/")
    if ".." in segments or "." in segments or "\\" in unquote(u.path):
        return False
    return u.path.startswith(r.path.rstrip("/") + "/")


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
        self._registry: str | None = None

    async def platform(self, runtime: str) -> str:
        if runtime == "nodejs" and self._node_version is None:
            out = await self._run(["node", "--version"], self.home, "node --version")
            self._node_version = out.strip()
        return platform_id(runtime, self._node_version or "")

    async def registry(self) -> str:
        """The npm registry the operator configured (``npm config get registry``, read once)."""
        if self._registry is None:
            out = (await self._run(["npm", "config", "get", "registry"], self.home, "npm config get registry")).strip()
            if not out.startswith(("https://", "http://")):
                raise BuildFailed(f"npm's configured registry is {out!r}, not an http(s) URL")
            self._registry = out if out.endswith("/") else out + "/"
        return self._registry

    async def check(self, spec: LayerSpec) -> None:
        """Refuse a lock file with a ``resolved`` outside the configured registry (asked before every resolve,
        cached or not, since only now is the registry known)."""
        for name, data in spec.files:
            if name in NODE_LOCKS:
                check_npm_lock(name, data, await self.registry())

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
            artifact_sha256=hashlib.sha256(archive).hexdigest(), log=clip(redact(output)),
            duration_ms=round((time.monotonic() - started) * 1000, 1), cached=False,
            source_sha256=spec.source_sha256, kind="layer",
        )

    async def _pip(self, work: Path) -> tuple[Path, str]:
        tree = work / "python"
        argv = [sys.executable, "-m", "pip", "install", "--only-binary=:all:", "--no-cache-dir", "--target", str(tree),
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
        common = ["--registry", await self.registry(), "--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund",
                  "--no-update-notifier"]
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
        """Run a resolver in ``resolver_env`` with a private HOME of its own, removed when it ends."""
        scratch = self.home / "layers" / ".work"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".home-", dir=scratch) as home:
            return await self._exec(argv, cwd, what, resolver_env(Path(home)))

    async def _exec(self, argv: list[str], cwd: Path, what: str, env: dict[str, str]) -> str:
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
        text = redact(out.decode(errors="replace"))
        if proc.returncode != 0:
            raise BuildFailed(f"{what} failed (exit status {proc.returncode})", text)
        return text


def resolver_env(home: Path) -> dict[str, str]:
    """The whole environment pip and npm run with: nothing of the node's but PATH.

    The node's environment holds its secrets (an admin key, the database URL, cloud credentials), and
    pip expands ``${VAR}`` in requirement files; so none of it is passed, proxies included. The operator's
    own settings still apply through pip's and npm's config files: pip reads its global and site files
    itself, npm its global npmrc; the node user's files (``~/.config/pip/pip.conf`` or ``~/.pip/pip.conf``,
    ``~/.npmrc``, or ``PIP_CONFIG_FILE``/``NPM_CONFIG_USERCONFIG`` where set) are named explicitly.
    """
    env = {
        "PATH": os.environ.get("PATH") or FALLBACK_PATH, "HOME": str(home), "LANG": "C.UTF-8",
        "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "npm_config_cache": str(home / ".npm"), "npm_config_update_notifier": "false", "npm_config_fund": "false",
        "npm_config_audit": "false", "npm_config_git": NO_GIT,
    }
    pip_conf = os.environ.get("PIP_CONFIG_FILE") or _first_file(
        Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" / "pip.conf")
    if pip_conf:
        env["PIP_CONFIG_FILE"] = str(pip_conf)
    npmrc = (os.environ.get("NPM_CONFIG_USERCONFIG") or os.environ.get("npm_config_userconfig")
             or _first_file(Path.home() / ".npmrc"))
    env["npm_config_userconfig"] = str(npmrc) if npmrc else os.devnull
    return env


def _first_file(*paths: Path) -> Path | None:
    return next((path for path in paths if path.is_file()), None)


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
