"""Build a Go handler or a Rust program with the host's toolchain, as the compiler's recipes would.

The agent and machine tests need real binaries without going through the compiler (it has its own
tests); a missing toolchain skips the calling test with the reason.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BUILD_TIMEOUT_S = 600
GO_MAIN = Path(__file__).resolve().parents[1] / "src" / "nimbus" / "runtimes" / "nimbus_main.go"


def _run(argv: list[str], cwd: Path, env: dict) -> None:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}"


def go_binary(root: Path, handler: str) -> bytes:
    """A static binary of ``handler`` (package main with Handle) plus the generated main."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (apt-get install golang-go): go runtime untested")
    module = root / "fn"
    module.mkdir()
    (module / "go.mod").write_text("module example.com/fn\n\ngo 1.19\n")
    (module / "handler.go").write_text(handler)
    shutil.copy(GO_MAIN, module / "nimbus_main.go")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), "GOCACHE": str(root / "cache"),
           "GOPATH": str(root / "gopath"), "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", "GOPROXY": "off"}
    _run([go, "build", "-trimpath", "-o", str(root / "bootstrap"), "."], module, env)
    return (root / "bootstrap").read_bytes()


def rust_binary(root: Path, program: str) -> bytes:
    """``program`` (a main.rs) built with ``rustc -O``."""
    rustc = shutil.which("rustc")
    if rustc is None:
        pytest.skip("rustc is not installed (apt-get install rustc, or rustup): rust runtime untested")
    (root / "main.rs").write_text(program)
    _run([rustc, "-O", "--edition", "2021", "-o", "bootstrap", "main.rs"], root, dict(os.environ))
    return (root / "bootstrap").read_bytes()
