"""What this host can build, for ``nimbus doctor``: each compiled runtime's toolchain and each builder.

:func:`report` returns (every entry has ``ok`` and a one-line ``detail``)::

    {
      "runtimes": {
        "go":   {"ok", "detail", "version": "go1.19.8 linux/amd64" | None, "path": ".../bin/go" | None},
        "rust": {"ok", "detail", "version": "rustc 1.95.0 (...)" | None, "path": "<sysroot>/bin/rustc" | None,
                 "sysroot": str | None, "targets": [str, ...]},
        "wasm": {"ok", "detail", "version": "wasmtime 50.0.1" | None,
                 "wasm32_wasip1": bool},   # Rust source → wasm possible (modules and WAT need only wasmtime)
      },
      "builders": {
        "sandbox": {"ok", "detail", "bwrap": path | None, "go_cache": "warm overlay" | "empty per build"},
        "docker":  {"ok", "detail", "cli": path | None, "engine": address | None, "images": {"go": ..., "rust": ...}},
      },
    }

Blocking (it runs ``go version``, ``rustc --version``, ``bwrap --help`` and connects to engine sockets).
The toolchains are the host's, i.e. the sandbox builder's; the docker builder's come from its images.
"""

from __future__ import annotations

import os
from typing import Any

from nimbus.compiler import docker, recipes, sandbox, toolchains
from nimbus.compiler.base import BuildFailed


def _go() -> dict[str, Any]:
    try:
        go = toolchains.find_go()
    except BuildFailed as exc:
        return {"ok": False, "detail": exc.message, "version": None, "path": None}
    return {"ok": True, "detail": f"{go.binary} ({go.version})", "version": go.version, "path": str(go.binary)}


def _rust() -> tuple[dict[str, Any], toolchains.HostRust | None]:
    try:
        rust = toolchains.find_rust()
    except BuildFailed as exc:
        return {"ok": False, "detail": exc.message, "version": None, "path": None, "sysroot": None, "targets": []}, None
    return {"ok": True, "detail": f"{rust.binary} ({rust.version})", "version": rust.version,
            "path": str(rust.binary), "sysroot": str(rust.sysroot), "targets": sorted(rust.targets)}, rust


def _wasm(rust: toolchains.HostRust | None) -> dict[str, Any]:
    try:
        version = toolchains.wasmtime_version()
    except BuildFailed as exc:
        return {"ok": False, "detail": exc.message, "version": None, "wasm32_wasip1": False}
    target = rust is not None and recipes.WASM_TARGET in rust.targets
    if target:
        detail = f"{version}; Rust source builds to {recipes.WASM_TARGET}"
    elif rust is None:
        detail = f"{version}; modules and WAT only (no Rust toolchain for Rust source)"
    else:
        detail = (f"{version}; modules and WAT only: the {recipes.WASM_TARGET} target is not installed "
                  f"({toolchains.WASM_TARGET_HINT})")
    return {"ok": True, "detail": detail, "version": version, "wasm32_wasip1": target}


def _sandbox() -> dict[str, Any]:
    from nimbus.errors import MachineStartError
    from nimbus.machines.bwrap import find_bwrap

    try:
        bwrap = find_bwrap()
    except MachineStartError as exc:
        return {"ok": False, "detail": str(exc), "bwrap": None, "go_cache": None}
    needed = [sandbox.PRLIMIT] + ([sandbox.SETPRIV] if os.geteuid() == 0 else [])
    missing = [tool for tool in needed if not os.access(tool, os.X_OK)]
    overlay = sandbox.bwrap_supports_overlay(bwrap)
    go_cache = "warm overlay" if overlay else "empty per build"
    if missing:
        detail = f"{', '.join(missing)} missing (util-linux)"
        return {"ok": False, "detail": detail, "bwrap": bwrap, "go_cache": go_cache}
    how = "a warm read-only Go cache under a per-build overlay" if overlay else \
        "no overlay support: Go builds start from an empty cache"
    return {"ok": True, "detail": f"bwrap at {bwrap}; {how}", "bwrap": bwrap, "go_cache": go_cache}


def _docker(images: dict[str, str] | None) -> dict[str, Any]:
    names = {**docker.DEFAULT_IMAGES, **{k: v for k, v in (images or {}).items() if v}}
    cli = docker.find_cli()
    engine, probes = docker.find_engine()
    if cli is None:
        detail = "neither the docker nor the podman CLI is installed"
    elif engine is None:
        detail = f"{cli} is installed but no engine socket answers ({'; '.join(p.detail for p in probes)})"
    else:
        detail = f"{cli} with the engine at {engine.address}"
    return {"ok": cli is not None and engine is not None, "detail": detail, "cli": cli,
            "engine": engine.address if engine is not None else None, "images": names}


def report(*, images: dict[str, str] | None = None) -> dict[str, Any]:
    """Per compiled runtime, whether its toolchain is usable and its version; per builder, whether it is usable."""
    rust, host_rust = _rust()
    return {
        "runtimes": {"go": _go(), "rust": rust, "wasm": _wasm(host_rust)},
        "builders": {"sandbox": _sandbox(), "docker": _docker(images)},
    }


__all__ = ["report"]
