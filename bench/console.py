"""The console row of issue 22: every console page's server time on a store of 1,000 functions and 100,000
invocations, beside a floor measured in the same run.

A fresh store (SQLite, and PostgreSQL when ``NIMBUS_BENCH_PG`` answers) is migrated by ``Store.open`` and
seeded in bulk straight through SQLAlchemy Core: 1,000 python3 functions of the admin's tenant, and 100,000
finished invocations spread over the last 24 h (small events, outputs and logs; ~2 % failed, a skew towards
a few busy functions), plus 20 async calls queued for next year (rows in the queue the node will not run).
PostgreSQL is then ANALYZEd, as its autovacuum soon would be; SQLite gets no statistics, as in a node.

A real node (``nimbus up``, auth on) serves it; the bench signs in as an admin (who sees the most: the
tenant's figures and the node's), asks every page ``WARMUP`` times, then ``REPEATS`` rounds of each page in
turn, and reads ``Server-Timing: app;dur=`` (the console's own measure, from the request reaching its route
to the response being built: the session look-up, the queries and the template). The floor is the node's
``/health`` (a request through the same server and a store ping), timed at the client; a page answering
404 (not built yet) is left out with a note.

``python -m bench.console`` prints the rows; ``python -m bench --only console`` does the same.
"""

import asyncio
import json
import random
import re
import statistics
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx

from bench.common import NOOP_CODE, free_port, start_node, stop, wait_http

FUNCTIONS = 1_000
INVOCATIONS = 100_000
QUEUED = 20
CHUNK = 5_000
WARMUP = 3
REPEATS = 30
GOAL_MS = 100.0
PREFIXES = ("orders", "billing", "thumbs", "auth", "search")
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
TIMING = re.compile(r"app;dur=([0-9.]+)")


def _sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / 'nimbus.db'}"


async def seed(url: str, *, seed_value: int = 22) -> dict:
    """Make the admin key, the functions and the invocations; what the pages will be asked about."""
    import hashlib

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    from nimbus.gateway import auth
    from nimbus.store import Store, tables
    from nimbus.store.database import normalise_url
    from nimbus.store.records import utcnow

    store = await Store.open(url)  # migrates
    key = auth.new_key()
    try:
        await store.create_api_key(tenant="default", name="bench-admin", key_hash=auth.hash_key(key), admin=True,
                                   prefix=auth.display_prefix(key))
    finally:
        await store.close()

    draw = random.Random(seed_value)
    now = utcnow()
    code = NOOP_CODE.encode()
    sha = hashlib.sha256(code).hexdigest()
    names = [f"{PREFIXES[i % len(PREFIXES)]}-{i:04d}" for i in range(FUNCTIONS)]
    fn_ids = [uuid.uuid4().hex for _ in names]
    version_ids = [uuid.uuid4().hex for _ in names]
    made = now - timedelta(days=7)
    functions = [{"id": fid, "tenant": "default", "name": name, "version": 1, "created_at": made, "updated_at": made}
                 for fid, name in zip(fn_ids, names, strict=True)]
    versions = [{"id": vid, "function_id": fid, "version": 1, "runtime": "python3", "handler": "main.handler",
                 "env": {"STAGE": "bench"}, "memory_mb": 128, "timeout_s": 30.0, "concurrency": 10,
                 "code_sha256": sha, "code_size": len(code), "code_kind": "source", "created_at": made}
                for fid, vid in zip(fn_ids, version_ids, strict=True)]

    def invocation(k: int, ago_s: float, **values) -> dict:
        i = min(FUNCTIONS - 1, int(FUNCTIONS * draw.random() ** 3))  # a few busy functions, a long tail
        created = now - timedelta(seconds=ago_s)
        duration = draw.lognormvariate(1.0, 1.1)
        failed = draw.random() < 0.02
        row = {"id": uuid.uuid4().hex, "function_id": fn_ids[i], "function_name": names[i], "tenant": "default",
               "version": 1, "version_id": version_ids[i], "mode": "async" if k % 20 == 0 else "sync",
               "status": "failed" if failed else "succeeded",
               "start": draw.choices(("hot", "warm", "cold", "forked"), (90, 6, 2, 2))[0],
               "event": json.dumps({"order": k, "items": [draw.randrange(100) for _ in range(5)]}).encode(),
               "output": json.dumps({"ok": not failed, "total": round(draw.random() * 100, 2)}).encode(),
               "error": {"type": "ValueError", "message": f"order {k} has no items",
                         "stack": ['  File "/var/task/main.py", line 2, in handler']} if failed else None,
               "logs": f"START order {k}\nprocessed {draw.randrange(10)} items\nEND\n", "duration_ms": duration,
               "created_at": created, "started_at": created, "finished_at": created + timedelta(milliseconds=duration),
               "attempts": 1}
        row.update(values)
        return row

    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.begin() as conn:
            await conn.execute(tables.artifacts.insert().values(sha256=sha, runtime="python3", size=len(code),
                                                                content=code, created_at=made))
            await conn.execute(tables.functions.insert(), functions)
            await conn.execute(tables.function_versions.insert(), versions)
        for start in range(0, INVOCATIONS, CHUNK):
            rows = [invocation(k, draw.random() * 86_400) for k in range(start, min(INVOCATIONS, start + CHUNK))]
            async with engine.begin() as conn:
                await conn.execute(tables.invocations.insert(), rows)
        queued = [invocation(k, 5.0, mode="async", status="queued", start=None, output=None, error=None, logs="",
                             duration_ms=None, started_at=None, finished_at=None, attempts=0,
                             not_before=now + timedelta(days=365)) for k in range(QUEUED)]
        async with engine.begin() as conn:
            await conn.execute(tables.invocations.insert(), queued)
            if conn.dialect.name == "postgresql":  # what autovacuum does after a bulk load, without the wait
                await conn.execute(sa.text("ANALYZE"))
            newest = (await conn.execute(
                sa.select(tables.invocations.c.id).where(tables.invocations.c.function_id == fn_ids[0])
                .order_by(tables.invocations.c.created_at.desc()).limit(1))).scalar_one()
    finally:
        await engine.dispose()
    return {"key": key, "function": names[0], "invocation": newest, "search": PREFIXES[1]}


def pages(seeded: dict) -> dict[str, tuple[str, dict]]:
    """Row key -> (path, extra headers)."""
    fn = seeded["function"]
    htmx = {"HX-Request": "true"}
    return {
        "overview": ("/console/", {}),
        "overview_figures": ("/console/overview/figures", htmx),
        "functions": ("/console/functions", {}),
        "functions_search": (f"/console/functions?q={seeded['search']}", {}),
        "function": (f"/console/functions/{fn}", {}),
        "invocation": (f"/console/invocations/{seeded['invocation']}", {}),
        "invoke": (f"/console/invoke?function={fn}", {}),
        "deploy": ("/console/deploy", {}),
        "deploy_update": (f"/console/deploy?function={fn}", {}),
        "layers": ("/console/layers", {}),
        "keys": ("/console/keys", {}),
    }


def sign_in(base: str, key: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=30, follow_redirects=False, headers={"Accept": "text/html"})
    login = client.get("/console/login")
    match = CSRF.search(login.text)
    if match is None:
        raise RuntimeError(f"no CSRF token on the login page ({login.status_code})")
    answer = client.post("/console/login", data={"key": key, "csrf": match.group(1)})
    if answer.status_code != 303:
        raise RuntimeError(f"signing in: {answer.status_code} {answer.text[:200]}")
    return client


def timed(client: httpx.Client, path: str, headers: dict) -> tuple[float, float, int]:
    """(server ms, client ms, status) of one GET."""
    began = time.perf_counter()
    r = client.get(path, headers=headers)
    spent = (time.perf_counter() - began) * 1000
    if r.status_code != 200:
        return 0.0, spent, r.status_code
    match = TIMING.search(r.headers.get("server-timing", ""))
    if match is None:
        raise RuntimeError(f"{path}: no Server-Timing header")
    return float(match.group(1)), spent, r.status_code


def rounds(client: httpx.Client, asked: dict[str, tuple[str, dict]]) -> dict[str, tuple[list, list, int]]:
    """Every page ``WARMUP`` times, then ``REPEATS`` rounds of one GET of each page in turn, so whatever
    else the node does meanwhile (its pre-warm, the retention sweep) falls on every page alike."""
    found: dict[str, tuple[list, list, int]] = {name: ([], [], 200) for name in asked}
    for name, (path, headers) in asked.items():
        for _ in range(WARMUP):
            status = timed(client, path, headers)[2]
            if status != 200:
                found[name] = ([], [], status)
                break
    for _ in range(REPEATS):
        for name, (path, headers) in asked.items():
            server, wall, status = found[name]
            if status != 200:
                continue
            one = timed(client, path, headers)
            if one[2] != 200:
                found[name] = ([], [], one[2])
                continue
            server.append(one[0])
            wall.append(one[1])
    return found


def measure_on(home: Path, url: str, kind: str) -> dict[str, dict]:
    print(f"console: seeding {FUNCTIONS:,} functions and {INVOCATIONS:,} invocations ({kind}) ...", flush=True)
    began = time.monotonic()
    seeded = asyncio.run(seed(url))
    seed_s = time.monotonic() - began
    port = free_port()
    node = start_node(port, home, database_url=url, auth="on", runtimes="python3", min_warm=1,
                      retention_max_count=0)  # the sweep keeps all 100,000 rows
    base = f"http://127.0.0.1:{port}"
    rows: dict[str, dict] = {}
    try:
        wait_http(f"{base}/health")
        with httpx.Client(base_url=base, timeout=30) as plain:
            for _ in range(WARMUP):
                plain.get("/health")
            floor = []
            for _ in range(REPEATS):
                began_s = time.perf_counter()
                plain.get("/health")
                floor.append((time.perf_counter() - began_s) * 1000)
        floor_ms = statistics.median(floor)
        client = sign_in(base, seeded["key"])
        try:
            asked = pages(seeded)
            for name, (server, wall, status) in rounds(client, asked).items():
                key, path = f"console_{name}_ms_{kind}", asked[name][0]
                if not server:
                    why = "not built yet" if status == 404 else "failed"
                    rows[key] = {"value": None, "note": f"HTTP {status} ({why})", "path": path}
                    continue
                p50, worst = statistics.median(server), max(server)
                rows[key] = {"value": p50, "floor": floor_ms, "ratio": statistics.median(wall) / floor_ms,
                             "max_ms": worst, "client_p50_ms": statistics.median(wall), "samples": len(server),
                             "path": path, "goal": f"max < {GOAL_MS:.0f} ms", "met": worst < GOAL_MS,
                             "store": kind, "seed_s": seed_s}
        finally:
            client.close()
    finally:
        stop(node)
    return rows


def measure(home: Path | None = None, *, postgres: bool = True) -> dict[str, dict]:
    """The console rows on SQLite, and on PostgreSQL when it answers."""
    home = home or Path(tempfile.mkdtemp(prefix="nimbus-bench-console-"))
    home.mkdir(parents=True, exist_ok=True)
    rows = measure_on(home / "sqlite", _sqlite_url(home / "sqlite"), "sqlite")
    if postgres:
        from bench import cluster

        why = cluster.missing()
        if why is not None:
            rows["console_overview_ms_postgres"] = {"value": None, "note": why}
        else:
            with cluster.database() as url:
                rows.update(measure_on(home / "postgres", url, "postgres"))
    return rows


def details(rows: dict[str, dict]) -> list[str]:
    out = []
    for key, row in rows.items():
        if row.get("value") is None:
            out.append(f"{key}: {row.get('note')} ({row.get('path', '')}); the lead re-runs it once the page exists")
        else:
            out.append(f"{key}: GET {row['path']} server p50 {row['value']:.2f} ms, max {row['max_ms']:.2f} ms, "
                       f"client p50 {row['client_p50_ms']:.2f} ms over {row['samples']} requests")
    if any(row.get("value") is not None for row in rows.values()):
        first = next(row for row in rows.values() if row.get("value") is not None)
        out.append(f"console: {FUNCTIONS:,} functions, {INVOCATIONS:,} invocations over 24 h (+{QUEUED} queued) in "
                   f"the admin's tenant, seeded in {first['seed_s']:.0f} s; value = Server-Timing app;dur p50, goal on "
                   f"its max; floor = the node's /health p50 at the client; ratio = the page's client p50 / floor")
    return out


def main() -> None:
    from bench import report

    rows = measure()
    print()
    print(report.render(rows))
    print()
    print("\n".join(details(rows)))


if __name__ == "__main__":
    main()
