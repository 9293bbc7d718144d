"""Function templates and per-call isolation (issue 20), each figure on a fresh node in its own home.

1. A FastAPI + Mangum app (docs/runtimes.md) started cold, booted + Init (``function_templates=off``),
   beside the same app forked from its function template (``per-call``, no spares: every call forks
   on demand); floor: the bare sandboxed interpreter start the run already measured.
2. A per-call no-op function over HTTP beside a shared no-op's hot calls and a plain cold start from
   the runtime template, all on one node in alternating rounds (drift falls on all alike); then
   throughput at concurrency 8, per-call beside hot.
3. PSS and RSS of the FastAPI function's template and of its idle forks (the per-call spares), read from
   /proc: what copy-on-write shares.

Every timed call goes over one kept-alive connection with loadgen's client, so no client set-up is in
a figure; deploys (the dependency layer resolves once per host, then is cached) are never timed.
"""

import asyncio
import base64
import io
import json
import statistics
import time
import uuid
import zipfile
from pathlib import Path

import httpx

from bench.common import (
    NOOP_CODE,
    children,
    cmdline,
    comm,
    free_port,
    ms,
    p50_ms,
    p99_ms,
    parent,
    process_tree,
    smaps_rollup,
    start_node,
    stop,
    wait_http,
)
from bench.loadgen import HTTPClient, concurrent
from nimbus.pool.snapshots import DEFAULT_SPARES

FASTAPI_REQUIREMENTS = "fastapi\nmangum\n"
FASTAPI_APP = '''from fastapi import FastAPI
from mangum import Mangum

app = FastAPI()

@app.get("/items/{item_id}")
def read_item(item_id: int, q: str | None = None):
    return {"item_id": item_id, "q": q}

handler = Mangum(app, lifespan="off")
'''
# The same app primed in its template by a SnapStart before-snapshot hook, as docs/runtimes.md shows: the
# work FastAPI defers to its first request is done once, before the template forks.
FASTAPI_PRIMED_APP = FASTAPI_APP + '''
from snapshot_restore_py import register_before_snapshot

@register_before_snapshot
def prime():
    handler({"resource": "/items/{item_id}", "path": "/items/0", "httpMethod": "GET", "headers": {},
             "requestContext": {"stage": "prod"}, "body": None}, None)
'''
# The API Gateway REST event docs/runtimes.md invokes it with.
API_EVENT = json.dumps({"resource": "/items/{item_id}", "path": "/items/7", "httpMethod": "GET", "headers": {},
                        "queryStringParameters": {"q": "x"}, "requestContext": {"stage": "prod"},
                        "body": None}).encode()
EXPECTED_BODY = '{"item_id":7,"q":"x"}'
BODY = b'{"hello": "world"}'
BOOTED_SAMPLES = 8  # each pays FastAPI's ~0.25 s of imports
COLD_GAP_S = 0.05  # before each start: arrivals, not a burst (as in http_cold_starts)
ROUNDS = 3
CONCURRENCY = 8
THROUGHPUT_S = 4.0
IDLE_FORKS = 4


def fastapi_package(app: str = FASTAPI_APP) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", app)
        archive.writestr("requirements.txt", FASTAPI_REQUIREMENTS)
    return base64.b64encode(buffer.getvalue()).decode()


class Node:
    """A fresh node (``start_node`` settings), its API, and timed invocations on one kept-alive connection."""

    def __init__(self, home: Path, **settings: object) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.proc = start_node(port, home, runtimes="python3", **settings)
        self.loop = asyncio.new_event_loop()
        self.conn: HTTPClient | None = None
        self.deploys: list[float] = []

    def __enter__(self) -> "Node":
        try:
            wait_http(f"{self.base}/health")
            self.conn = HTTPClient(f"{self.base}/", b"")
            self.loop.run_until_complete(self.conn.connect())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        if self.conn is not None:
            self.conn.close()
        self.loop.close()
        stop(self.proc)

    def create(self, name: str, **fields) -> None:
        body = {"name": name, "runtime": "python3", "code": NOOP_CODE, **fields}
        began = time.perf_counter()
        r = httpx.post(f"{self.base}/api/v1/functions", json=body, timeout=600)
        if r.status_code != 201:
            raise SystemExit(f"creating {name}: {r.status_code} {r.text[:300]}")
        self.deploys.append(time.perf_counter() - began)

    def create_fastapi(self, name: str, package: str, **fields) -> None:
        self.create(name, code=None, code_base64=package, handler="app.handler", memory_mb=256, **fields)

    def pool(self) -> dict:
        return httpx.get(f"{self.base}/health", timeout=30).json()["pool"].get("python3", {})

    def wait_pool(self, what: str, at_least: int, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while self.pool().get(what, 0) < at_least:
            if time.monotonic() > deadline:
                raise SystemExit(f"/health never showed {what} >= {at_least}: {self.pool()}")
            time.sleep(0.05)

    def wait_until_forked(self, name: str, event: bytes = BODY, seconds: float = 120, templates: int = 1) -> None:
        """Call (untimed) until a call is forked (``templates``: how many the node should have by then)."""
        self.wait_pool("templates", templates, seconds)
        deadline = time.monotonic() + seconds
        while self.invoke(name, event)[1].get("start") != "forked":
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: no call was forked from its template within {seconds:.0f} s")
            time.sleep(0.05)

    def invoke(self, name: str, event: bytes = BODY) -> tuple[float, dict]:
        """(seconds, answer) of one call; the answer ``{"status": "http N"}`` on a non-200."""
        assert self.conn is not None, "used outside its with block"
        client = HTTPClient(f"{self.base}/api/v1/functions/{name}/invoke", event)
        client.reader, client.writer = self.conn.reader, self.conn.writer

        async def timed():
            t = time.perf_counter()
            status, reply = await client.post()
            return time.perf_counter() - t, status, reply

        elapsed, status, reply = self.loop.run_until_complete(timed())
        return elapsed, json.loads(reply) if status == 200 else {"status": f"http {status}", "body": reply[:300]}


def served(answer: dict) -> bool:
    """The FastAPI app's 200 for /items/7?q=x, through Mangum."""
    out = answer.get("output")
    return (answer.get("status") == "succeeded" and isinstance(out, dict) and out.get("statusCode") == 200
            and out.get("body") == EXPECTED_BODY)


def failure(answer: dict) -> str:
    """What went wrong with a call, short enough to count calls by it."""
    error, output = answer.get("error"), answer.get("output")
    if isinstance(error, dict):
        return f"{answer.get('status')}: {error.get('type', '')} {error.get('message', '')}"[:200]
    if isinstance(output, dict):
        return f"{answer.get('status')}: statusCode {output.get('statusCode')}"
    return str(answer.get("status"))[:200]


def tally(counts: dict[str, int], answer: dict, ok: bool) -> None:
    key = str(answer.get("start")) if ok else failure(answer)
    counts[key] = counts.get(key, 0) + 1


# ---------------------------------------------------------------- 1. FastAPI: booted + Init vs forked


def fastapi_cold_starts(home: Path, floor_ms: float, forked_n: int, app: str = FASTAPI_APP) -> dict[str, dict]:
    """The two FastAPI rows: booted + Init and forked from its function template, each on its own node."""
    package = fastapi_package(app)
    booted: list[float] = []
    booted_other: dict[str, int] = {}
    with Node(home / "fastapi-booted", function_templates="off", max_machines=BOOTED_SAMPLES + 32) as node:
        node.create_fastapi(f"items-{uuid.uuid4().hex[:6]}", package)  # resolves (or finds) the layer
        first_deploy = node.deploys[0]
        for i in range(BOOTED_SAMPLES):
            name = f"items-{uuid.uuid4().hex[:6]}-{i}"
            node.create_fastapi(name, package)
            time.sleep(COLD_GAP_S)
            elapsed, answer = node.invoke(name, API_EVENT)
            if served(answer) and answer.get("start") == "cold":
                booted.append(elapsed)
            else:
                tally(booted_other, answer, served(answer))
        cached_deploy = p50_ms(node.deploys[1:])

    forked: dict[str, list[float]] = {"plain": [], "primed": []}
    forked_other: dict[str, dict[str, int]] = {"plain": {}, "primed": {}}
    first_ms: dict[str, float] = {}
    with Node(home / "fastapi-forked", per_call_spares=0) as node:
        names = {"plain": f"items-{uuid.uuid4().hex[:6]}", "primed": f"primed-{uuid.uuid4().hex[:6]}"}
        for kind, source in (("plain", app), ("primed", FASTAPI_PRIMED_APP)):
            node.create_fastapi(names[kind], fastapi_package(source), isolation="per-call")
            first_ms[kind], answer = node.invoke(names[kind], API_EVENT)
            if not served(answer):
                raise SystemExit(f"the FastAPI function's first call ({kind}): {failure(answer)}")
            node.wait_until_forked(names[kind], API_EVENT, templates=len(first_ms))
        for _ in range(forked_n):  # alternating, so drift falls on both alike
            for kind, name in names.items():
                time.sleep(COLD_GAP_S)
                elapsed, answer = node.invoke(name, API_EVENT)
                if served(answer) and answer.get("start") == "forked":
                    forked[kind].append(elapsed)
                else:
                    tally(forked_other[kind], answer, served(answer))

    spared: list[float] = []
    spared_other: dict[str, int] = {}
    with Node(home / "fastapi-spares") as node:  # the default NIMBUS_PER_CALL_SPARES: forks made ahead
        name = f"spared-{uuid.uuid4().hex[:6]}"
        node.create_fastapi(name, fastapi_package(FASTAPI_PRIMED_APP), isolation="per-call")
        node.invoke(name, API_EVENT)
        node.wait_until_forked(name, API_EVENT)
        for _ in range(forked_n):
            node.wait_pool("spares", DEFAULT_SPARES)  # calls that arrive slower than forks are made
            elapsed, answer = node.invoke(name, API_EVENT)
            if served(answer) and answer.get("start") == "forked":
                spared.append(elapsed)
            else:
                tally(spared_other, answer, served(answer))

    booted_p50 = p50_ms(booted) if booted else None
    booted_row = {"value": booted_p50, "floor": floor_ms,
                  "ratio": None if booted_p50 is None else booted_p50 / floor_ms,
                  "samples": len(booted), "not_counted": booted_other, "node": "NIMBUS_FUNCTION_TEMPLATES=off",
                  "first_deploy_ms": ms(first_deploy), "cached_deploy_p50_ms": cached_deploy,
                  "requirements": FASTAPI_REQUIREMENTS.split()}
    if not booted:
        booted_row["note"] = f"no call answered 200: {booted_other}"
    rows = {"fastapi_booted_cold_start_p50_ms": booted_row}
    for kind, key in (("plain", "fastapi_forked_start_p50_ms"), ("primed", "fastapi_forked_primed_start_p50_ms")):
        got = forked[kind]
        if not got:
            rows[key] = {"value": None, "floor": floor_ms, "ratio": None, "samples": 0,
                         "not_counted": forked_other[kind], "note": f"no forked call answered 200: {forked_other[kind]}"}
            continue
        value = p50_ms(got)
        rows[key] = {
            "value": value, "floor": floor_ms, "ratio": value / floor_ms, "samples": len(got),
            "p90_ms": ms(statistics.quantiles(got, n=10)[8]), "not_counted": forked_other[kind],
            "booted_p50_ms": booted_p50, "speedup": None if booted_p50 is None else booted_p50 / value,
            "first_call_ms": ms(first_ms[kind]),
            "node": "per-call function, NIMBUS_PER_CALL_SPARES=0: every call forks on demand",
            "app": "as in docs/runtimes.md" if kind == "plain" else
                   "primed by a before-snapshot hook (snapshot_restore_py), as docs/runtimes.md shows"}
    if spared:
        value = p50_ms(spared)
        rows["fastapi_per_call_spare_p50_ms"] = {
            "value": value, "floor": floor_ms, "ratio": value / floor_ms, "samples": len(spared),
            "p90_ms": ms(statistics.quantiles(spared, n=10)[8]), "not_counted": spared_other,
            "booted_p50_ms": booted_p50, "speedup": None if booted_p50 is None else booted_p50 / value,
            "what": f"the primed app, per-call, each call on a fork made ahead ({DEFAULT_SPARES} spares; calls "
                    "wait until the spares are back, as arrivals slower than forks would find them)"}
    return rows


# ---------------------------------------------------------------- 2. per-call no-op


def throughput(url: str, conc: int) -> tuple[float, list[float], int, dict[str, int]]:
    """(calls/s, latencies, errors, starts) of ~THROUGHPUT_S seconds at ``conc``, sized by a first burst."""
    rate, _, _ = concurrent(url, BODY, conc * 10, conc)
    starts: dict[str, int] = {}
    rps, latencies, errors = concurrent(url, BODY, max(conc * 20, int(rate * THROUGHPUT_S)), conc, starts)
    return rps, latencies, errors, starts


def per_call(home: Path, floor_ms: float, n: int, cold_n: int) -> tuple[dict[str, dict], list[float]]:
    """Per-call no-op vs a shared no-op's hot calls vs a plain template cold start, on one node; the rows
    and the per-call latencies (for the histogram)."""
    with Node(home / "per-call", max_machines=cold_n + 48) as node:
        isolated, shared = f"pc-{uuid.uuid4().hex[:6]}", f"hot-{uuid.uuid4().hex[:6]}"
        node.create(isolated, isolation="per-call", concurrency=2 * CONCURRENCY)
        node.create(shared, concurrency=2 * CONCURRENCY)
        for name in (isolated, shared):
            _, answer = node.invoke(name)
            if answer.get("status") != "succeeded":
                raise SystemExit(f"{name}'s first call: {failure(answer)}")
        node.wait_until_forked(isolated)
        node.wait_pool("spares", DEFAULT_SPARES)
        samples: dict[str, list[float]] = {"per_call": [], "hot": [], "cold": []}
        other: dict[str, dict[str, int]] = {"per_call": {}, "hot": {}, "cold": {}}
        per_round = max(1, n // ROUNDS)
        for _ in range(ROUNDS):
            for kind, name, want in (("per_call", isolated, "forked"), ("hot", shared, "hot")):
                for _ in range(per_round):
                    elapsed, answer = node.invoke(name)
                    if answer.get("status") == "succeeded" and answer.get("start") == want:
                        samples[kind].append(elapsed)
                    else:
                        tally(other[kind], answer, answer.get("status") == "succeeded")
            for i in range(max(1, cold_n // ROUNDS)):
                name = f"cold-{uuid.uuid4().hex[:6]}-{i}"
                node.create(name, memory_mb=256)  # no blank machine has 256 MiB: a machine is made for it
                time.sleep(COLD_GAP_S)
                elapsed, answer = node.invoke(name)
                if answer.get("status") == "succeeded" and answer.get("start") == "cold":
                    samples["cold"].append(elapsed)
                else:
                    tally(other["cold"], answer, answer.get("status") == "succeeded")
        pc_rps, pc_lat, pc_err, pc_starts = throughput(f"{node.base}/api/v1/functions/{isolated}/invoke", CONCURRENCY)
        hot_rps, hot_lat, hot_err, hot_starts = throughput(f"{node.base}/api/v1/functions/{shared}/invoke", CONCURRENCY)
        pool = node.pool()
    for kind, got in samples.items():
        if not got:
            raise SystemExit(f"per-call run: no {kind} call counted: {other[kind]}")
    value, hot, cold = p50_ms(samples["per_call"]), p50_ms(samples["hot"]), p50_ms(samples["cold"])
    return {
        "per_call_p50_ms": {
            "value": value, "floor": hot, "ratio": value / hot, "samples": len(samples["per_call"]),
            "not_counted": other["per_call"], "p90_ms": ms(statistics.quantiles(samples["per_call"], n=10)[8]),
            "template_cold_p50_ms": cold, "template_cold_samples": len(samples["cold"]),
            "template_cold_not_counted": other["cold"], "hot_samples": len(samples["hot"]),
            "spares": DEFAULT_SPARES, "pool_after": pool,
            "floor_is": "the same node's hot p50 of a shared no-op function, in alternating rounds"},
        "per_call_template_cold_start_p50_ms": {
            "value": cold, "floor": floor_ms, "ratio": cold / floor_ms, "samples": len(samples["cold"]),
            "floor_is": "bare bwrap python3 start (the run's cold start floor)",
            "what": "first calls of fresh shared no-op functions at memory_mb 256 on the per-call node: "
                    "forked from the runtime template, then Init"},
        "per_call_throughput_rps_c8": {
            "value": pc_rps, "floor": hot_rps, "ratio": pc_rps / hot_rps, "errors": pc_err,
            "p50_ms": p50_ms(pc_lat), "p99_ms": p99_ms(pc_lat), "starts": pc_starts, "requests": len(pc_lat),
            "hot_p50_ms": p50_ms(hot_lat), "hot_p99_ms": p99_ms(hot_lat), "hot_errors": hot_err,
            "hot_starts": hot_starts, "concurrency": CONCURRENCY,
            "floor_is": "the same node's shared no-op function at the same concurrency"},
    }, samples["per_call"]


# ---------------------------------------------------------------- 3. memory


def _chain(pid: int) -> list[int]:
    """``pid`` and its single-child descendants: one fork (K1 → K2 → K3), if it is one."""
    out = [pid]
    while len(kids := children(out[-1])) == 1:
        out.append(kids[0])
    return out if not children(out[-1]) else []


def _runtime_template(pid: int) -> bool:
    return comm(pid) != "bwrap" and comm(parent(pid)) == "bwrap" and b"nimbus.agent.template" in cmdline(pid)


def function_templates(node_pid: int) -> list[tuple[list[int], list[list[int]]]]:
    """Each function template on the node: (its machine's processes, each fork's chain).

    Its agent is the process whose children are all forks (chains of three, the last childless) and
    which is not a runtime template; it was forked from one (or booted with ``--fork-fd``), so its own
    machine is everything from the child of the runtime template (or of the node) down, forks excluded.
    """
    out = []
    for pid in process_tree(node_pid):
        kids = children(pid)
        if pid == node_pid or not kids or _runtime_template(pid) or comm(pid) == "bwrap":
            continue
        chains = [_chain(k) for k in kids]
        if not all(len(c) == 3 for c in chains):
            continue
        top = pid
        while parent(top) not in (node_pid, 0) and not _runtime_template(parent(top)):
            top = parent(top)
        forked = {p for chain in chains for p in chain}
        out.append(([p for p in process_tree(top) if p not in forked], chains))
    return out


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Summed Pss, Rss and private (USS: pages no other process maps) of ``pids``, in KiB."""
    out = {"pss_kib": 0, "rss_kib": 0, "private_kib": 0}
    for pid in pids:
        roll = smaps_rollup(pid)
        out["pss_kib"] += roll.get("Pss", 0)
        out["rss_kib"] += roll.get("Rss", 0)
        out["private_kib"] += roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0)
    return out


def idle_memory(home: Path, forks: int = IDLE_FORKS) -> dict[str, dict]:
    """The FastAPI function's template and ``forks`` idle forks of it: the per-call spares, which ran nothing."""
    with Node(home / "memory", per_call_spares=forks) as node:
        name = f"items-{uuid.uuid4().hex[:6]}"
        node.create_fastapi(name, fastapi_package(), isolation="per-call")
        _, answer = node.invoke(name, API_EVENT)
        if not served(answer):
            raise SystemExit(f"the FastAPI function's first call: {failure(answer)}")
        node.wait_pool("spares", forks)
        time.sleep(0.5)  # the spares' own start-up settles
        found = function_templates(node.proc.pid)
        if len(found) != 1 or len(found[0][1]) != forks:
            raise SystemExit(f"expected one function template with {forks} forks, found "
                             f"{[(len(t), len(f)) for t, f in found]}")
        template_pids, chains = found[0]
        template = memory_kib(template_pids)
        each = [memory_kib(chain) for chain in chains]
        first = [memory_kib([pid]) for pid in chains[0]]
    mib = 1 / 1024
    fork_pss = [m["pss_kib"] * mib for m in each]
    fork_rss = [m["rss_kib"] * mib for m in each]
    t_pss, t_rss = template["pss_kib"] * mib, template["rss_kib"] * mib
    value = statistics.median(fork_pss)
    return {
        "function_template_pss_mib": {
            "value": t_pss, "rss_mib": t_rss, "rss_minus_pss_mib": t_rss - t_pss,
            "private_mib": template["private_kib"] * mib, "processes": len(template_pids),
            "forks_alive": forks, "what": "the FastAPI function's template machine (its chain under the runtime "
                                          "template), its forks excluded, beside its idle forks"},
        "function_template_fork_pss_mib": {
            "value": value, "floor": t_pss, "ratio": value / t_pss, "forks": forks,
            "pss_mib_each": [round(p, 2) for p in fork_pss], "rss_mib_each": [round(r, 2) for r in fork_rss],
            "rss_minus_pss_mib_median": statistics.median(r - p for r, p in zip(fork_rss, fork_pss, strict=True)),
            "private_mib_each": [round(m["private_kib"] * mib, 2) for m in each],
            "first_fork_by_process_kib": {k: m for k, m in zip(("K1", "K2", "K3 agent"), first, strict=True)},
            "processes_per_fork": 3, "forks_are": "per-call spares (NIMBUS_PER_CALL_SPARES), idle, ran no call",
            "floor_is": "the template's PSS, same node"},
    }


def measure(home: Path, floor_ms: float, *, requests: int, cold: int) -> tuple[dict[str, dict], list[float]]:
    """Every row of this module, in report order, and the per-call latencies."""
    print("function templates: FastAPI + Mangum, booted + Init vs forked ...", flush=True)
    rows = fastapi_cold_starts(home, floor_ms, max(20, cold))
    print("function templates: per-call no-op beside hot calls and template cold starts, one node ...", flush=True)
    more, per_call_samples = per_call(home, floor_ms, requests, cold)
    rows.update(more)
    print("function templates: idle memory of a template and its forks ...", flush=True)
    rows.update(idle_memory(home))
    return rows, per_call_samples
