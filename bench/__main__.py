"""`make bench`: each Nimbus figure beside a floor measured in the same run, on the same machine.

Figures: warm invoke p50 (concurrency 1) vs a bare ASGI echo + a bare framed socketpair round trip;
warm throughput (concurrency 32) vs the echo's; cold start (machine boot + init + first call) vs a
bare `bwrap --unshare-all ... python3 -I -S -c pass`; for each compiled runtime (go, rust, wasm) the
first build, the same code deployed again (served from the build cache) and the warm p50 against the
same floor as python's. Results go to bench/results.json.
"""

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from nimbus import protocol

HERE = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent
N_SEQ = 400
N_CONC = 2000
CONCURRENCY = 32
N_COLD = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server at {url} did not come up")


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def sequential(url: str, body: bytes, n: int = N_SEQ) -> list[float]:
    out = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n // 10):
            client.post(url, content=body)  # warm up
        for _ in range(n):
            t = time.perf_counter()
            r = client.post(url, content=body)
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return out


def throughput(url: str, body: bytes, n: int = N_CONC, conc: int = CONCURRENCY) -> tuple[float, float, int]:
    async def run():
        limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
        latencies, errors = [], 0
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            queue = list(range(n))

            async def worker():
                nonlocal errors
                while queue:
                    queue.pop()
                    t = time.perf_counter()
                    r = await client.post(url, content=body)
                    latencies.append(time.perf_counter() - t)
                    if r.status_code != 200 or (b'"status"' in r.content and b'"succeeded"' not in r.content):
                        errors += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)))
            return n / (time.perf_counter() - t0), statistics.quantiles(latencies, n=100)[98] * 1000, errors

    return asyncio.run(run())


def socketpair_round_trip(n: int = 5000) -> list[float]:
    a, b = socket.socketpair()

    def echo():
        try:
            while True:
                header, blob = protocol.recv_frame(b)
                protocol.send_frame(b, header, blob)
        except (EOFError, OSError):
            pass

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        protocol.send_frame(a, {"type": "exec", "id": 1}, b"{}")
        protocol.recv_frame(a)
        out.append(time.perf_counter() - t)
    a.close()
    thread.join(2)
    b.close()
    return out


def bare_bwrap_start(n: int = N_COLD) -> list[float]:
    from nimbus.machines import bwrap

    binary = bwrap.find_bwrap()
    prefix = sys.base_prefix
    python = os.path.realpath(os.path.join(prefix, "bin", f"python3.{sys.version_info.minor}"))
    cmd = [binary, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
           "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
           "--tmpfs", "/tmp", "--ro-bind", prefix, prefix, python, "-I", "-S", "-c", "pass"]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        out.append(time.perf_counter() - t)
    return out


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


def wasm_echo_module() -> str:
    """A WASI command in WAT that echoes stdin to stdout: the line protocol's identity function."""
    return """(module
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


def compiled_runtimes(base: str, body: bytes, floor: float) -> dict[str, dict]:
    """Build time (first and cached) and warm p50 of an echo function in each compiled runtime."""
    out: dict[str, dict] = {}
    sources = {"go": GO_SOURCE, "rust": RUST_SOURCE, "wasm": wasm_echo_module()}
    for runtime, code in sources.items():
        names = [f"{runtime}-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
        timings = []
        for name in names:
            t = time.perf_counter()
            r = httpx.post(f"{base}/api/v1/functions", timeout=900,
                           json={"name": name, "runtime": runtime, "code": code})
            timings.append(time.perf_counter() - t)
            if r.status_code != 201:
                print(f"{runtime}: not measured ({r.status_code}: {r.json().get('detail', '')[:200]})")
                break
        else:
            cached = httpx.get(f"{base}/api/v1/functions/{names[1]}").json()
            warm = p50_ms(sequential(f"{base}/api/v1/functions/{names[0]}/invoke", body, N_SEQ // 2))
            out[f"{runtime}_first_build_s"] = {"value": timings[0]}
            out[f"{runtime}_cached_deploy_ms"] = {"value": timings[1] * 1000,
                                                  "same_artifact": cached["artifact_sha256"] is not None}
            out[f"{runtime}_warm_p50_ms"] = {"value": warm, "floor": floor, "ratio": warm / floor}
    return out


def main() -> None:
    results: dict[str, dict] = {}
    home = Path(tempfile.mkdtemp(prefix="nimbus-bench-"))
    echo_port, node_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
    echo = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.echo:app", "--port", str(echo_port),
                             "--log-level", "warning", "--no-access-log"], cwd=HERE.parent, env=env)
    node = subprocess.Popen([str(VENV_BIN / "nimbus"), "up", "--port", str(node_port), "--home", str(home)],
                            env={**env, "NIMBUS_MIN_WARM": "1", "NIMBUS_LOG_LEVEL": "warning",
                                 "NIMBUS_RUNTIMES": "python3", "NIMBUS_MAX_MACHINES": "64"},
                            stdout=subprocess.DEVNULL)
    try:
        echo_url = f"http://127.0.0.1:{echo_port}/"
        base = f"http://127.0.0.1:{node_port}"
        wait_http(echo_url)
        wait_http(f"{base}/health")
        name = f"bench-{uuid.uuid4().hex[:6]}"
        r = httpx.post(f"{base}/api/v1/functions", timeout=30, json={
            "name": name, "runtime": "python3", "code": "def handler(event, context):\n    return event\n",
            "concurrency": CONCURRENCY})
        r.raise_for_status()
        invoke_url = f"{base}/api/v1/functions/{name}/invoke"
        body = b'{"hello": "world"}'

        echo_seq = p50_ms(sequential(echo_url, body))
        pair = p50_ms(socketpair_round_trip())
        warm = p50_ms(sequential(invoke_url, body))
        floor = echo_seq + pair
        results["warm_p50_ms"] = {"value": warm, "floor": floor, "ratio": warm / floor,
                                  "floor_parts": {"asgi_echo_p50_ms": echo_seq, "socketpair_rtt_p50_ms": pair}}

        echo_rps, _, _ = throughput(echo_url, body)
        rps, p99, errors = throughput(invoke_url, body)
        results["warm_throughput_rps_c32"] = {"value": rps, "floor": echo_rps, "ratio": rps / echo_rps}
        results["warm_p99_ms_c32"] = {"value": p99, "errors": errors}

        # Cold start: a fresh function each time, with the pool's blank machine used up, so a machine boots.
        colds = []
        for i in range(N_COLD):
            fn = f"cold-{uuid.uuid4().hex[:6]}-{i}"
            httpx.post(f"{base}/api/v1/functions", timeout=30, json={
                "name": fn, "runtime": "python3", "memory_mb": 256,  # not the blank size: forces a cold boot
                "code": "def handler(event, context):\n    return 1\n"}).raise_for_status()
            t = time.perf_counter()
            out = httpx.post(f"{base}/api/v1/functions/{fn}/invoke", timeout=30, json={}).json()
            colds.append(time.perf_counter() - t)
            assert out["start"] == "cold", out
        bare = p50_ms(bare_bwrap_start())
        cold = p50_ms(colds)
        results["cold_start_p50_ms"] = {"value": cold, "floor": bare, "ratio": cold / bare}
        results.update(compiled_runtimes(base, body, floor))
    finally:
        for proc in (node, echo):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"{'figure':32} {'nimbus':>12} {'floor':>12} {'ratio':>8}")
    for key, row in results.items():
        floor = f"{row['floor']:12.3f}" if "floor" in row else f"{'-':>12}"
        ratio = f"{row['ratio']:8.2f}" if "ratio" in row else f"{'-':>8}"
        print(f"{key:32} {row['value']:12.3f} {floor} {ratio}")
    print(f"warm p99 at c{CONCURRENCY}: {results['warm_p99_ms_c32']['value']:.2f} ms, "
          f"{results['warm_p99_ms_c32']['errors']} errors")
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
