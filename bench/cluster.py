"""The cluster rows of issue 21, measured in one run: nodes sharing one fresh PostgreSQL database, behind
HAProxy on the configuration ``nimbus.cluster.haproxy.render`` writes.

- ``cluster_hop_p50_ms_c1``: warm p50 at c=1 through HAProxy vs straight to the node it routes to;
- ``cluster_rps_c32``: req/s at c=32 (wrk) over 50 functions round-robin, two nodes behind HAProxy vs one
  node called straight;
- ``cluster_hot_share``: the share of hot starts over 50 fresh functions round-robin through HAProxy,
  consistent hashing (the rendered configuration) vs ``balance roundrobin`` (the same text with its two
  balance lines swapped), nodes holding fewer machines than there are functions;
- ``cluster_async_pickup_p50_ms`` / ``_p90_ms``: async calls submitted to node A while A has no free worker
  (``NIMBUS_WORKERS=1``, held by a long sync call), so node B picks them up, created_at -> started_at,
  ``NIMBUS_NOTIFY=on`` vs ``off`` (B then finds them by its poll, ``NIMBUS_ASYNC_POLL_S=1``).
"""

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench import wrk
from bench.common import NOOP_CODE, free_port, p50_ms, start_node, stop, wait_http
from bench.loadgen import sequential

PG_ADMIN_DSN = os.environ.get("NIMBUS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
CONCURRENCY = 32
FUNCTIONS = 50
UID_BASE, UID_STEP = 0x70000000, 0x100000
# Per node: room for its half of the functions at the concurrency wrk -c32 gives each (about two machines
# each), not for all of them: hashing fits, round-robin (every function on both nodes) must evict.
SMALL_NODE_MACHINES = 80
PICKUPS = 30
POLL_S = 1.0
HASH_LINES = ("    balance hash var(txn.function)\n    hash-type consistent\n")
KEYS = ("cluster_hop_p50_ms_c1", "cluster_rps_c32", "cluster_hot_share", "cluster_async_pickup_p50_ms",
        "cluster_async_pickup_p90_ms")
WHOAMI = "import os\n\ndef handler(event, context):\n    return os.getuid()\n"  # says which node ran it
SLEEPER = "import time\n\ndef handler(event, context):\n    time.sleep(event.get('sleep', 0))\n    return event\n"


def _sql(dsn: str, query: str, *args) -> list:
    import asyncpg

    async def run():
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def missing() -> str | None:
    """Why the cluster rows cannot be measured here, or None."""
    if shutil.which("haproxy") is None:
        return "haproxy missing (apt-get install haproxy)"
    try:
        _sql(PG_ADMIN_DSN, "SELECT 1")
    except Exception as exc:  # any failure to reach it means the same: no PostgreSQL to share
        return f"no PostgreSQL at {PG_ADMIN_DSN}: {exc.__class__.__name__}"
    return None


@contextmanager
def database() -> Iterator[str]:
    """A fresh database the nodes share, dropped afterwards."""
    name = f"nimbus_bench_{uuid.uuid4().hex[:12]}"
    _sql(PG_ADMIN_DSN, f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    finally:
        _sql(PG_ADMIN_DSN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Fleet:
    """Nodes on one database, each with its own home, port and machine uids."""

    def __init__(self, home: Path, database_url: str) -> None:
        self.home, self.database_url = home, database_url
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []

    def add(self, **settings: object) -> str:
        index, port = len(self.procs), free_port()
        url = f"http://127.0.0.1:{port}"
        self.procs.append(start_node(port, self.home / f"node-{index}-{uuid.uuid4().hex[:6]}",
                                     database_url=self.database_url, runtimes="python3", advertise_url=url,
                                     machine_uid_base=UID_BASE + index * UID_STEP, machine_uid_count=UID_STEP,
                                     **settings))
        self.urls.append(url)
        wait_http(f"{url}/health")
        return url

    def close(self) -> None:
        stop(*self.procs)


@contextmanager
def balancer(home: Path, urls: list[str], roundrobin: bool = False) -> Iterator[str]:
    """HAProxy in the foreground on the rendered configuration (``roundrobin``: its hash lines swapped)."""
    from nimbus.cluster.haproxy import render

    port = free_port()
    text = render(servers=urls, bind=f"127.0.0.1:{port}")
    if roundrobin:
        if HASH_LINES not in text:
            raise RuntimeError("the rendered configuration has no 'balance hash' lines to swap")
        text = text.replace(HASH_LINES, "    balance roundrobin\n")
    config = home / f"haproxy-{port}.cfg"
    config.write_text(text)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health")
        yield url
    finally:
        stop(proc)


def create(base: str, name: str, code: str = NOOP_CODE, **fields) -> None:
    r = httpx.post(f"{base}/api/v1/functions", timeout=60,
                   json={"name": name, "runtime": "python3", "code": code, **fields})
    if r.status_code != 201:
        raise RuntimeError(f"creating {name}: {r.status_code} {r.text[:300]}")


def functions(base: str, prefix: str) -> list[str]:
    names = [f"{prefix}-{uuid.uuid4().hex[:6]}-{i}" for i in range(FUNCTIONS)]
    for name in names:
        create(base, name)
    return [f"/api/v1/functions/{name}/invoke" for name in names]


def hop_and_throughput(home: Path, database_url: str, body: bytes, seconds: float, requests: int) -> dict[str, dict]:
    fleet = Fleet(home, database_url)
    max_machines = FUNCTIONS * 3 + CONCURRENCY
    try:
        one = fleet.add(max_machines=max_machines)
        paths = functions(one, "one")
        wrk.run(one, body, CONCURRENCY, 4, paths=paths, warmup_s=0)  # every function's machines made
        alone = wrk.run(one, body, CONCURRENCY, seconds, paths=paths, warmup_s=0)
        with balancer(home, fleet.urls) as lb:  # the same node behind HAProxy: the hop's share of the ratio
            alone_lb = wrk.run(lb, body, CONCURRENCY, seconds, paths=paths)
        fleet.add(max_machines=max_machines)
        with balancer(home, fleet.urls) as lb:
            # The hop: one function, called straight on the node HAProxy sends it to, then through HAProxy.
            name = f"hop-{uuid.uuid4().hex[:6]}"
            create(lb, name, code=WHOAMI)
            uid = httpx.post(f"{lb}/api/v1/functions/{name}/invoke", content=body, timeout=60).json()["output"]
            node = fleet.urls[(uid - UID_BASE) // UID_STEP]
            direct = sequential(f"{node}/api/v1/functions/{name}/invoke", body, requests)
            through = sequential(f"{lb}/api/v1/functions/{name}/invoke", body, requests)
            direct2 = sequential(f"{node}/api/v1/functions/{name}/invoke", body, requests)  # drift check
            paths2 = functions(lb, "two")
            wrk.run(lb, body, CONCURRENCY, 4, paths=paths2, warmup_s=0)
            cpus = [wrk.tree_cpu_s(p.pid) for p in fleet.procs]
            both = wrk.run(lb, body, CONCURRENCY, seconds, paths=paths2, warmup_s=0)
            cpus = [wrk.tree_cpu_s(p.pid) - c for p, c in zip(fleet.procs, cpus, strict=True)]
    finally:
        fleet.close()
    d, t = p50_ms(direct + direct2), p50_ms(through)
    return {
        "cluster_hop_p50_ms_c1": {"value": t, "floor": d, "ratio": t / d, "samples": requests,
                                  "direct_first_p50_ms": p50_ms(direct), "direct_after_p50_ms": p50_ms(direct2),
                                  "floor_is": "the same function called straight on the node HAProxy routes it to"},
        "cluster_rps_c32": {"value": both.rps, "floor": alone.rps, "ratio": both.rps / alone.rps,
                            "errors": both.error_count, "floor_errors": alone.error_count,
                            "p99_ms": both.p(99), "floor_p99_ms": alone.p(99), "one_node_via_haproxy_rps": alone_lb.rps,
                            "node_cpu_s": [round(c, 1) for c in cpus], "seconds": both.seconds,
                            "floor_is": f"one node called straight, {FUNCTIONS} functions round-robin, wrk -c32"},
    }


def hot_share(home: Path, database_url: str, body: bytes, seconds: float) -> dict[str, dict]:
    fleet = Fleet(home, database_url)
    try:
        for _ in range(2):
            fleet.add(max_machines=SMALL_NODE_MACHINES)
        shares = {}
        for roundrobin in (False, True):
            with balancer(home, fleet.urls, roundrobin=roundrobin) as lb:
                paths = functions(lb, "rr" if roundrobin else "hash")  # fresh: each kind starts from nothing
                wrk.run(lb, body, CONCURRENCY, 4, paths=paths, warmup_s=0)  # past the first calls' cold starts
                counted = wrk.run(lb, body, CONCURRENCY, seconds, paths=paths, count_starts=True, warmup_s=0)
                shares[roundrobin] = (counted.hot_share(), counted.starts)
    finally:
        fleet.close()
    (hashed, hashed_starts), (rr, rr_starts) = shares[False], shares[True]
    return {"cluster_hot_share": {
        "value": hashed, "floor": rr, "ratio": hashed / rr if hashed is not None and rr else None,
        "starts": hashed_starts, "floor_starts": rr_starts, "max_machines_per_node": SMALL_NODE_MACHINES,
        "floor_is": "the same text with 'balance hash …/hash-type consistent' swapped for 'balance roundrobin'"}}


def pickups(home: Path, database_url: str, notify: str) -> list[float]:
    """Seconds from created_at to started_at of PICKUPS async calls B must take from busy A."""
    fleet = Fleet(home, database_url)
    common = {"notify": notify, "async_poll_s": POLL_S, "heartbeat_s": 1.0}
    try:
        a = fleet.add(workers=1, **common)
        fleet.add(**common)  # B: the node that must pick the calls up
        blocker, work = f"block-{uuid.uuid4().hex[:6]}", f"pick-{uuid.uuid4().hex[:6]}"
        create(a, blocker, code=SLEEPER, timeout_s=120)
        create(a, work)
        busy_s = PICKUPS * 0.25 + 10
        held = threading.Thread(target=lambda: httpx.post(f"{a}/api/v1/functions/{blocker}/invoke",
                                                          json={"sleep": busy_s}, timeout=busy_s + 60), daemon=True)
        held.start()
        deadline = time.monotonic() + 30
        while not _in_flight(a):  # A's heartbeat reports the held call
            if time.monotonic() > deadline:
                raise RuntimeError("node A never reported its long call in flight")
            time.sleep(0.1)
        ids = []
        rng = random.Random(21)
        with httpx.Client(base_url=a, timeout=30) as client:
            for i in range(PICKUPS):
                time.sleep(rng.uniform(0.05, 0.3))  # arrivals spread over the poll's phase
                r = client.post(f"/api/v1/functions/{work}/async", json={"i": i})
                if r.status_code != 202:
                    raise RuntimeError(f"async call refused: {r.status_code} {r.text[:200]}")
                ids.append(r.json()["invocation_id"])
        deadline = time.monotonic() + 60
        while True:
            rows = _sql(database_url, "SELECT created_at, started_at, lease_owner, status FROM invocations "
                                      "WHERE id = ANY($1)", ids)
            if all(row["status"] == "succeeded" for row in rows) and len(rows) == len(ids):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"async calls not finished: {[row['status'] for row in rows]}")
            time.sleep(0.2)
        held.join(busy_s + 60)
    finally:
        fleet.close()
    return [(row["started_at"] - row["created_at"]).total_seconds() for row in rows]


def _in_flight(base: str) -> bool:
    return any(node.get("self") and node.get("in_flight", 0) > 0
               for node in httpx.get(f"{base}/api/v1/nodes").json()["nodes"])


def _p90_ms(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=10)[8] * 1000


def pickup_rows(home: Path, database_url: str) -> dict[str, dict]:
    on = pickups(home, database_url, "on")
    off = pickups(home, database_url, "off")
    context = {"samples": len(on), "floor_samples": len(off), "poll_s": POLL_S,
               "floor_is": "NIMBUS_NOTIFY=off: node B finds the calls by its poll"}
    return {
        "cluster_async_pickup_p50_ms": {"value": p50_ms(on), "floor": p50_ms(off), "ratio": p50_ms(on) / p50_ms(off),
                                        **context},
        "cluster_async_pickup_p90_ms": {"value": _p90_ms(on), "floor": _p90_ms(off),
                                        "ratio": _p90_ms(on) / _p90_ms(off), **context},
    }


def measure(body: bytes, seconds: float, requests: int, home: Path | None = None) -> dict[str, dict]:
    """Every cluster row, in the table's order; rows that cannot be measured here say why."""
    why = missing()
    if why is not None:
        return {key: {"value": None, "note": why} for key in KEYS}
    home = home or Path(tempfile.mkdtemp(prefix="nimbus-bench-cluster-"))
    rows: dict[str, dict] = {}
    with database() as url:
        if wrk.find() is None:
            rows.update({key: {"value": None, "note": wrk.MISSING} for key in KEYS[:3]})
        else:
            print("cluster: HAProxy's hop, and two nodes vs one at c=32 ...", flush=True)
            rows.update(hop_and_throughput(home / "load", url, body, seconds, requests))
            print("cluster: hot-hit rate, consistent hashing vs round-robin ...", flush=True)
            rows.update(hot_share(home / "affinity", url, body, seconds))
        print("cluster: async pick-up by another node, NOTIFY on vs off ...", flush=True)
        rows.update(pickup_rows(home / "pickup", url))
    return rows


def details(rows: dict[str, dict]) -> list[str]:
    """Each cluster row's context, for the report's second part."""
    out = []
    hop = rows.get("cluster_hop_p50_ms_c1")
    if hop and hop.get("value") is not None:
        out.append(f"cluster hop: {hop['samples']} sequential calls each; floor = {hop['floor_is']} (p50 before "
                   f"{hop['direct_first_p50_ms']:.3f} ms, after {hop['direct_after_p50_ms']:.3f} ms)")
    rps = rows.get("cluster_rps_c32")
    if rps and rps.get("value") is not None:
        out.append(f"cluster c=32: two nodes behind HAProxy, {rps['errors']} errors, p99 {rps['p99_ms']:.1f} ms, "
                   f"node CPU s over the run {rps['node_cpu_s']}; floor = {rps['floor_is']} ({rps['floor_errors']} "
                   f"errors, p99 {rps['floor_p99_ms']:.1f} ms); that one node behind HAProxy: "
                   f"{rps['one_node_via_haproxy_rps']:.0f} req/s")
    hot = rows.get("cluster_hot_share")
    if hot and hot.get("value") is not None:
        out.append(f"cluster hot-hit: two nodes of max_machines {hot['max_machines_per_node']}, {FUNCTIONS} fresh "
                   f"functions each way, wrk -c32 for 4 s, then counted; starts {hot['starts']}; floor = {hot['floor_is']}, "
                   f"starts {hot['floor_starts']}")
    pick = rows.get("cluster_async_pickup_p50_ms")
    if pick and pick.get("value") is not None:
        out.append(f"cluster async pick-up: {pick['samples']} calls each way, created_at -> started_at, taken by "
                   f"node B while node A's one worker is held; floor = {pick['floor_is']} every {pick['poll_s']:g} s")
    return out
