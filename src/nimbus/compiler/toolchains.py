"""The host's toolchains, as the sandbox builder runs them: where they are and which version they are.

Blocking (they run ``go version``/``rustc --version``): call them in a worker thread from async code.
Versions are remembered per binary (path, inode, size, mtime) so an upgrade in place is noticed, and a
cached artifact is never served for a toolchain that is no longer the one installed.

Rust is the rustup-managed one as a rule: ``rustc`` on PATH (or ``~/.cargo/bin``) is a proxy that picks
a toolchain, so it is asked once for its sysroot (``rustc --print sysroot``) and from then on the real
compiler, ``<sysroot>/bin/rustc``, is what runs — the sandbox binds that sysroot read-only and never
sees rustup's files or ``$HOME``.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from nimbus.compiler.base import BuildFailed

PROBE_TIMEOUT_S = 30.0  # a cold rustup proxy may take a few seconds
HOST_PATH = "/usr/local/bin:/usr/bin:/bin"
GO_CANDIDATES = ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
GO_INSTALL_HINT = "install Go (apt-get install golang-go) or put go on the node's PATH"
RUST_INSTALL_HINT = "install Rust with rustup (https://rustup.rs) or put rustc on the node's PATH"
WASM_TARGET_HINT = "rustup target add wasm32-wasip1"


@dataclass(frozen=True, slots=True)
class HostGo:
    goroot: Path  # resolved; the binary is goroot/bin/go
    version: str  # "go1.19.8 linux/amd64"

    @property
    def binary(self) -> Path:
        return self.goroot / "bin" / "go"


@dataclass(frozen=True, slots=True)
class HostRust:
    sysroot: Path  # resolved; the real compiler is sysroot/bin/rustc
    version: str  # "rustc 1.95.0 (59807616e 2026-04-14)"
    targets: frozenset[str]  # targets whose std is in sysroot/lib/rustlib

    @property
    def binary(self) -> Path:
        return self.sysroot / "bin" / "rustc"


_lock = threading.Lock()
_versions: dict[tuple, str] = {}
_sysroots: dict[str, Path] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _run(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                              timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return -1, str(exc)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace").strip()


def _version(binary: Path, argv_tail: list[str], env: dict[str, str]) -> str:
    """First line of ``binary argv_tail``, remembered per binary file."""
    key = _stat_key(binary)
    with _lock:
        if key in _versions:
            return _versions[key]
    code, out = _run([str(binary), *argv_tail], env)
    if code != 0 or not out:
        raise BuildFailed(f"{binary} does not run ({out.splitlines()[0] if out else f'exit status {code}'})")
    line = out.splitlines()[0].strip()
    with _lock:
        _versions[key] = line
    return line


def find_go() -> HostGo:
    """The host's Go: ``go`` on PATH (or a usual install place), its GOROOT and version. ``BuildFailed`` if none."""
    found = shutil.which("go") or next((c for c in GO_CANDIDATES if os.access(c, os.X_OK)), None)
    if found is None:
        raise BuildFailed(f"the go toolchain is not installed on this node: {GO_INSTALL_HINT}")
    real = Path(os.path.realpath(found))
    goroot = real.parent.parent
    if real.parent.name != "bin" or not (goroot / "src" / "runtime").is_dir():
        raise BuildFailed(f"{found} resolves to {real}, which is not inside a GOROOT (…/bin/go beside src/)")
    env = {"PATH": HOST_PATH, "GOENV": "off", "GOTOOLCHAIN": "local", "HOME": "/nonexistent"}
    line = _version(real, ["version"], env)
    return HostGo(goroot=goroot, version=line.removeprefix("go version ").strip())


def _rustc_candidates() -> list[str]:
    out = []
    on_path = shutil.which("rustc")
    if on_path:
        out.append(on_path)
    cargo_home = os.environ.get("CARGO_HOME") or os.path.join(os.path.expanduser("~"), ".cargo")
    for candidate in (os.path.join(cargo_home, "bin", "rustc"), "/usr/bin/rustc", "/usr/local/bin/rustc"):
        if candidate not in out and os.access(candidate, os.X_OK):
            out.append(candidate)
    return out


def _sysroot(rustc: str) -> Path:
    """Ask ``rustc`` (maybe the rustup proxy) for its sysroot, once per process and binary."""
    with _lock:
        if rustc in _sysroots:
            return _sysroots[rustc]
    # The proxy needs to find rustup's home: pass the variables it reads and nothing else.
    env = {"PATH": os.environ.get("PATH", HOST_PATH)}
    for name in ("HOME", "RUSTUP_HOME", "CARGO_HOME", "RUSTUP_TOOLCHAIN"):
        if name in os.environ:
            env[name] = os.environ[name]
    code, out = _run([rustc, "--print", "sysroot"], env)
    if code != 0 or not out:
        raise BuildFailed(f"{rustc} --print sysroot fails: {out.splitlines()[-1] if out else f'exit status {code}'}")
    sysroot = Path(os.path.realpath(out.splitlines()[-1].strip()))
    with _lock:
        _sysroots[rustc] = sysroot
    return sysroot


def find_rust() -> HostRust:
    """The host's Rust toolchain: its sysroot, real compiler version and installed targets. ``BuildFailed`` if none."""
    candidates = _rustc_candidates()
    if not candidates:
        raise BuildFailed(f"the Rust toolchain is not installed on this node: {RUST_INSTALL_HINT}")
    sysroot = _sysroot(candidates[0])
    binary = sysroot / "bin" / "rustc"
    if not os.access(binary, os.X_OK):
        raise BuildFailed(f"the sysroot {sysroot} has no bin/rustc: {RUST_INSTALL_HINT}")
    version = _version(binary, ["--version"], {"PATH": HOST_PATH})
    rustlib = sysroot / "lib" / "rustlib"
    try:
        targets = frozenset(d.name for d in rustlib.iterdir() if (d / "lib").is_dir())
    except OSError:
        targets = frozenset()
    return HostRust(sysroot=sysroot, version=version, targets=targets)


def wasmtime_version() -> str:
    """``wasmtime <version>`` of the installed wasmtime package (``BuildFailed`` if it is missing)."""
    try:
        return f"wasmtime {importlib.metadata.version('wasmtime')}"
    except importlib.metadata.PackageNotFoundError:
        raise BuildFailed("the wasmtime Python package is not installed on this node (pip install wasmtime)") from None


__all__ = ["HostGo", "HostRust", "find_go", "find_rust", "wasmtime_version"]
