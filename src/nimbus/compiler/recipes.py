"""What a build of each runtime is: the files written, the command and environment. Shared by every builder.

Paths are the builder's inside view: the source directory is ``/build/src`` (the working directory),
the artifact goes to ``/build/out``, scratch space is ``/tmp``. The sandbox and docker backends set
those up their own way and run exactly these jobs, so a build does not depend on where it ran.

* **go** — a module ``nimbus.function`` (``go 1.19``) holding the user's ``package main`` file and the
  generated ``nimbus_main.go`` from :mod:`nimbus.runtimes`; ``CGO_ENABLED=0 go build -trimpath
  -ldflags="-s -w"`` into a static ``bootstrap``. ``GOPROXY=off``: no module is ever downloaded, so an
  import of a third-party module fails with Go's own "module lookup disabled by GOPROXY=off".
  ``-mod=mod`` (rather than readonly) because that is the mode whose error names the missing module's
  lookup instead of suggesting ``go get``.
* **rust** — ``rustc`` itself (no Cargo: no ``build.rs``, no registry), edition 2021, release settings
  (``-C opt-level=3``, symbols stripped), std only, into ``bootstrap``.
* **rust → wasm** — the same with ``--target wasm32-wasip1`` into ``module.wasm``; the compiler then
  validates and precompiles it in-process like an uploaded module.
"""

from __future__ import annotations

from pathlib import Path

from nimbus.compiler.base import OUT_DIR, TMP_DIR, BuildFailed, Job

GO_MODULE = "nimbus.function"
GO_MOD = f"module {GO_MODULE}\n\ngo 1.19\n"
GO_USER_FILE = "function.go"
GO_MAIN_FILE = "nimbus_main.go"
GO_CACHE_DIR = f"{TMP_DIR}/gocache"
GO_ENV = {
    "CGO_ENABLED": "0",
    "GOPROXY": "off",
    "GOFLAGS": "-mod=mod",
    "GOTOOLCHAIN": "local",  # a newer go must not fetch another toolchain named by go.mod
    "GO111MODULE": "on",
    "GOWORK": "off",
    "GOENV": "off",  # no per-user go/env file: the job's environment is the whole configuration
    "GOTELEMETRY": "off",
    "GOPATH": f"{TMP_DIR}/go",
    "GOCACHE": GO_CACHE_DIR,
}
GO_BUILD_ARGS = ("build", "-trimpath", "-ldflags=-s -w", "-o", f"{OUT_DIR}/bootstrap", ".")
# Compiles every std package into GOCACHE with the flags user builds use, so their std is a cache hit.
GO_WARM_ARGS = ("build", "-trimpath", "std")

RUST_USER_FILE = "main.rs"
RUST_FLAGS = (
    "--edition", "2021",
    "--crate-type", "bin",
    "--crate-name", "function",
    "-C", "opt-level=3",
    "-C", "debuginfo=0",
    "-C", "strip=symbols",
)
WASM_TARGET = "wasm32-wasip1"
NATIVE_ARTIFACT = "bootstrap"
WASM_ARTIFACT = "module.wasm"

BASE_ENV = {"HOME": TMP_DIR, "TMPDIR": TMP_DIR, "LANG": "C.UTF-8"}


def _env(extra: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**BASE_ENV, **extra}.items()))


def go_main_path() -> Path:
    """Where the generated Go main ships: beside :mod:`nimbus.runtimes`, in the installed package."""
    import nimbus.runtimes

    return Path(nimbus.runtimes.__file__).resolve().parent / GO_MAIN_FILE


def go_main() -> bytes:
    """The generated ``nimbus_main.go`` (``BuildFailed`` when this installation lacks it)."""
    path = go_main_path()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BuildFailed(f"the Go runtime's generated main is missing from this installation ({path}: "
                          f"{exc.strerror})") from None


def go(source: bytes, timeout_s: float, *, main: bytes | None = None) -> Job:
    """The Go build of one ``package main`` file that defines ``Handle``."""
    files = (("go.mod", GO_MOD.encode()), (GO_USER_FILE, source), (GO_MAIN_FILE, go_main() if main is None else main))
    return Job(runtime="go", tool="go", args=GO_BUILD_ARGS, env=_env(GO_ENV), files=files,
               artifact=NATIVE_ARTIFACT, timeout_s=timeout_s, go_cache=True, user_file=GO_USER_FILE)


def go_warm(timeout_s: float) -> Job:
    """The trusted job that fills the warm Go cache: std only, no user code, same environment as builds."""
    return Job(runtime="go", tool="go", args=GO_WARM_ARGS, env=_env(GO_ENV), files=(("go.mod", GO_MOD.encode()),),
               timeout_s=timeout_s)


def rust(source: bytes, timeout_s: float, *, target: str | None = None) -> Job:
    """The rustc build of one program with ``fn main()``; ``target`` ``wasm32-wasip1`` makes a WASI module."""
    artifact = WASM_ARTIFACT if target == WASM_TARGET else NATIVE_ARTIFACT
    args = [*RUST_FLAGS]
    if target is not None:
        args += ["--target", target]
    args += ["-o", f"{OUT_DIR}/{artifact}", RUST_USER_FILE]
    runtime = "wasm" if target == WASM_TARGET else "rust"
    return Job(runtime=runtime, tool="rustc", args=tuple(args), env=_env({}), files=((RUST_USER_FILE, source),),
               artifact=artifact, timeout_s=timeout_s, user_file=RUST_USER_FILE)


def wasm_kind(source: bytes) -> str:
    """What ``wasm`` code is: ``module`` (binary), ``wat`` (text format) or ``rust`` (source to compile)."""
    if source.startswith(b"\0asm"):
        return "module"
    head = source.lstrip()
    if head.startswith((b"(module", b";;", b"(;")):
        return "wat"
    return "rust"


__all__ = [
    "GO_MOD", "GO_ENV", "GO_BUILD_ARGS", "GO_MAIN_FILE", "RUST_FLAGS", "WASM_TARGET",
    "go", "go_main", "go_main_path", "go_warm", "rust", "wasm_kind",
]
