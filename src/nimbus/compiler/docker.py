"""The ``docker`` builder: the same build jobs in a throwaway builder container (Docker or Podman).

Each job is one ``docker run --rm`` of the runtime's image (``golang:<ver>``, ``rust:<ver>``; names
configurable) with no network, the job's source and output directories bind-mounted at ``/build/src``
and ``/build/out``, a read-only root, a private ``/tmp`` tmpfs, uid/gid 65534, no capabilities,
``no-new-privileges``, and the memory (no swap), pids, CPU and per-process CPU-time limits of the
sandbox builder. The container is named, so at the wall-clock limit the builder kills *it* (killing the
CLI alone would leave the container running).

Usable only when a ``docker`` or ``podman`` CLI is installed and an engine socket answers
(:func:`find_engine` connects to each candidate). The toolchain version is asked of the image itself,
once per image and builder. Unlike the sandbox builder there is no warm Go cache: each Go build starts
from an empty cache in its own ``/tmp``, which is slower but equally unpoisonable.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nimbus.compiler import process
from nimbus.compiler.base import OUT_DIR, SRC_DIR, TMP_DIR, BuildFailed, Job, JobResult, Toolchain, clip
from nimbus.compiler.sandbox import DEFAULT_MEMORY_MB, DEFAULT_PIDS_MAX, DEFAULT_TIMEOUT_S, FSIZE_MAX, default_cpus
from nimbus.compiler.workspace import Workspace

DEFAULT_IMAGES = {"go": "golang:1.19", "rust": "rust:1.95"}
ENGINE_SOCKETS = ("/var/run/docker.sock", "/run/podman/podman.sock")
CONNECT_TIMEOUT_S = 1.0
QUERY_TIMEOUT_S = 120.0  # a toolchain query may pull the image first
KILL_TIMEOUT_S = 30.0
CONTAINER_USER = "65534:65534"
TOOL_IMAGES = {"go": "go", "rustc": "rust"}  # which image runs which tool

Runner = Callable[..., Awaitable[process.Exit]]  # (argv, *, env, timeout_s) -> Exit


@dataclass(frozen=True, slots=True)
class Engine:
    """An engine endpoint: ``address`` as DOCKER_HOST spells it; ``reachable`` when it accepted a connection."""

    address: str
    reachable: bool
    detail: str


def engine_candidates(env: Mapping[str, str] | None = None) -> list[str]:
    """Engine addresses to try, in order: ``$DOCKER_HOST``, Docker's and Podman's root sockets, Podman's user socket."""
    env = os.environ if env is None else env
    out: list[str] = []
    if env.get("DOCKER_HOST"):
        out.append(env["DOCKER_HOST"])
    out += [f"unix://{path}" for path in ENGINE_SOCKETS]
    if env.get("XDG_RUNTIME_DIR"):
        out.append(f"unix://{env['XDG_RUNTIME_DIR'].rstrip('/')}/podman/podman.sock")
    return out


def probe_engine(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Engine:
    """Connect to ``address`` (``unix:///path`` or ``tcp://host:port``) and say whether something answered."""
    try:
        if address.startswith("unix://"):
            path = address[len("unix://"):]
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                sock.connect(path)
        elif address.startswith("tcp://"):
            hostport = address[len("tcp://"):].rstrip("/")
            host, _, port = hostport.rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        else:
            return Engine(address, False, f"{address}: not a unix:// or tcp:// address")
    except (OSError, ValueError) as exc:
        return Engine(address, False, f"{address}: {getattr(exc, 'strerror', None) or exc}")
    return Engine(address, True, f"{address} accepts connections")


def find_engine(
    env: Mapping[str, str] | None = None, candidates: list[str] | None = None
) -> tuple[Engine | None, list[Engine]]:
    """The first engine that accepts a connection (or None) and every probe made, for reporting."""
    probes = []
    for address in engine_candidates(env) if candidates is None else candidates:
        engine = probe_engine(address)
        probes.append(engine)
        if engine.reachable:
            return engine, probes
    return None, probes


def find_cli() -> str | None:
    """The container CLI: ``docker``, else ``podman``."""
    return shutil.which("docker") or shutil.which("podman")


class DockerBuilder:
    """Runs build jobs in builder containers; see the module docstring.

    ``runner`` runs one CLI command (``process.run`` by default; tests pass a recorder). ``cli`` and
    ``engine`` default to what is found on this host.
    """

    name = "docker"

    def __init__(
        self,
        home: Path,
        *,
        memory_mb: int = DEFAULT_MEMORY_MB,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        images: dict[str, str] | None = None,
        cpus: float | None = None,
        pids_max: int = DEFAULT_PIDS_MAX,
        cli: str | None = None,
        engine: str | None = None,
        runner: Runner | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.images = {**DEFAULT_IMAGES, **{k: v for k, v in (images or {}).items() if v}}
        self.cpus = default_cpus() if cpus is None else cpus
        self.pids_max = pids_max
        self.cli = cli if cli is not None else find_cli()
        self._engine = engine
        self._runner = runner or process.run
        self._toolchains: dict[tuple[str, str], Toolchain] = {}
        self.builds_dir = self.home / "builds"

    # ------------------------------------------------------------------ protocol

    def engine(self) -> tuple[Engine | None, list[Engine]]:
        """The engine the CLI will talk to (the configured one, else the first candidate that answers), probed now."""
        return find_engine(candidates=[self._engine] if self._engine is not None else None)

    def available(self) -> tuple[bool, str]:
        if self.cli is None:
            return False, "neither the docker nor the podman CLI is installed"
        found, probes = self.engine()
        if found is None:
            tried = "; ".join(p.detail for p in probes) or "no candidate socket"
            return False, f"{self.cli} is installed but no engine socket answers ({tried})"
        return True, f"{self.cli} with the engine at {found.address}"

    async def toolchain(self, tool: str) -> Toolchain:
        image = self._image(tool)
        known = self._toolchains.get((tool, image))
        if known is not None:
            return known
        engine = await self._require_engine()
        if tool == "go":
            script = "go version"
        else:
            script = 'rustc --version && ls "$(rustc --print sysroot)/lib/rustlib"'
        argv = [self.cli, "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", script]
        exit_ = await self._runner(argv, env=self._cli_env(engine), timeout_s=QUERY_TIMEOUT_S)
        lines = exit_.output.decode(errors="replace").strip().splitlines()
        if exit_.status != 0 or not lines:
            raise BuildFailed(f"cannot ask the builder image {image} for its {tool} version", exit_.output)
        if tool == "go":
            found = Toolchain("go", lines[0].removeprefix("go version ").strip())
        else:
            found = Toolchain("rustc", lines[0].strip(), frozenset(line.strip() for line in lines[1:] if line.strip()))
        self._toolchains[(tool, image)] = found
        return found

    async def run(self, job: Job) -> JobResult:
        engine = await self._require_engine()
        env = self._cli_env(engine)
        owner = (65534, 65534) if os.geteuid() == 0 else None
        with Workspace(self.builds_dir, job, owner=owner) as ws:
            name = f"nimbus-build-{ws.id}"
            argv = self.command(job, name=name, src=ws.src, out=ws.out)
            try:
                exit_ = await self._runner(argv, env=env, timeout_s=job.timeout_s)
            except BaseException:
                await asyncio.shield(self._kill(name, env))
                raise
            if exit_.timed_out:
                await self._kill(name, env)
            artifact, note = None, ""
            if exit_.status == 0 and job.artifact is not None:
                artifact = ws.read_artifact(job.artifact)
                if artifact is None:
                    note = f"the build succeeded but left no regular file {job.artifact}"
            if exit_.status == 137 and not exit_.timed_out:
                note = f"the build was killed (SIGKILL): most likely its memory limit ({self.memory_mb} MiB)"
        return JobResult(status=exit_.status, output=clip(exit_.output), timed_out=exit_.timed_out,
                         artifact=artifact, duration_ms=exit_.duration_ms, note=note)

    async def close(self) -> None:
        """Nothing is held between jobs; running ones are killed by their callers' cancellation."""

    # ------------------------------------------------------------------ commands

    def command(self, job: Job, *, name: str, src: Path, out: Path) -> list[str]:
        """The exact ``docker run`` of ``job`` in a container called ``name``."""
        image = self._image(job.tool)
        memory = f"{self.memory_mb}m"
        cpu_s = math.ceil(job.timeout_s) + 1
        argv = [
            self.cli, "run", "--rm", "--name", name,
            "--network", "none",
            "--user", CONTAINER_USER,
            "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--read-only",
            "--tmpfs", f"{TMP_DIR}:rw,exec,nosuid,nodev,size={memory},mode=1777",
            "--memory", memory, "--memory-swap", memory,
            "--pids-limit", str(self.pids_max),
            "--cpus", f"{self.cpus:g}",
            "--ulimit", f"cpu={cpu_s}:{cpu_s}",
            "--ulimit", f"fsize={FSIZE_MAX}:{FSIZE_MAX}",
            "--ulimit", "core=0:0",
            "--volume", f"{src}:{SRC_DIR}:rw",
            "--volume", f"{out}:{OUT_DIR}:rw",
            "--workdir", SRC_DIR,
        ]
        for key, value in job.env:
            argv += ["--env", f"{key}={value}"]
        argv += ["--entrypoint", job.tool, image, *job.args]
        return argv

    def _image(self, tool: str) -> str:
        try:
            return self.images[TOOL_IMAGES[tool]]
        except KeyError:
            raise BuildFailed(f"the docker builder has no image for the tool {tool!r}") from None

    async def _require_engine(self) -> Engine:
        if self.cli is None:
            raise BuildFailed("the docker builder needs the docker or podman CLI, and neither is installed")
        engine, probes = await asyncio.to_thread(self.engine)
        if engine is None:
            tried = "; ".join(p.detail for p in probes)
            raise BuildFailed(f"the docker builder cannot reach a Docker or Podman engine ({tried}); "
                              "set DOCKER_HOST, or use NIMBUS_BUILDER=sandbox")
        return engine

    def _cli_env(self, engine: Engine) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
        if "HOME" in os.environ:
            env["HOME"] = os.environ["HOME"]  # the CLI's own config (~/.docker)
        env["DOCKER_HOST" if Path(self.cli).name == "docker" else "CONTAINER_HOST"] = engine.address
        return env

    async def _kill(self, name: str, env: dict[str, str]) -> None:
        """Kill the container (``--rm`` then removes it); it may already be gone."""
        try:
            await self._runner([self.cli, "kill", name], env=env, timeout_s=KILL_TIMEOUT_S)
        except OSError:
            pass


__all__ = ["DEFAULT_IMAGES", "DockerBuilder", "Engine", "engine_candidates", "find_cli", "find_engine", "probe_engine"]
