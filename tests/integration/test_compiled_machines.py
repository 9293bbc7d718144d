"""Compiled functions (``go``, ``rust``, ``wasm``) inside real bwrap machines.

Each artifact is built here with the host's toolchain, as the compiler would build it, and sent in an
``init``; two calls follow on the same machine, and the second shows the same process (or wasm instance)
served it, with its state. Together they show that a binary written to the ``/var/task`` tmpfs runs
there as uid 65534, and that wasm machines import the wasmtime package the driver binds for them.
"""

import json
import logging
import subprocess
import uuid
from pathlib import Path

import pytest

from nimbus.agent.contract import SANDBOX_UID, WASMTIME_SITE
from nimbus.errors import MachineStartError
from nimbus.machines import bwrap, layout
from nimbus.machines.base import MachineSpec
from toolchain_builds import go_binary, rust_binary

pytestmark = pytest.mark.sandbox

LONG = 60.0

GO_HANDLER = """
package main

import (
	"encoding/json"
	"fmt"
	"os"
)

var calls int

func Handle(event json.RawMessage) (any, error) {
	calls++
	fmt.Println("go call", calls)
	return map[string]any{"calls": calls, "pid": os.Getpid(), "uid": os.Getuid(), "event": event}, nil
}
"""

RUST_PROGRAM = r"""
use std::io::{self, BufRead, Write};

fn main() {
    let mut out = io::stdout().lock();
    let mut count = 0;
    for line in io::stdin().lock().lines() {
        count += 1;
        eprintln!("rust call {}", count);
        writeln!(out, "{{\"calls\":{},\"pid\":{},\"event\":{}}}", count, std::process::id(), line.unwrap()).unwrap();
    }
}
"""

# Answers each event line with its number, kept in a global: the instance outlives the call.
COUNTER_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $calls (mut i32) (i32.const 0))
  (data (i32.const 200) "wasm call\\n")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start") (local $n i32) (local $i i32)
    (loop $next
      (i32.store (i32.const 16) (i32.const 1024))
      (i32.store (i32.const 20) (i32.const 60000))
      (drop (call $fd_read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 24)))
      (local.set $n (i32.load (i32.const 24)))
      (if (i32.eqz (local.get $n)) (then (return)))
      (local.set $i (i32.const 0))
      (block $done (loop $scan
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.eq (i32.load8_u (i32.add (i32.const 1024) (local.get $i))) (i32.const 10))
          (then
            (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
            (call $write (i32.const 2) (i32.const 200) (i32.const 10))
            ;; calls < 10 here: one digit and a newline
            (i32.store8 (i32.const 300) (i32.add (i32.const 48) (global.get $calls)))
            (i32.store8 (i32.const 301) (i32.const 10))
            (call $write (i32.const 1) (i32.const 300) (i32.const 2))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
      (br $next))))"""


def _bwrap_usable() -> str | None:
    try:
        path = bwrap.find_bwrap()
    except MachineStartError as exc:
        return str(exc)
    done = subprocess.run([path, "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true"],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"bwrap cannot create a sandbox here: {done.stderr.strip()}"


_WHY_NOT = _bwrap_usable()
if _WHY_NOT:
    pytestmark = [pytest.mark.sandbox, pytest.mark.skip(reason=_WHY_NOT)]


@pytest.fixture(scope="module")
def go_bootstrap(tmp_path_factory) -> bytes:
    return go_binary(tmp_path_factory.mktemp("go"), GO_HANDLER)


@pytest.fixture(scope="module")
def rust_bootstrap(tmp_path_factory) -> bytes:
    return rust_binary(tmp_path_factory.mktemp("rust"), RUST_PROGRAM)


@pytest.fixture(scope="module")
def counter_cwasm() -> bytes:
    wasmtime = pytest.importorskip("wasmtime")
    from nimbus.agent.wasm import make_engine

    return bytes(wasmtime.Module(make_engine(), wasmtime.wat2wasm(COUNTER_WAT)).serialize())


@pytest.fixture
async def driver(tmp_path, caplog):
    d = bwrap.BwrapDriver(tmp_path / "home")
    caplog.set_level(logging.WARNING)
    try:
        yield d
    finally:
        await d.close()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("asyncio", "nimbus"))]
    assert not noisy, [r.getMessage() for r in noisy]


async def run_twice(driver, runtime: str, artifact: bytes) -> list[tuple[dict, object]]:
    """Init a new machine with ``artifact``, call it twice, stop it; the two (reply, output) pairs."""
    filename = "module.cwasm" if runtime == "wasm" else "bootstrap"
    machine = await driver.create(MachineSpec(runtime=runtime))
    try:
        init = {"type": "init", "runtime": runtime, "handler": "main.main", "filename": filename, "env": {},
                "memory_mb": 128, "timeout_s": 30, "function_name": "compiled", "function_version": "1"}
        header, _ = await machine.request(init, artifact, timeout=LONG)
        assert header["type"] == "init_ok", (header, machine.diagnostics())
        replies = []
        for n in (1, 2):
            request = {"type": "exec", "invocation_id": uuid.uuid4().hex, "deadline_ms": int(LONG * 1000)}
            header, blob = await machine.request(request, json.dumps({"n": n}).encode(), timeout=LONG)
            assert header["type"] == "result", header
            replies.append((header, json.loads(blob)))
        assert machine.uses == 2 and await machine.ping()
    finally:
        await machine.stop()
    return replies


async def test_go_machine(driver, go_bootstrap):
    (first, one), (second, two) = await run_twice(driver, "go", go_bootstrap)
    assert (one["calls"], two["calls"]) == (1, 2)
    assert one["pid"] == two["pid"]  # the same process, kept warm
    assert one["uid"] in driver.uid_range if driver.privileged else one["uid"] == SANDBOX_UID
    assert two["event"] == {"n": 2}
    assert (first["logs"], second["logs"]) == ("go call 1\n", "go call 2\n")


async def test_rust_machine(driver, rust_bootstrap):
    (first, one), (second, two) = await run_twice(driver, "rust", rust_bootstrap)
    assert (one["calls"], two["calls"]) == (1, 2)
    assert one["pid"] == two["pid"]
    assert two["event"] == {"n": 2}
    assert (first["logs"], second["logs"]) == ("rust call 1\n", "rust call 2\n")


async def test_wasm_machine(driver, counter_cwasm):
    (first, one), (second, two) = await run_twice(driver, "wasm", counter_cwasm)
    assert (one, two) == (1, 2)  # module state kept: the same instance
    assert (first["logs"], second["logs"]) == ("wasm call\n", "wasm call\n")


async def test_only_wasm_machines_see_wasmtime(driver):
    assert layout.wasmtime_package() is not None
    wasm = driver.command(MachineSpec(runtime="wasm"), 3, None)
    go = driver.command(MachineSpec(runtime="go"), 3, None)
    assert f"{WASMTIME_SITE}/wasmtime" in wasm and f"{WASMTIME_SITE}/wasmtime" not in go
    # The bind is the package alone, never the site-packages around it.
    source = wasm[wasm.index(f"{WASMTIME_SITE}/wasmtime") - 1]
    assert Path(source).name == "wasmtime" and (Path(source) / "__init__.py").is_file()
