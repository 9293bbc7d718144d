"""Compiled runtimes through the HTTP API: Go, Rust and WASM built for real, run in bwrap machines.

Each test deploys over HTTP on a real node (SQLite and PostgreSQL), so the build, the build cache in the
store, the artifact handed to the machine and the agent's child process are all the real ones.
"""

import base64
import shutil
import uuid

import pytest
from test_api import assert_problem, deploy, invoke, unique

pytestmark = pytest.mark.sandbox

needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed (apt-get install golang-go)")

GO_SQUARE = """package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
)

var calls = 0
var machine = fmt.Sprintf("%d", os.Getpid())

type input struct {
	N    int  `json:"n"`
	Fail bool `json:"fail"`
}

func Handle(event json.RawMessage) (any, error) {
	var in input
	if err := json.Unmarshal(event, &in); err != nil {
		return nil, err
	}
	if in.Fail {
		return nil, errors.New("asked to fail")
	}
	calls++
	fmt.Println("squaring", in.N)
	return map[string]any{"square": in.N * in.N, "calls": calls, "machine": machine}, nil
}
"""

RUST_TRI = """use std::io::{self, BufRead, Write};

fn main() {
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    let mut calls = 0u64;
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        calls += 1;
        // Tiny hand-rolled parse: the contract allows std only. The event is {"n": <int>}.
        let n: u64 = line.chars().filter(|c| c.is_ascii_digit()).collect::<String>().parse().unwrap_or(0);
        eprintln!("triangle of {}", n);
        writeln!(out, "{{\\"tri\\": {}, \\"calls\\": {}}}", n * (n + 1) / 2, calls).unwrap();
        out.flush().unwrap();
    }
}
"""

WASM_ECHO = """(module
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    (loop $next
      (i32.store (i32.const 0) (i32.const 1024))
      (i32.store (i32.const 4) (i32.const 65536))
      (drop (call $read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
      (if (i32.eqz (i32.load (i32.const 8))) (then (return)))
      (i32.store (i32.const 4) (i32.load (i32.const 8)))
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 12)))
      (br $next))))
"""

WASM_SPIN = """(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $forever (br $forever))))
"""


def wasm_binary(wat: str) -> str:
    import wasmtime

    return base64.b64encode(wasmtime.wat2wasm(wat)).decode()


# ---------------------------------------------------------------- go


@needs_go
def test_go_function_builds_runs_hot_and_reports_errors(api):
    fn = deploy(api, GO_SQUARE, runtime="go1.19")
    assert fn["runtime"] == "go" and fn["artifact_sha256"] and fn["artifact_size"] > 100_000
    assert fn["build"]["toolchain"].startswith("go") and fn["build"]["cached"] in (True, False)

    first = invoke(api, fn["name"], {"n": 12})
    assert first["status"] == "succeeded", first
    assert first["output"]["square"] == 144 and first["output"]["calls"] == 1
    second = invoke(api, fn["name"], {"n": 3})
    assert second["start"] == "hot" and second["output"]["square"] == 9
    # One process per machine: the same pid, and its state carried over.
    assert second["output"]["machine"] == first["output"]["machine"] and second["output"]["calls"] == 2
    logs = api.get(f"/api/v1/invocations/{second['invocation_id']}").json()["logs"]
    assert "squaring 3" in logs

    failed = invoke(api, fn["name"], {"fail": True})
    assert failed["status"] == "failed" and "asked to fail" in failed["error"]["message"]
    after = invoke(api, fn["name"], {"n": 2})
    assert after["status"] == "succeeded" and after["start"] == "hot" and after["output"]["square"] == 4


@needs_go
def test_identical_go_code_is_served_from_the_build_cache(api):
    code = GO_SQUARE.replace("asked to fail", f"cache probe {uuid.uuid4().hex}")
    first = deploy(api, code, runtime="go")
    assert first["build"]["cached"] is False
    second = deploy(api, code, runtime="go")
    assert second["build"]["cached"] is True
    assert second["artifact_sha256"] == first["artifact_sha256"]
    assert invoke(api, second["name"], {"n": 5})["output"]["square"] == 25


@needs_go
def test_go_compile_error_is_a_422_with_the_compiler_output(api):
    name = unique("bad-go")
    resp = api.post("/api/v1/functions", json={
        "name": name, "runtime": "go",
        "code": "package main\n\nimport \"encoding/json\"\n\nfunc Handle(event json.RawMessage) (any, error) {\n"
                "\treturn undefinedThing, nil\n}\n"})
    body = assert_problem(resp, 422, "undefinedThing")
    assert "undefined" in body["detail"]
    assert api.get(f"/api/v1/functions/{name}").status_code == 404  # nothing half-created


@needs_go
def test_go_build_cannot_fetch_modules(api):
    resp = api.post("/api/v1/functions", json={
        "name": unique("net-go"), "runtime": "go",
        "code": "package main\n\nimport (\n\t\"encoding/json\"\n\t\"github.com/example/nothing\"\n)\n\n"
                "func Handle(event json.RawMessage) (any, error) {\n\treturn nothing.X, nil\n}\n"})
    assert_problem(resp, 422, "github.com/example/nothing")


@needs_go
def test_updating_go_code_rebuilds_and_retires_old_machines(api):
    fn = deploy(api, GO_SQUARE, runtime="go")
    assert invoke(api, fn["name"], {"n": 4})["output"]["square"] == 16
    cube = GO_SQUARE.replace('"square": in.N * in.N', '"square": in.N * in.N * in.N')
    resp = api.put(f"/api/v1/functions/{fn['name']}", json={"code": cube})
    assert resp.status_code == 200, resp.text
    updated = resp.json()
    assert updated["version"] == 2 and updated["artifact_sha256"] != fn["artifact_sha256"]
    out = invoke(api, fn["name"], {"n": 4})
    assert out["output"]["square"] == 64 and out["start"] != "hot"
    # A settings-only update keeps the artifact.
    kept = api.put(f"/api/v1/functions/{fn['name']}", json={"timeout_s": 10}).json()
    assert kept["version"] == 3 and kept["artifact_sha256"] == updated["artifact_sha256"]
    assert invoke(api, fn["name"], {"n": 2})["output"]["square"] == 8


# ---------------------------------------------------------------- rust


def test_rust_function_loops_over_lines(api):
    fn = deploy(api, RUST_TRI, runtime="rust")
    assert fn["runtime"] == "rust" and fn["artifact_sha256"]
    first = invoke(api, fn["name"], {"n": 4})
    assert first["status"] == "succeeded", first
    assert first["output"] == {"tri": 10, "calls": 1}
    second = invoke(api, fn["name"], {"n": 100})
    assert second["start"] == "hot" and second["output"] == {"tri": 5050, "calls": 2}
    logs = api.get(f"/api/v1/invocations/{second['invocation_id']}").json()["logs"]
    assert "triangle of 100" in logs


def test_rust_compile_error_and_host_files_stay_out_of_reach(api, node):
    broken = api.post("/api/v1/functions", json={"name": unique("bad-rs"), "runtime": "rust",
                                                 "code": "fn main() { let x: u32 = \"nope\"; }\n"})
    assert_problem(broken, 422, "mismatched types")
    secret = node.settings.home.resolve() / "nimbus.db"
    for path in (str(secret), "/etc/shadow"):
        code = f'fn main() {{ println!("{{}}", include_str!("{path}").len()); }}\n'
        resp = api.post("/api/v1/functions", json={"name": unique("peek-rs"), "runtime": "rust", "code": code})
        assert_problem(resp, 422, path)


# ---------------------------------------------------------------- wasm


def test_wasm_module_and_wat_text_run_and_stay_hot(api):
    fn = deploy_b64(api, wasm_binary(WASM_ECHO), runtime="wasm")
    assert fn["runtime"] == "wasm" and fn["artifact_sha256"] and fn["code_size"] > 0
    first = invoke(api, fn["name"], {"echo": [1, 2, 3]})
    assert first["status"] == "succeeded", first
    assert first["output"] == {"echo": [1, 2, 3]}
    second = invoke(api, fn["name"], {"again": True})
    assert second["start"] == "hot" and second["output"] == {"again": True}
    # The same module as WAT text deploys too.
    text = deploy(api, WASM_ECHO, runtime="wasm32-wasip1")
    assert invoke(api, text["name"], [1])["output"] == [1]


def test_invalid_wasm_is_a_422(api):
    junk = base64.b64encode(b"\0asm\x01\0\0\0garbage").decode()
    resp = api.post("/api/v1/functions", json={"name": unique("bad-wasm"), "runtime": "wasm", "code_base64": junk})
    assert_problem(resp, 422)


def test_wasm_spin_times_out_and_the_next_call_works(api):
    spin = deploy_b64(api, wasm_binary(WASM_SPIN), runtime="wasm", timeout_s=1)
    out = invoke(api, spin["name"], {})
    assert out["status"] == "timed_out", out
    echo = deploy_b64(api, wasm_binary(WASM_ECHO), runtime="wasm")
    assert invoke(api, echo["name"], {"ok": 1})["output"] == {"ok": 1}
    assert invoke(api, spin["name"], {})["status"] == "timed_out"


def deploy_b64(api, code_base64: str, *, runtime: str, **settings) -> dict:
    resp = api.post("/api/v1/functions", json={"name": unique("wasm"), "runtime": runtime,
                                               "code_base64": code_base64, **settings})
    assert resp.status_code == 201, resp.text
    return resp.json()


WASM_MEMORY_HOG = """(module
  (memory (export "memory") 1)
  (func (export "_start") (local $page i32) (local $at i32)
    (loop $more
      (local.set $page (memory.grow (i32.const 16)))
      (if (i32.eq (local.get $page) (i32.const -1)) (then unreachable))
      ;; touch every 4 KiB of the new megabyte so it is resident, not just reserved
      (local.set $at (i32.mul (local.get $page) (i32.const 65536)))
      (loop $touch
        (i32.store (local.get $at) (i32.const 1))
        (local.set $at (i32.add (local.get $at) (i32.const 4096)))
        (br_if $touch (i32.lt_u (local.get $at) (i32.mul (i32.add (local.get $page) (i32.const 16)) (i32.const 65536)))))
      (br $more))))
"""


def test_wasm_memory_hog_stops_at_memory_mb_and_the_next_call_works(api):
    hog = deploy_b64(api, wasm_binary(WASM_MEMORY_HOG), runtime="wasm", memory_mb=64)
    out = invoke(api, hog["name"], {})
    assert out["status"] == "failed", out
    assert out["error"]["type"] == "MemoryLimitExceeded" and "64 MiB" in out["error"]["message"], out  # the module's own limit, not the kernel's OOM killer
    echo = deploy_b64(api, wasm_binary(WASM_ECHO), runtime="wasm", memory_mb=64)
    assert invoke(api, echo["name"], {"ok": 1})["output"] == {"ok": 1}
