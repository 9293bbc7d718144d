"""WASM artifacts: validate a module and precompile it with wasmtime for the engine the machines use.

This runs in the node's process, in a worker thread, not in a sandbox: wasmtime's validator and its
Cranelift compiler exist to take untrusted modules (they are what every wasmtime embedder feeds
arbitrary code to, and are fuzzed continuously for it), compiling runs none of the module's code, and
only an in-process compile can be serialized for :func:`nimbus.agent.wasm.make_engine` — a serialized
module loads only into an identically configured engine, so both sides build theirs there. Its time is
bounded by the compiler (the caller stops waiting at the build timeout; the build slot stays taken until
the thread ends, so abandoned compiles cannot pile up), and its input by the API's 50 MiB artifact limit.
"""

from __future__ import annotations

from nimbus.compiler.base import BuildFailed

WASI_ENTRY = "_start"


def wat_to_wasm(text: bytes) -> bytes:
    """The binary module of WAT ``text`` (``BuildFailed`` with wasmtime's message when it does not parse)."""
    import wasmtime

    try:
        return wasmtime.wat2wasm(text.decode())
    except UnicodeDecodeError:
        raise BuildFailed("WAT text must be UTF-8") from None
    except wasmtime.WasmtimeError as exc:
        raise BuildFailed("the WAT text does not parse", str(exc)) from None


def precompile(wasm: bytes) -> bytes:
    """Validate ``wasm`` as a WASI command module and return it compiled and serialized for the machines' engine."""
    import wasmtime

    from nimbus.agent.wasm import make_engine

    engine = make_engine()
    try:
        module = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise BuildFailed("not a valid WebAssembly module", str(exc)) from None
    entry = [e for e in module.exports if e.name == WASI_ENTRY]
    if not entry or not isinstance(entry[0].type, wasmtime.FuncType):
        raise BuildFailed(f"the module exports no {WASI_ENTRY} function: a WASI command module is expected "
                          "(one that reads events on stdin and writes results on stdout)")
    return module.serialize()


__all__ = ["precompile", "wat_to_wasm"]
