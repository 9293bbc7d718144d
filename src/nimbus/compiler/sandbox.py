"""The ``sandbox`` builder: each build job runs the host's toolchain in a bubblewrap sandbox, like a machine.

Build scripts are untrusted code, so the sandbox is made the way :mod:`nimbus.machines.bwrap` makes a
machine, with the toolchain in place of the agent. It sees only:

* the host's ``/usr`` read-only (``/bin``, ``/lib``… as the merged-usr symlinks they are), so Go
  (``/usr/lib/go-*``), ``cc``/``ld`` and Debian's ``rustc`` are there; ``/etc/ld.so.cache`` and
  ``/etc/alternatives`` (``cc`` is a symlink through it) read-only; a minimal passwd/group/hosts written
  by the builder;
* a toolchain living outside ``/usr`` bound read-only at a neutral path: the rustup sysroot (found once
  with ``rustc --print sysroot``; its home, ``/root``, is never mounted) at ``/opt/rust``, a GOROOT
  outside ``/usr`` at ``/opt/go``;
* the job's two host directories, ``<home>/builds/<id>/src`` at ``/build/src`` and ``…/out`` at
  ``/build/out``: the only writable host paths; a private size-capped tmpfs at ``/tmp``; fresh
  ``/proc`` and ``/dev``; everything else read-only.

So the node's home (its SQLite database, other builds), ``/root``, ``/work`` and the host's ``/etc`` are
not there at all, and a new network namespace holds only its own loopback: nothing on the host's
127.0.0.1 (PostgreSQL on 5432…) is reachable, and no module or crate can be downloaded.

Privileges follow the machines: an ordinary user gets a user namespace (uid 65534 inside, nested ones
disabled); as root no user namespace is made (it could only map to host root) and bwrap keeps just
CAP_SETUID/SETGID/SETPCAP for ``setpriv``, which clears the bounding set, the groups and the
inheritable set and becomes host uid/gid 65534 before the toolchain starts (``no_new_privs`` is set by
bwrap). The job's directories are chowned to 65534 for that.

Sealed jobs (:meth:`SandboxBuilder.run_sealed`) run a package's own build code, not a toolchain's:
pip building source distributions for a dependency layer (:mod:`nimbus.compiler.layers`), with the
machines' Python (``python3``: the base installation bound read-only at its own path). They write no
host directory: the source is bound read-only, there is no ``/build/out``, and the artifact goes to one
host file handed in as descriptor ``ARTIFACT_FD``, so ``RLIMIT_FSIZE`` bounds what they can leave on the
node's disk; everything else they write lands in the size-capped ``/tmp``, which the memory limit counts.
Their one way out of the network namespace is a Unix socket the caller binds in (the egress proxy).

System calls: the machines' seccomp filter (:mod:`nimbus.machines.seccomp`: no mount, unshare/setns or
namespace-creating clone, ptrace, keyctl, bpf, perf_event_open, userfaultfd, kexec, modules…), handed to
bwrap with ``--seccomp`` on a descriptor the ``/bin/sh`` launcher opens; bwrap installs it just before
the toolchain's ``exec``, after building the namespaces. Go and rustc need none of the denied calls.

Limits: a cgroup per job (:mod:`nimbus.machines.cgroups`) with the memory limit (no swap), a pids
limit and a CPU quota that leaves the node a core; where a controller is missing ``RLIMIT_DATA`` stands
in for memory. ``RLIMIT_CPU`` bounds each process's CPU time, ``RLIMIT_FSIZE`` each file, cores are
off. At the wall-clock limit (or when the build is cancelled) the cgroup is killed and bwrap with it
(``--die-with-parent`` takes the sandbox's pid namespace down).

Go's build cache. ``-trimpath`` makes Debian's precompiled std unusable (measured here: a function
build takes ~7.5 s from an empty cache under the one-core quota, ~0.2 s with the warm cache below), so a
cache is needed; and a shared writable one would let one user's build plant objects that another user's
build links. Instead the builder fills a *warm* cache once per toolchain with a trusted job (``go build
-trimpath std``: std only, no user code, same environment as builds) in
``<home>/compiler/gocache/<key>``, and each build mounts it as the read-only lower layer of an overlay
whose upper layer is a tmpfs thrown away with the sandbox (bwrap's ``--overlay-src`` +
``--tmp-overlay``). A build can only ever write to its own upper layer. Warming takes ~16 s on two
cores, once per node home and Go version, inside the first Go build. Where bwrap or the kernel has no
overlay, builds use an empty cache in ``/tmp`` (slower, equally safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import shlex
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

from nimbus.agent.contract import SANDBOX_GID, SANDBOX_UID
from nimbus.compiler import process, recipes, toolchains
from nimbus.compiler.base import OUT_DIR, SRC_DIR, TMP_DIR, BuildFailed, Job, JobResult, Toolchain, clip
from nimbus.compiler.workspace import ARTIFACT_MAX, Workspace, private_dir, remove_tree
from nimbus.errors import MachineStartError
from nimbus.machines import cgroups, layout, seccomp
from nimbus.machines.layout import parent_dirs

log = logging.getLogger("nimbus.compiler.sandbox")

HOSTNAME = "nimbus-build"
PATH = "/usr/local/bin:/usr/bin:/bin"
SHELL = "/bin/sh"
SECCOMP_FD = 9  # where the launcher opens the seccomp program for bwrap
ARTIFACT_FD = 8  # where a sealed job writes its artifact (run_sealed)
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
RUST_MOUNT = "/opt/rust"
GO_MOUNT = "/opt/go"
DEFAULT_MEMORY_MB = 2048
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_PIDS_MAX = 1024  # threads count: go runs several compilers with GOMAXPROCS threads each
FSIZE_MAX = 1 << 30  # no single file over 1 GiB (the artifact limit is far lower)
BWRAP_PROCS = 2  # the outer bwrap and the sandbox's init live in the job's cgroup too
CGROUP_REMOVE_TRIES = 40
CGROUP_REMOVE_PAUSE_S = 0.025
WARM_READY = "nimbus-warm-ready"
WARM_TIMEOUT_S = 900.0  # compiling std takes ~16 s on two cores here; independent of the (user) build timeout
_MERGED_USR_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_ETC_FILES = {
    "passwd": (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"nobody:x:{SANDBOX_UID}:{SANDBOX_GID}:nobody:/tmp:/usr/sbin/nologin\n"
    ),
    "group": f"root:x:0:\nnogroup:x:{SANDBOX_GID}:\n",
    "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}


def default_cpus() -> float:
    """The CPU quota of a build: every core but one, so a build leaves the node a core to serve calls."""
    return float(max(1, (os.cpu_count() or 1) - 1))


def bwrap_supports_overlay(bwrap: str) -> bool:
    """True when this bwrap has ``--tmp-overlay`` (0.11+) and the kernel has overlayfs."""
    try:
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read().split():
                return False
        done = subprocess.run([bwrap, "--help"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return b"--tmp-overlay" in done.stdout + done.stderr


class SandboxBuilder:
    """Runs build jobs in bwrap sandboxes; see the module docstring for what a sandbox holds.

    ``home`` is the node's home: jobs use ``home/builds``, the warm Go cache and sandbox ``/etc`` files
    live in ``home/compiler`` (0700). ``images`` is accepted for a uniform registry and ignored.
    """

    name = "sandbox"

    def __init__(
        self,
        home: Path,
        *,
        memory_mb: int = DEFAULT_MEMORY_MB,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        images: dict[str, str] | None = None,
        cpus: float | None = None,
        pids_max: int = DEFAULT_PIDS_MAX,
        bwrap_path: str | None = None,
        use_cgroups: bool | None = None,
        use_seccomp: bool | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.cpus = default_cpus() if cpus is None else cpus
        self.pids_max = pids_max
        self.privileged = os.geteuid() == 0
        self.builds_dir = self.home / "builds"
        self.state_dir = self.home / "compiler"
        self._use_cgroups = use_cgroups
        self._use_seccomp = use_seccomp
        self._seccomp_path: Path | None = None
        self.seccomp_note: str | None = None
        self._bwrap_error = ""
        self.bwrap: str | None = bwrap_path
        if self.bwrap is None:
            from nimbus.machines.bwrap import find_bwrap

            try:
                self.bwrap = find_bwrap()
            except MachineStartError as exc:  # the node still starts; builds say why they cannot run
                self._bwrap_error = str(exc)
        self._hierarchy: cgroups.Hierarchy | None = None
        self._cgroup_note: str | None = None
        self._overlay: bool | None = None
        self._warm_lock = asyncio.Lock()
        self._warm_failed: set[str] = set()
        self._closed = False

    # ------------------------------------------------------------------ protocol

    def available(self) -> tuple[bool, str]:
        if self.bwrap is None:
            return False, self._bwrap_error or "bwrap not found"
        needed = [PRLIMIT, SETPRIV] if self.privileged else [PRLIMIT]
        missing = [tool for tool in needed if not os.access(tool, os.X_OK)]
        if missing:
            return False, f"{', '.join(missing)} missing (Debian's util-linux provides them)"
        return True, f"bwrap at {self.bwrap}"

    async def toolchain(self, tool: str) -> Toolchain:
        if tool == "go":
            go = await asyncio.to_thread(toolchains.find_go)
            return Toolchain("go", go.version)
        if tool == "rustc":
            rust = await asyncio.to_thread(toolchains.find_rust)
            return Toolchain("rustc", rust.version, rust.targets)
        raise BuildFailed(f"the sandbox builder has no toolchain {tool!r}")

    async def run(self, job: Job) -> JobResult:
        """Run ``job`` in a fresh sandbox; its directories and cgroup are gone when this returns."""
        self._check_ready()
        tool, binds = await self._resolve_tool(job.tool)
        lower = await self._warm_go_cache() if job.go_cache else None
        return await self._run(job, tool, binds, lower=lower)

    async def run_sealed(self, job: Job, *, binds: Sequence[tuple[str, str]] = (), artifact_max: int) -> JobResult:
        """Run ``job`` writing no host directory: for jobs whose code is a package's, not a toolchain's.

        Its source directory is bound read-only and there is no ``/build/out``; the job writes its
        artifact to descriptor ``ARTIFACT_FD``, one host file that ``RLIMIT_FSIZE`` bounds, so however
        much the job writes, the node's disk holds at most that (the rest goes to the size-capped ``/tmp``,
        which the memory limit counts). ``binds`` are extra read-only (host, sandbox) binds: a Unix
        socket bound this way can still be connected to.
        """
        self._check_ready()
        tool, tool_binds = await self._resolve_tool(job.tool)
        return await self._run(job, tool, [*tool_binds, *binds], sealed=True, artifact_max=artifact_max)

    def _check_ready(self) -> None:
        if self._closed:
            raise BuildFailed("the builder is closed")
        ok, why = self.available()
        if not ok:
            raise BuildFailed(f"the sandbox builder cannot run here: {why}")

    async def close(self) -> None:
        """Running jobs are ended by their callers' cancellation; this releases the cgroup bases."""
        self._closed = True
        if self._hierarchy is not None:
            self._hierarchy.close()

    # ------------------------------------------------------------------ running one job

    async def _run(
        self,
        job: Job,
        tool: str,
        binds: list[tuple[str, str]],
        *,
        lower: Path | None = None,
        writable: list[tuple[str, str]] = (),
        cpus: float | None = None,
        sealed: bool = False,
        artifact_max: int = ARTIFACT_MAX,
    ) -> JobResult:
        owner = (SANDBOX_UID, SANDBOX_GID) if self.privileged else None
        with Workspace(self.builds_dir, job, owner=owner) as ws:
            cgroup = self._make_cgroup(ws.id, self.cpus if cpus is None else cpus)
            try:
                enforced = cgroup.controllers if cgroup is not None else frozenset()
                program = self._seccomp_program()
                argv = self.command(job, tool, src=ws.src, out=ws.out, binds=binds, lower=lower,
                                    writable=list(writable), enforced=enforced,
                                    seccomp_fd=SECCOMP_FD if program is not None else None, sealed=sealed)
                redirect = f" {SECCOMP_FD}<{shlex.quote(str(program))}" if program is not None else ""
                if sealed and job.artifact is not None:
                    # The artifact's one host file, opened on the host and handed in as a descriptor.
                    redirect += f" {ARTIFACT_FD}>{shlex.quote(str(ws.out / job.artifact))}"
                if cgroup is not None or redirect:
                    # Join before bwrap exists, so it and everything it forks are inside (as the machines do),
                    # and open the seccomp program as bwrap's fd SECCOMP_FD.
                    join = cgroup.shell_join() if cgroup is not None else ""
                    argv = [SHELL, "-c", join + 'exec "$@"' + redirect, "nimbus-build", *argv]
                exit_ = await process.run(argv, env={"PATH": PATH}, timeout_s=job.timeout_s,
                                          kill=cgroup.kill if cgroup is not None else None)
                note = ""
                if cgroup is not None and cgroup.oom_kills():
                    note = f"the build hit its memory limit ({self.memory_mb} MiB) and the kernel killed a process"
                artifact = None
                if exit_.status == 0 and job.artifact is not None:
                    artifact = ws.read_artifact(job.artifact, artifact_max)
                    if artifact is None:
                        note = f"the build succeeded but left no regular file {job.artifact}"
            finally:
                if cgroup is not None:
                    await self._remove_cgroup(cgroup)
        return JobResult(status=exit_.status, output=clip(exit_.output), timed_out=exit_.timed_out,
                         artifact=artifact, duration_ms=exit_.duration_ms, note=note)

    def command(
        self,
        job: Job,
        tool: str,
        *,
        src: Path,
        out: Path,
        binds: list[tuple[str, str]] = (),
        lower: Path | None = None,
        writable: list[tuple[str, str]] = (),
        enforced: frozenset[str] = frozenset(),
        seccomp_fd: int | None = None,
        sealed: bool = False,
    ) -> list[str]:
        """The bwrap command line for ``job`` run as ``tool`` (its path inside the sandbox).

        ``seccomp_fd``: the descriptor bwrap will inherit holding the seccomp program, if any.
        ``sealed``: the source read-only and no output directory (see :meth:`run_sealed`).
        """
        if self.privileged:
            # As root: no user namespace (it could only map to host root); setpriv drops to 65534 below.
            args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                    "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                    "--cap-add", "CAP_SETPCAP"]
        else:
            args = ["--unshare-all", "--unshare-user", "--disable-userns",
                    "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
        args += ["--die-with-parent", "--new-session", "--hostname", HOSTNAME, "--clearenv", "--setenv", "PATH", PATH]
        for key, value in job.env:
            args += ["--setenv", key, value]
        etc = self._etc_files()
        mounts = [inside for _, inside in (*binds, *etc)] + ([SRC_DIR] if sealed else [SRC_DIR, OUT_DIR])
        for parent in parent_dirs(mounts):
            # bwrap makes missing parents 0700, which uid 65534 could not cross: make them 0755 first.
            args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", "/usr", "/usr"]
        for name in _MERGED_USR_DIRS:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        for host, inside in (*etc, *binds):
            args += ["--ro-bind", host, inside]
        args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
        args += ["--perms", "1777", "--size", str(self.memory_mb << 20), "--tmpfs", TMP_DIR]
        if lower is not None:
            # The trusted warm cache, read-only below a tmpfs layer that dies with the sandbox.
            args += ["--overlay-src", str(lower), "--tmp-overlay", recipes.GO_CACHE_DIR,
                     "--chmod", "1777", recipes.GO_CACHE_DIR]
        for host, inside in writable:
            args += ["--bind", host, inside]
        if sealed:
            args += ["--ro-bind", str(src), SRC_DIR, "--chdir", SRC_DIR]
        else:
            args += ["--bind", str(src), SRC_DIR, "--bind", str(out), OUT_DIR, "--chdir", SRC_DIR]
        args += ["--remount-ro", "/"]
        if seccomp_fd is not None:
            args += ["--seccomp", str(seccomp_fd)]
        cpu_s = math.ceil(job.timeout_s) + 1
        limits = [PRLIMIT, f"--cpu={cpu_s}:{cpu_s}", "--core=0:0", f"--fsize={FSIZE_MAX}:{FSIZE_MAX}"]
        if "memory" not in enforced:
            data = self.memory_mb << 20
            limits.append(f"--data={data}:{data}")
        limits.append("--")
        drop = []
        if self.privileged:
            drop = [SETPRIV, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--"]
        return [self.bwrap, *args, *limits, *drop, tool, *job.args]

    async def _resolve_tool(self, tool: str) -> tuple[str, list[tuple[str, str]]]:
        """The tool's path inside the sandbox, and the read-only binds it needs."""
        if tool == "python3":
            # The interpreter machines run (layers must match it), bound at its own path as they bind it.
            try:
                python, prefixes = layout.base_python()
            except MachineStartError as exc:
                raise BuildFailed(str(exc)) from None
            return str(python), [(str(prefix), str(prefix)) for prefix in prefixes]
        if tool == "go":
            go = await asyncio.to_thread(toolchains.find_go)
            if _under_usr(go.goroot):
                return str(go.binary), []
            return f"{GO_MOUNT}/bin/go", [(str(go.goroot), GO_MOUNT)]
        if tool == "rustc":
            rust = await asyncio.to_thread(toolchains.find_rust)
            if _under_usr(rust.sysroot):
                return str(rust.binary), []
            return f"{RUST_MOUNT}/bin/rustc", [(str(rust.sysroot), RUST_MOUNT)]
        if tool.startswith("/"):
            return tool, []
        raise BuildFailed(f"the sandbox builder does not know the tool {tool!r}")

    # ------------------------------------------------------------------ seccomp

    def _seccomp_program(self) -> Path | None:
        """The exported seccomp program (made once, in ``home/compiler``), or None when there is none."""
        if self._use_seccomp is False:
            self.seccomp_note = "disabled"
            return None
        if self._seccomp_path is not None and self._seccomp_path.is_file():
            return self._seccomp_path
        try:
            self._seccomp_path = seccomp.program_file(private_dir(self.state_dir))
            self.seccomp_note = "applied"
        except (seccomp.SeccompUnavailable, OSError) as exc:
            if self._use_seccomp:
                raise BuildFailed(f"seccomp required for builds but unavailable: {exc}") from None
            if self.seccomp_note is None:
                log.warning("no seccomp filter for builds: %s", exc)
            self.seccomp_note = f"unavailable ({exc})"
            self._seccomp_path = None
        return self._seccomp_path

    # ------------------------------------------------------------------ cgroups

    def _make_cgroup(self, name: str, cpus: float) -> cgroups.Cgroup | None:
        if self._use_cgroups is False:
            return None
        if self._cgroup_note is None:
            try:
                self._hierarchy = cgroups.Hierarchy.detect()
                self._cgroup_note = self._hierarchy.describe()
            except cgroups.CgroupUnavailable as exc:
                if self._use_cgroups:
                    raise BuildFailed(f"cgroups required for builds but unavailable: {exc}") from None
                self._cgroup_note = f"unavailable ({exc})"
                log.warning("no cgroup limits for builds, using rlimits: %s", exc)
        if self._hierarchy is None:
            return None
        limits = cgroups.Limits(memory_bytes=self.memory_mb << 20, pids_max=self.pids_max + BWRAP_PROCS, cpus=cpus)
        try:
            return self._hierarchy.create(f"build-{name}", limits)
        except OSError as exc:
            raise BuildFailed(f"cannot create the build's cgroup: {exc}") from exc

    async def _remove_cgroup(self, cgroup: cgroups.Cgroup) -> None:
        for _ in range(CGROUP_REMOVE_TRIES):
            if cgroup.remove():
                return
            cgroup.kill()
            await asyncio.sleep(CGROUP_REMOVE_PAUSE_S)
        log.warning("build cgroup %s still busy; left behind", cgroup.name)

    @property
    def enforcement(self) -> dict[str, str]:
        """How each limit is enforced for builds on this host (for ``nimbus doctor``)."""
        have = self._hierarchy.controllers if self._hierarchy is not None else frozenset()
        return {
            "memory": "cgroup memory" if "memory" in have else "RLIMIT_DATA per process",
            "pids": "cgroup pids" if "pids" in have else "none",
            "cpu": f"cgroup quota of {self.cpus:g} CPUs" if "cpu" in have else "none",
            "cpu_time": "RLIMIT_CPU per process",
            "syscalls": "seccomp filter" if self._seccomp_path is not None else (self.seccomp_note or "not yet built"),
            "wall_clock": "cgroup kill, then SIGKILL of bwrap" if have
            else "SIGKILL of bwrap (the sandbox's pid namespace dies with it)",
        }

    # ------------------------------------------------------------------ the warm Go cache

    def overlay_supported(self) -> bool:
        if self._overlay is None:
            self._overlay = self.bwrap is not None and bwrap_supports_overlay(self.bwrap)
        return self._overlay

    async def _warm_go_cache(self) -> Path | None:
        """The trusted warm Go build cache for the installed Go, made on first use; None when there can be none.

        Made by a job that compiles std only, into a staging directory renamed into place when complete,
        so a half-filled cache is never used. It lives in ``home/compiler`` (0700): no build, machine or
        other host user can reach it, and builds see it only as an overlay's read-only lower layer.
        """
        if not await asyncio.to_thread(self.overlay_supported):
            return None
        go = await asyncio.to_thread(toolchains.find_go)
        warm = recipes.go_warm(WARM_TIMEOUT_S)
        key = hashlib.sha256(f"{go.version}\0{go.goroot}\0{warm.fingerprint()}".encode()).hexdigest()[:16]
        final = self.state_dir / "gocache" / key
        if (final / WARM_READY).is_file():
            return final
        async with self._warm_lock:
            if (final / WARM_READY).is_file():
                return final
            if key in self._warm_failed:
                return None
            private_dir(final.parent)
            staging = final.parent / f".{key}.{uuid.uuid4().hex[:8]}"
            staging.mkdir(mode=0o700)
            try:
                if self.privileged:
                    os.chown(staging, SANDBOX_UID, SANDBOX_GID)
                tool, binds = await self._resolve_tool("go")
                # Trusted and once per toolchain: it may use every core (~17 s here instead of ~32 s on one).
                result = await self._run(warm, tool, binds, writable=[(str(staging), recipes.GO_CACHE_DIR)],
                                         cpus=float(os.cpu_count() or 1))
                if result.status != 0:
                    self._warm_failed.add(key)
                    why = "timed out" if result.timed_out else f"exit status {result.status}"
                    log.warning("cannot warm the Go build cache (%s); Go builds use an empty cache: %s",
                                why, result.output[-2000:])
                    return None
                (staging / WARM_READY).write_text(f"{go.version}\n")
                remove_tree(final)  # a leftover without the marker
                os.rename(staging, final)
                log.info("warmed the Go build cache for %s in %.1f s", go.version, result.duration_ms / 1000)
                return final
            finally:
                with contextlib.suppress(OSError):
                    remove_tree(staging)

    # ------------------------------------------------------------------ files

    def _etc_files(self) -> list[tuple[str, str]]:
        """(host path, sandbox path) of the ``/etc`` a build sees: generated identity files, the loader cache."""
        etc = private_dir(self.state_dir) / "etc"
        etc.mkdir(exist_ok=True)
        os.chmod(etc, 0o755)
        files: list[tuple[str, str]] = []
        for host in (Path("/etc/ld.so.cache"), Path("/etc/alternatives")):
            if host.exists():
                files.append((str(host), str(host)))
        for name, text in _ETC_FILES.items():
            path = etc / name
            if not path.is_file() or path.read_text() != text:
                tmp = etc / f".{name}.{os.getpid()}"
                tmp.write_text(text)
                tmp.chmod(0o644)
                os.replace(tmp, path)
            files.append((str(path), f"/etc/{name}"))
        return files


def _under_usr(path: Path) -> bool:
    return path.is_relative_to("/usr")


__all__ = ["ARTIFACT_FD", "SandboxBuilder", "bwrap_supports_overlay", "default_cpus"]
