"""Dependency layers: a package's ``requirements.txt`` or ``package.json`` resolved into a read-only tree.

A layer is built once per ``sha256(runtime, platform, recipe, manifest files)`` and kept in the build
cache (``kind = "layer"``), so every function with the same dependencies on every node sharing the store
mounts the same layer. Machines see it read-only at ``/opt/layer`` (python3: the ``pip --target`` tree;
nodejs: the contents of ``node_modules``).

Fetching runs on the host: ``pip install --only-binary=:all: --target`` takes wheels only, and installing
a wheel unpacks files (pip byte-compiles them; it does not run them); ``npm ci --ignore-scripts`` runs no
package script. So no package code runs on the host. npm packages with install scripts are rebuilt by
``npm rebuild`` in the builder sandbox (no network, only its own directories writable).

Source distributions. When the wheel-only resolve fails (something has no wheel for this platform,
or no wheel at all), pip runs again, ``--prefer-binary``, *inside* the builder sandbox, where building
an sdist runs its ``setup.py`` as untrusted code under the builder's limits, writing no host directory
(:meth:`SandboxBuilder.run_sealed`). Its only network is :class:`~nimbus.compiler.egress.EgressProxy`:
a Unix socket bound into the sandbox, relayed to ``127.0.0.1:<port>`` by a stdlib forwarder that is
pip's ``--proxy`` (and every child's ``HTTP(S)_PROXY``), letting through exactly the hosts of the
configured index. A build that asks for any other host fails, naming it. Downloading on the host
instead would not do: ``pip download`` of an sdist runs its build backend to learn its metadata.
The sandbox's pip reads a config Nimbus writes from the node's own (:func:`sandbox_pip_config`): index
URLs without their credentials (package code could read them); local indexes, find-links and
constraints bound read-only at neutral paths, and the CA certificates at ``/etc/ssl/certs``.

pip and npm run with an environment of Nimbus's making (:func:`resolver_env`), never the node's: PATH,
LANG, a private scratch HOME, and the few pip/npm settings Nimbus chooses. The operator's index and
registry settings (index-url, find-links, cert, proxy; registry, cafile, auth tokens) are honoured
through pip's and npm's own config files (the global ones, and the node user's, named explicitly), not
through environment variables: ``PIP_*``, ``npm_config_*`` and proxy variables of the node are not seen.
npm is handed the registry it is configured with as ``--registry``, and lock entries must resolve under it.

What a manifest may ask for, and how it is re-emitted so the resolvers never read a tenant's
text, is :mod:`nimbus.compiler.manifests`. What the resolvers print is scrubbed of the node's
environment values before a tenant sees it.

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
from collections.abc import Awaitable, Callable
from pathlib import Path

from nimbus.compiler.base import OUT_DIR, SRC_DIR, Build, BuildFailed, Job, clip
from nimbus.compiler.egress import EgressProxy
from nimbus.compiler.manifests import NODE_LOCKS, PACKAGE_JSON, REQUIREMENTS, LayerSpec, check_npm_lock
from nimbus.compiler.sdists import (
    SANDBOX_EGRESS,
    SANDBOX_PIP_CONF,
    SANDBOX_PIP_MAIN,
    SANDBOX_SITE,
    SANDBOX_TARGET,
    UNPACKED_FILES_MAX,
    package_dir,
    parse_pip_config,
    sandbox_pip_config,
)
from nimbus.errors import NotFound, Unavailable, redact

log = logging.getLogger("nimbus.compiler")

UNPACKED_MAX = 250 << 20  # as Lambda's unzipped function + layers
DEFAULT_TIMEOUT_S = 300.0
STALE_UNPACK_S = 3600.0  # a half-unpacked layer directory this old belongs to no running unpack
NODE_SCRIPT_HOOKS = ("preinstall", "install", "postinstall")
# The resolvers' environment: nothing of the node's but PATH (see resolver_env).
FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"
NO_GIT = "/nonexistent/nimbus-resolvers-use-no-git"


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
    scripts, and source distributions where it has ``run_sealed``); it is the compiler's builder.
    ``sdists=False`` keeps python3 layers to wheels (the host's resolve alone).
    """

    def __init__(self, home: Path, sandbox, *, timeout_s: float = DEFAULT_TIMEOUT_S, sdists: bool = True) -> None:
        self.home = Path(home)
        self.sandbox = sandbox
        self.timeout_s = timeout_s
        self.sdists = sdists
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
            if exc.timed_out:
                raise
            if not self.sdists or not hasattr(self.sandbox, "run_sealed"):  # wheels only (docker has no sealed jobs)
                hint = ""
                if "from versions: none" in exc.output or "No matching distribution" in exc.output:
                    why = (f"the {getattr(self.sandbox, 'name', 'configured')} builder cannot build source "
                           "distributions" if self.sdists else "source distributions are not built here")
                    hint = f" (no wheel for this platform, or no such package; {why}, so wheels only)"
                raise BuildFailed(f"resolving {REQUIREMENTS} failed{hint}", exc.output) from None
            shutil.rmtree(tree, ignore_errors=True)
            output = await self._pip_in_sandbox(work, tree)
        shutil.rmtree(tree / "bin", ignore_errors=True)  # console scripts: nothing in a machine runs them
        return tree, output

    async def _pip_in_sandbox(self, work: Path, tree: Path) -> str:
        """Resolve again in the builder sandbox, source distributions allowed, the index its only network."""
        listed = await self._run([sys.executable, "-m", "pip", "config", "list"], work, "pip config list", scrub=False)
        settings = parse_pip_config(listed)
        conf, binds, allowed, notes = sandbox_pip_config(settings)
        pip_dir = package_dir("pip")
        if pip_dir is None:
            raise BuildFailed("pip is not installed beside Nimbus, so source distributions cannot be built")
        # A short private directory: a Unix socket's path has at most 107 bytes.
        private = Path(tempfile.mkdtemp(prefix="nimbus-egress-"))
        try:
            (private / "pip.conf").write_text(conf)
            os.chmod(private / "pip.conf", 0o644)
            binds = [*binds, (str(private / "pip.conf"), SANDBOX_PIP_CONF), (str(pip_dir), f"{SANDBOX_SITE}/pip"),
                     (str(private / "egress.sock"), SANDBOX_EGRESS)]
            args = ("-I", "-S", f"{SRC_DIR}/nimbus_pip.py", "--prefer-binary", "--no-cache-dir", "--target",
                    SANDBOX_TARGET, "--no-input", "--progress-bar", "off", "--disable-pip-version-check",
                    "--no-warn-script-location", "-r", REQUIREMENTS)
            env = (("HOME", "/tmp"), ("TMPDIR", "/tmp"), ("LANG", "C.UTF-8"), ("PYTHONPATH", SANDBOX_SITE),
                   ("PIP_CONFIG_FILE", SANDBOX_PIP_CONF), ("PIP_NO_INPUT", "1"))
            job = Job(runtime="python3", tool="python3", args=args, env=env, artifact="layer.tar.gz",
                      files=(("nimbus_pip.py", SANDBOX_PIP_MAIN.encode()),
                             (REQUIREMENTS, (work / REQUIREMENTS).read_bytes())),
                      timeout_s=self.timeout_s)
            async with EgressProxy(private / "egress.sock", allowed) as proxy:
                result = await self.sandbox.run_sealed(job, binds=binds, artifact_max=UNPACKED_MAX)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        where = "in the builder sandbox, whose only network is the package index"
        if proxy.refused:
            reached = ", ".join(sorted(f"{host}:{port}" for host, port in allowed)) or "none configured"
            raise BuildFailed(f"resolving {REQUIREMENTS} {where}: a package tried to reach "
                              f"{', '.join(proxy.refused)}, which is not the package index ({reached}); "
                              "builds may reach the index only", result.output)
        if result.timed_out:
            raise BuildFailed(f"resolving {REQUIREMENTS} {where} ran past its {self.timeout_s:g} s limit and was "
                              "stopped", result.output, timed_out=True)
        if result.status != 0 or result.artifact is None:
            why = f" ({result.note})" if result.note else ""
            raise BuildFailed(f"resolving {REQUIREMENTS} failed{why} (no wheel was found for some requirement, "
                              f"so pip ran again {where}, building source distributions)", result.output)
        await asyncio.to_thread(_untar_bounded, result.artifact, tree)
        note = "".join(f"note: {line}\n" for line in notes)
        return (f"{note}no wheel for some requirement: resolved {where} (source distributions built there):\n"
                f"{result.output}")

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

    async def _run(self, argv: list[str], cwd: Path, what: str, *, scrub: bool = True) -> str:
        """Run a resolver in ``resolver_env`` with a private HOME of its own, removed when it ends.

        ``scrub=False`` keeps the node's environment values in the output, for Nimbus's own reading only.
        """
        scratch = self.home / "layers" / ".work"
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".home-", dir=scratch) as home:
            return await self._exec(argv, cwd, what, resolver_env(Path(home)), scrub=scrub)

    async def _exec(self, argv: list[str], cwd: Path, what: str, env: dict[str, str], *, scrub: bool = True) -> str:
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
        text = redact(text) if scrub else text
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


def _untar_bounded(data: bytes, dest: Path) -> None:
    """Unpack a tree a sandboxed build made: untrusted, so its sizes are added up (sparse members at their
    full size) and checked before anything is written, and the ``data`` filter keeps every entry inside."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        members, total = [], 0
        for member in tar:
            total += member.size
            members.append(member)
            if total > UNPACKED_MAX or len(members) > UNPACKED_FILES_MAX:
                raise BuildFailed(f"the dependencies built in the sandbox unpack to over {UNPACKED_MAX >> 20} MiB "
                                  f"or {UNPACKED_FILES_MAX} files; the limits are those")
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, members=members, filter="data")


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


__all__ = ["LayerBuilder", "LayerDirs", "pack", "platform_id"]
