"""Compiled runtimes (go, rust, wasm): first build, the same code deployed again (the build cache), warm p50."""

import time
import uuid

import httpx

from bench.common import p50_ms
from bench.loadgen import sequential

GO_SOURCE = """package main

import "encoding/json"

func Handle(event json.RawMessage) (any, error) {
	return event, nil
}
"""

RUST_SOURCE = """use std::io::{self, BufRead, Write};

fn main() {
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        writeln!(out, "{}", line).unwrap();
        out.flush().unwrap();
    }
}
"""

# A WASI command in WAT that echoes stdin to stdout: the line protocol's identity function.
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


def measure(base: str, body: bytes, floor_ms: float, n_seq: int) -> dict[str, dict]:
    """Build time (first and cached) and warm p50 of an echo function in each compiled runtime."""
    out: dict[str, dict] = {}
    sources = {"go": GO_SOURCE, "rust": RUST_SOURCE, "wasm": WASM_ECHO}
    client = httpx.Client(timeout=900)  # one client: building one per call would be timed too
    client.get(f"{base}/health")
    for runtime, code in sources.items():
        names = [f"{runtime}-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
        timings = []
        for name in names:
            t = time.perf_counter()
            r = client.post(f"{base}/api/v1/functions", json={"name": name, "runtime": runtime, "code": code})
            timings.append(time.perf_counter() - t)
            if r.status_code != 201:
                print(f"{runtime}: not measured ({r.status_code}: {r.json().get('detail', '')[:200]})")
                break
        else:
            cached = client.get(f"{base}/api/v1/functions/{names[1]}").json()
            warm = p50_ms(sequential(f"{base}/api/v1/functions/{names[0]}/invoke", body, n_seq))
            out[f"{runtime}_first_build_s"] = {"value": timings[0]}
            out[f"{runtime}_cached_deploy_ms"] = {"value": timings[1] * 1000,
                                                  "same_artifact": cached["artifact_sha256"] is not None}
            out[f"{runtime}_warm_p50_ms"] = {"value": warm, "floor": floor_ms, "ratio": warm / floor_ms}
    client.close()
    return out
