"""The compiler's values and its one seam: a ``Builder`` runs a ``Job`` (a toolchain command) in isolation.

A job is what the recipes (:mod:`nimbus.compiler.recipes`) produce: the files to write in the source
directory, the command to run there and the artifact it leaves in the output directory. Both builder
backends (``sandbox``, ``docker``) run the same job, so a Go or Rust build is the same build wherever
it runs; only how the isolation is made differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from nimbus.errors import InvalidRequest, redact

OUTPUT_MAX = 16 << 10  # compiler output kept in errors and logs: its head and its tail
SRC_DIR = "/build/src"  # where a job's source directory is, inside the builder (its working directory)
OUT_DIR = "/build/out"  # where the artifact is written, inside the builder
TMP_DIR = "/tmp"  # private scratch space, the only other writable path


def clip(text: str | bytes, limit: int = OUTPUT_MAX) -> str:
    """``text`` cut to about ``limit`` bytes, keeping its head and tail (the first error and the summary)."""
    data = text.encode(errors="replace") if isinstance(text, str) else bytes(text)
    if len(data) <= limit:
        return data.decode(errors="replace")
    half = limit // 2
    cut = len(data) - 2 * half
    return (
        data[:half].decode(errors="replace")
        + f"\n... [{cut} bytes of output cut] ...\n"
        + data[-half:].decode(errors="replace")
    )


class BuildFailed(InvalidRequest):
    """The build did not produce an artifact: a compile error, an invalid module, a missing toolchain or a timeout.

    ``str(exc)`` is the message followed by the toolchain's output (the API's 422 ``detail``);
    ``output`` is that output alone, clipped to its head and tail; ``timed_out`` tells a build killed at
    its wall-clock limit. Both are shown to the tenant, so both are :func:`redact`-ed.
    """

    def __init__(self, message: str, output: str | bytes = "", *, timed_out: bool = False) -> None:
        self.message = message = redact(message)
        self.output = clip(redact(output if isinstance(output, str) else output.decode(errors="replace")))
        self.timed_out = timed_out
        text = self.output.strip()
        super().__init__(f"{message}:\n{text}" if text else message)


@dataclass(frozen=True, slots=True)
class Build:
    """A built artifact and how it was made. ``cached`` is True when no build ran for this request."""

    key: str
    runtime: str
    toolchain: str
    artifact: bytes = field(repr=False)
    artifact_sha256: str
    log: str
    duration_ms: float
    cached: bool
    source_sha256: str = ""  # what the store records beside the build (its put_build needs it)
    kind: str = "artifact"  # or "layer": a function's resolved dependencies (nimbus.compiler.layers)


@dataclass(frozen=True, slots=True)
class Toolchain:
    """A toolchain a builder can run: ``version`` is its own first line (``go1.19.8 linux/amd64``…)."""

    tool: str  # "go" or "rustc"
    version: str
    targets: frozenset[str] = frozenset()  # rustc: the targets whose std is installed


@dataclass(frozen=True, slots=True)
class Job:
    """One toolchain run: write ``files`` in the source dir, run ``tool`` with ``args`` there, collect ``artifact``.

    ``tool`` is a logical name (``go``, ``rustc``) that each backend maps to its binary, or an absolute
    path run as it is. ``env`` is added to the builder's base environment (PATH is the backend's).
    ``go_cache`` asks for the trusted warm Go build cache under a throwaway layer where the backend has one.
    """

    runtime: str
    tool: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    files: tuple[tuple[str, bytes], ...] = ()
    artifact: str | None = None  # a file name in OUT_DIR; None for jobs that produce nothing
    timeout_s: float = 300.0
    go_cache: bool = False
    user_file: str | None = None  # which of ``files`` is the user's source (left out of the recipe's fingerprint)

    def fingerprint(self) -> str:
        """sha256 of the recipe itself (tool, arguments, environment, the files that are not the user's).

        Part of the build cache key: a new generated main or new flags are a new build of the same source.
        """
        h = hashlib.sha256()
        for part in (self.runtime, self.tool, *self.args, *(f"{k}={v}" for k, v in self.env)):
            h.update(part.encode() + b"\0")
        for name, data in self.files:
            h.update(name.encode() + b"\0")
            h.update(b"<user source>" if name == self.user_file else hashlib.sha256(data).digest())
        h.update(str(self.artifact).encode() + b"\0" + str(self.go_cache).encode())
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a job ended. ``status`` is the tool's exit status (None when the builder killed it)."""

    status: int | None
    output: str  # stdout and stderr interleaved, clipped
    timed_out: bool = False
    artifact: bytes | None = field(default=None, repr=False)
    duration_ms: float = 0.0
    note: str = ""  # what the builder knows beyond the status (memory limit hit, no artifact…)


@runtime_checkable
class Builder(Protocol):
    """Runs build jobs in isolation: no network, only the job's directories writable, CPU/memory/time limits."""

    name: str

    def available(self) -> tuple[bool, str]:
        """Whether this builder can run jobs on this host, and a sentence saying why (not)."""

    async def toolchain(self, tool: str) -> Toolchain:
        """The toolchain ``tool`` names as this builder would run it; ``BuildFailed`` saying how to install it."""

    async def run(self, job: Job) -> JobResult:
        """Run one job under its limits; kills everything it started when cancelled or past ``job.timeout_s``."""

    async def close(self) -> None:
        """Kill jobs still running and release what the builder holds."""


__all__ = ["Build", "BuildFailed", "Builder", "Job", "JobResult", "OUTPUT_MAX", "Toolchain", "clip"]
