"""The rows of issue 24, all measured with wrk in one run: Nimbus beside the bare echo, the peer, N processes.

- ``wrk_p50_ms_c1``: p50 at one connection vs the echo's (``warm_p50_ms`` stays the loadgen figure
  with its own floor);
- ``warm_throughput_rps_c32`` / ``warm_p99_ms_c32``: the same meaning as before, now measured by wrk;
  the p99 row carries p99.9, the error kinds and the start kinds of a separate counting run;
- ``peer_throughput_rps_c32`` / ``peer_p50_ms_c1``: Nimbus beside serverless-offline (bench/peer.py);
- ``processes_rps_c32_n1`` / ``_n2``: fresh nodes with ``NIMBUS_PROCESSES`` 1 and 2 serving 50
  functions called round-robin: req/s, p99, the node's CPU (its whole process tree, machines included)
  and the hot-hit rate, counted in a short run of its own;
- ``processes_one_fn_rps_c32_n1`` / ``_n2``: the same two node shapes serving one function (concurrency
  32), the case the issue's c=32 rows measure.
"""

import time
import uuid
from pathlib import Path

import httpx

from bench import peer, wrk
from bench.common import NOOP_CODE, free_port, start_node, stop, wait_http

CONCURRENCY = 32
FUNCTIONS = 50
PROCESSES = (1, 2)
COUNT_S = 2.0


def _missing(keys: tuple[str, ...], note: str) -> dict[str, dict]:
    return {k: {"value": None, "note": note} for k in keys}


def create_function(base: str, name: str, **fields) -> None:
    r = httpx.post(f"{base}/api/v1/functions", timeout=60,
                   json={"name": name, "runtime": "python3", "code": NOOP_CODE, **fields})
    if r.status_code != 201:
        raise RuntimeError(f"creating {name}: {r.status_code} {r.text[:300]}")


def single_function(echo_url: str, invoke_url: str, body: bytes, seconds: float,
                    node_pid: int | None = None) -> dict[str, dict]:
    """c=1 p50, c=32 req/s and tail of one function (the caller made it with concurrency >= 32) and the echo."""
    keys = ("wrk_p50_ms_c1", "warm_throughput_rps_c32", "warm_p99_ms_c32")
    if wrk.find() is None:
        return _missing(keys, wrk.MISSING)
    echo1 = wrk.run(echo_url, body, 1, seconds)
    echo32 = wrk.run(echo_url, body, CONCURRENCY, seconds)
    one = wrk.run(invoke_url, body, 1, seconds)
    wrk.run(invoke_url, body, CONCURRENCY, 2, warmup_s=0)  # a machine per connection first: warm calls measured
    cpu0 = wrk.tree_cpu_s(node_pid) if node_pid else None
    many = wrk.run(invoke_url, body, CONCURRENCY, seconds, warmup_s=0)
    cpu = wrk.tree_cpu_s(node_pid) - cpu0 if cpu0 is not None and node_pid else None
    counted = wrk.run(invoke_url, body, CONCURRENCY, COUNT_S, count_starts=True, warmup_s=0)
    return {
        "wrk_p50_ms_c1": {"value": one.p(50), "floor": echo1.p(50), "ratio": one.p(50) / echo1.p(50),
                          "p99_ms": one.p(99), "errors": one.error_count, "requests": one.requests, "tool": "wrk -t1 -c1"},
        "warm_throughput_rps_c32": {"value": many.rps, "floor": echo32.rps, "ratio": many.rps / echo32.rps,
                                    "tool": f"wrk -t1 -c{CONCURRENCY}"},
        "warm_p99_ms_c32": {"value": many.p(99), "errors": many.error_count, "error_kinds": many.errors,
                            "p50_ms": many.p(50), "p999_ms": many.p(99.9), "max_ms": many.max_ms,
                            "requests": many.requests, "seconds": many.seconds, "starts": counted.starts,
                            "starts_errors": counted.error_count,
                            "echo_p50_ms": echo32.p(50), "echo_p99_ms": echo32.p(99), "echo_p999_ms": echo32.p(99.9),
                            "echo_errors": echo32.error_count,
                            "node_cpu_ms_per_call": cpu * 1000 / many.requests if cpu is not None and many.requests else None,
                            "tool": f"wrk -t1 -c{CONCURRENCY}"},
    }


def peer_rows(rows: dict[str, dict], found: dict) -> dict[str, dict]:
    """Nimbus's wrk figures (from ``single_function``) beside the peer's (``peer.measure``)."""
    keys = ("peer_throughput_rps_c32", "peer_p50_ms_c1")
    if not found.get("available"):
        return _missing(keys, found.get("note", "serverless-offline not measured"))
    rps, p50 = rows["warm_throughput_rps_c32"].get("value"), rows["wrk_p50_ms_c1"].get("value")
    if rps is None or p50 is None:
        return _missing(keys, "Nimbus's own wrk rows were not measured")
    context = {"peer": found, "nimbus_p99_ms_c32": rows["warm_p99_ms_c32"]["value"]}
    return {
        "peer_throughput_rps_c32": {"value": rps, "floor": found["rps"], "ratio": rps / found["rps"], **context},
        "peer_p50_ms_c1": {"value": p50, "floor": found["p50_ms_c1"], "ratio": p50 / found["p50_ms_c1"], **context},
    }


def processes_available() -> str | None:
    """None if this Nimbus has NIMBUS_PROCESSES, else why the rows are not measured."""
    from nimbus.config import Settings

    if "processes" not in Settings.model_fields:
        return "not available: this Nimbus has no NIMBUS_PROCESSES (its Settings would ignore it)"
    return None


def node_with_functions(home: Path, processes: int, functions: int, seconds: float, body: bytes) -> dict:
    """A fresh node with ``processes`` worker processes and ``functions`` no-ops, loaded round-robin at c=32
    (one function: with concurrency 32)."""
    port = free_port()
    per_process = functions * 3 + CONCURRENCY  # a few machines per function in each process, and blank ones
    node = start_node(port, home, runtimes="python3", processes=processes, max_machines=per_process * processes)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/health")
        names = [f"rr-{uuid.uuid4().hex[:6]}-{i}" for i in range(functions)]
        for name in names:
            create_function(base, name, **({"concurrency": CONCURRENCY} if functions == 1 else {}))
        paths = [f"/api/v1/functions/{name}/invoke" for name in names]
        wrk.run(base, body, CONCURRENCY, 4, paths=paths, warmup_s=0)  # every function's machines made, in each process
        cpu0, t0 = wrk.tree_cpu_s(node.pid), time.monotonic()
        many = wrk.run(base, body, CONCURRENCY, seconds, paths=paths, warmup_s=0)
        cpu, wall = wrk.tree_cpu_s(node.pid) - cpu0, time.monotonic() - t0
        counted = wrk.run(base, body, CONCURRENCY, COUNT_S, paths=paths, count_starts=True, warmup_s=0)
    finally:
        stop(node)
    return {"processes": processes, "rps": many.rps, "p50_ms": many.p(50), "p99_ms": many.p(99),
            "p999_ms": many.p(99.9), "errors": many.error_count, "error_kinds": many.errors, "requests": many.requests,
            "functions": functions, "hot_share": counted.hot_share(), "starts": counted.starts,
            "node_cpu_cores": cpu / wall, "node_cpu_ms_per_call": cpu * 1000 / many.requests if many.requests else None}


def processes_rows(home: Path, seconds: float, body: bytes, functions: int = FUNCTIONS) -> dict[str, dict]:
    prefix = "processes_rps_c32" if functions > 1 else "processes_one_fn_rps_c32"
    keys = tuple(f"{prefix}_n{n}" for n in PROCESSES)
    if wrk.find() is None:
        return _missing(keys, wrk.MISSING)
    rows: dict[str, dict] = {}
    first: dict | None = None
    for n, key in zip(PROCESSES, keys, strict=True):
        why = processes_available() if n > 1 else None
        if why is not None:
            rows[key] = {"value": None, "note": why, "processes": n}
            continue
        try:
            got = node_with_functions(home / f"processes-{n}-{functions}", n, functions, seconds, body)
        except (RuntimeError, SystemExit) as exc:
            rows[key] = {"value": None, "note": f"not measured: {exc}", "processes": n}
            continue
        first = first or got
        ratio = got["rps"] / first["rps"] if first is not got else None
        rows[key] = {"value": got["rps"], "floor": first["rps"] if ratio is not None else None, "ratio": ratio, **got}
    return rows


def measure(echo_url: str, invoke_url: str, body: bytes, home: Path, seconds: float,
            node_pid: int | None = None, with_peer: bool = True, with_processes: bool = True) -> dict[str, dict]:
    """Every wrk row, in the table's order."""
    print("wrk: echo and Nimbus at c=1 and c=32 ...", flush=True)
    rows = single_function(echo_url, invoke_url, body, seconds, node_pid)
    if with_peer:
        print("wrk: serverless-offline (the peer) ...", flush=True)
        found = peer.measure(body, seconds, CONCURRENCY) if wrk.find() else {"note": wrk.MISSING}
        rows.update(peer_rows(rows, found))
    if with_processes:
        print(f"wrk: 1 and {FUNCTIONS} functions on nodes of {' and '.join(map(str, PROCESSES))} processes ...",
              flush=True)
        rows.update(processes_rows(home, seconds, body, 1))
        rows.update(processes_rows(home, seconds, body))
    return rows
