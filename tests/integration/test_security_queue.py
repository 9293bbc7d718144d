"""Security review (issue 15): the async queue is shared fairly between tenants, and what the store keeps
of invocations is bounded (retention by age and count, a byte budget per tenant), on SQLite and PostgreSQL.

Findings: 4 (one tenant's async backlog stalled every tenant's async calls), 7 (stored invocations had no
quota and no retention).
"""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from nimbus.gateway import auth
from nimbus.store import InvocationRecord, Store

pytestmark = pytest.mark.sandbox

FINISHED = {"succeeded", "failed", "timed_out"}
SLOW = "import time\ndef handler(event, context):\n    time.sleep(event.get('s', 0.5))\n    return event.get('n')\n"
NOOP = "def handler(event, context):\n    return 'done'\n"
ECHO = "def handler(event, context):\n    return event\n"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def in_store(url: str, use):
    """``use(store)`` on a store of one's own over the node's database (the node runs on its own loop)."""
    async def run():
        store = await Store.open(url)
        try:
            return await use(store)
        finally:
            await store.close()

    return asyncio.run(run())


def tenant_keys(url: str, *tenants: str) -> list[str]:
    """A fresh API key for each tenant, put straight into the store (any database: no first admin key needed)."""
    keys = [auth.new_key() for _ in tenants]

    async def make(store):
        for tenant, key in zip(tenants, keys, strict=True):
            await store.create_api_key(tenant=tenant, name="t", key_hash=auth.hash_key(key),
                                       prefix=auth.display_prefix(key))

    in_store(url, make)
    return keys


def client(running, key: str) -> httpx.Client:
    return running.client(headers={"Authorization": f"Bearer {key}"})


def deploy(api: httpx.Client, name: str, code: str, **settings) -> None:
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": code, **settings})
    assert resp.status_code == 201, resp.text


def wait_until(check, seconds: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} not reached within {seconds} s"
        time.sleep(0.05)
    return result


def statuses(api: httpx.Client, name: str) -> list[str]:
    resp = api.get(f"/api/v1/functions/{name}/invocations", params={"limit": 1000})
    assert resp.status_code == 200, resp.text
    return [inv["status"] for inv in resp.json()["invocations"]]


# ---------------------------------------------------------------- finding 4


def test_f4_one_tenants_backlog_does_not_stall_another(make_node, tmp_path, database_url):
    """Tenant A's 40 queued calls to a slow concurrency-1 function must not stand in front of tenant B's
    call: the node claims no more of A's calls than A's function can start, and takes tenants in turn.

    Before the fix the node claimed the 8 oldest (all A's) into its 8 workers, where they waited for A's
    one slot, and claimed B's call only once 32 of A's had finished."""
    key_a, key_b = tenant_keys(database_url, unique("tenant-a"), unique("tenant-b"))
    slow, noop = unique("slow"), unique("noop")
    with make_node(tmp_path / "home", database_url, auth="on", runtimes=["python3"], workers=8,
                   async_poll_s=0.2) as running, client(running, key_a) as a, client(running, key_b) as b:
        deploy(a, slow, SLOW, concurrency=1, max_retries=0)
        deploy(b, noop, NOOP)
        for n in range(40):
            resp = a.post(f"/api/v1/functions/{slow}/async", json={"n": n, "s": 0.5})
            assert resp.status_code == 202, resp.text
        wait_until(lambda: "running" in statuses(a, slow), what="tenant A's backlog being worked on")

        resp = b.post(f"/api/v1/functions/{noop}/async", json={})
        assert resp.status_code == 202, resp.text
        location = resp.headers["location"]
        done = wait_until(lambda: (r := b.get(location).json())["status"] in FINISHED and r, what="B's call")
        assert done["status"] == "succeeded", done
        left = [s for s in statuses(a, slow) if s not in FINISHED]
        assert len(left) >= 30, f"B's call waited behind A's backlog: only {len(left)} of A's 40 were left"
        # A's backlog still drains, one at a time, and never more than one of its calls is held at once.
        running_now = max(statuses(a, slow).count("running") for _ in range(20))
        assert running_now <= 1
        wait_until(lambda: all(s in FINISHED for s in statuses(a, slow)), what="A's backlog draining")
        assert statuses(a, slow) == ["succeeded"] * 40


async def test_f4_a_claim_takes_what_each_function_can_start_and_tenants_in_turn(database_url):
    """The store's side of finding 4, with a second claimer as another node sharing the database.

    Before the fix a claim of 3 took the 3 oldest calls, all of function a1."""
    store, other = await Store.open(database_url), await Store.open(database_url)
    made = {}
    try:
        tenant_a, tenant_b = unique("ta"), unique("tb")
        for label, tenant, concurrency in (("a1", tenant_a, 2), ("a2", tenant_a, 2), ("b", tenant_b, 5)):
            made[label] = await store.create_function(
                name=unique(label), runtime="python3", handler="main.handler", env={}, memory_mb=128,
                timeout_s=30.0, concurrency=concurrency, code=b"def handler(e, c):\n    return 1\n",
                code_kind="source", tenant=tenant)
        label_of = {fn.id: label for label, fn in made.items()}
        base = datetime.now(UTC) - timedelta(minutes=5)
        queued = {label: [] for label in made}
        for i, label in enumerate(["a1"] * 20 + ["a2"] * 20 + ["b"] * 2):  # b's two calls are the newest
            fn = made[label]
            inv = InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, tenant=fn.tenant,
                                   version=fn.version, version_id=fn.version_id, mode="async", event=b"{}",
                                   created_at=base + timedelta(milliseconds=i))
            await store.insert_invocation(inv)
            queued[label].append(inv.id)

        async def claim(claimer, limit, **busy):
            got = await claimer.claim_async(unique("node"), limit=limit, lease_s=60,
                                            busy={made[label].id: n for label, n in busy.items()})
            return sorted((label_of[inv.function_id], inv.id) for inv in got if inv.function_id in label_of)

        # Tenants in turn (b's newest call before a's second), each function's oldest first.
        assert await claim(store, 3) == sorted([("a1", queued["a1"][0]), ("a2", queued["a2"][0]),
                                                ("b", queued["b"][0])])
        # Holding one of each: a1 and a2 have one slot left, b has four but only one call queued.
        assert await claim(store, 100, a1=1, a2=1, b=1) == sorted([("a1", queued["a1"][1]), ("a2", queued["a2"][1]),
                                                                  ("b", queued["b"][1])])
        # Every slot taken: nothing, however large the limit.
        assert await claim(store, 100, a1=2, a2=2, b=2) == []
        # Busy counts are per node: another node runs its own two of each.
        assert await claim(other, 100) == sorted([("a1", queued["a1"][2]), ("a1", queued["a1"][3]),
                                                  ("a2", queued["a2"][2]), ("a2", queued["a2"][3])])
    finally:
        for fn in made.values():
            await store.delete_function(fn.id, fn.tenant)
        await store.close()
        await other.close()


# ---------------------------------------------------------------- finding 7


def _row(fn, *, age: timedelta, mode: str = "sync", status: str = "succeeded", **values) -> InvocationRecord:
    return InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, tenant=fn.tenant,
                            version=fn.version, version_id=fn.version_id, mode=mode, status=status,
                            created_at=datetime.now(UTC) - age, **values)


async def _function(store: Store, tenant: str = "default"):
    return await store.create_function(
        name=unique("f"), runtime="python3", handler="main.handler", env={}, memory_mb=128, timeout_s=30.0,
        concurrency=4, code=b"def handler(e, c):\n    return 1\n", code_kind="source", tenant=tenant)


async def test_f7_the_sweep_deletes_old_and_excess_finished_invocations_never_queued_ones(empty_database_url):
    """Before the fix nothing ever deleted an invocation but deleting its function."""
    store, other = await Store.open(empty_database_url), await Store.open(empty_database_url)
    try:
        fn = await _function(store)
        old, day = timedelta(days=10), timedelta(days=1)
        old_done = [_row(fn, age=old + timedelta(seconds=i), output=b"1") for i in range(5)]
        keep = {
            "queued": _row(fn, age=old, mode="async", status="queued", event=b"{}"),
            "running": _row(fn, age=old, status="running", idempotency_key=unique("k")),
            "callback": _row(fn, age=old, mode="async", status="succeeded", callback_url="http://h/",
                             callback_status="pending"),
        }
        recent = [_row(fn, age=day - timedelta(seconds=i), output=b"2") for i in range(6)]  # last is newest
        for inv in [*old_done, *keep.values(), *recent]:
            await store.insert_invocation(inv)

        # Two nodes sweeping at once delete each row once between them, and nothing else.
        counts = await asyncio.gather(store.sweep_invocations(max_age_s=7 * 86400, keep=4, batch=2),
                                      other.sweep_invocations(max_age_s=7 * 86400, keep=4, batch=2))
        left = {inv.id for inv in await store.list_invocations(fn.id, limit=1000)}
        assert left == {inv.id for inv in keep.values()} | {inv.id for inv in recent[2:]}
        assert sum(counts) == 5 + 2
        assert await store.sweep_invocations(max_age_s=7 * 86400, keep=4) == 0
        # A queued call is never deleted, however old and however many finished ones are kept.
        assert await store.sweep_invocations(max_age_s=1, keep=1) == 4
        assert {inv.id for inv in await store.list_invocations(fn.id)} == {
            keep["queued"].id, keep["running"].id, keep["callback"].id}
        await store.delete_function(fn.id)
    finally:
        await store.close()
        await other.close()


async def test_f7_the_sqlite_file_shrinks_after_a_sweep(tmp_path):
    """Before the fix SQLite files had no auto-vacuum: deleted rows' pages stayed in the file."""
    from nimbus.store.retention import Retention

    store = await Store.open(f"sqlite:///{tmp_path / 'nimbus.db'}")
    try:
        async with store._read() as conn:
            assert (await conn.exec_driver_sql("PRAGMA auto_vacuum")).scalar() == 2  # incremental

        async def pages() -> int:
            async with store._read() as conn:
                return (await conn.exec_driver_sql("PRAGMA page_count")).scalar()

        fn = await _function(store)
        for i in range(12):
            await store.insert_invocation(_row(fn, age=timedelta(seconds=100 - i), output=b'"' + b"x" * (1 << 20) + b'"'))
        full = await pages()
        assert await Retention(store, max_age_s=0, max_count=2, interval_s=60).sweep() == 10
        assert await pages() < full - 10 * (1 << 20) // 4096 * 9 // 10  # most of the 10 MiB is gone
    finally:
        await store.close()


def test_f7_a_tenant_over_its_budget_gets_429_and_another_does_not(make_node, tmp_path, database_url):
    """Before the fix every async call was accepted and kept, whatever its tenant already stored."""
    key_a, key_b = tenant_keys(database_url, unique("tenant-a"), unique("tenant-b"))
    name = unique("echo")
    event = {"pad": "x" * (400 << 10)}  # 400 KiB: two fit in the 1 MiB budget, a third does not
    with make_node(tmp_path / "home", database_url, auth="on", runtimes=["python3"], tenant_store_mb=1.0) as running, \
            client(running, key_a) as a, client(running, key_b) as b:
        deploy(a, name, ECHO)
        deploy(b, name, ECHO)
        accepted = [a.post(f"/api/v1/functions/{name}/async", json=event) for _ in range(2)]
        assert [resp.status_code for resp in accepted] == [202, 202]
        refused = a.post(f"/api/v1/functions/{name}/async", json=event)
        assert refused.status_code == 429, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert "budget" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
        # Another tenant is not affected.
        assert b.post(f"/api/v1/functions/{name}/async", json=event).status_code == 202
        # One event larger than the whole budget can never fit: 413, for any tenant.
        assert b.post(f"/api/v1/functions/{name}/async", json={"pad": "x" * (1100 << 10)}).status_code == 413

        # The two accepted calls echo their events: results count too, and now A is past its budget.
        for resp in accepted:
            wait_until(lambda r=resp: a.get(r.headers["location"]).json()["status"] in FINISHED, what="A's calls")
        # Calls stored before they run are refused alike: an idempotent sync call.
        keyed = a.post(f"/api/v1/functions/{name}/invoke", json={}, headers={"Idempotency-Key": unique("k")})
        assert keyed.status_code == 429, keyed.text
        # A plain sync call runs and answers in full; its record keeps no output and says why.
        done = a.post(f"/api/v1/functions/{name}/invoke", json={"small": 1})
        assert done.status_code == 200 and done.json()["output"] == {"small": 1}, done.text
        record = wait_until(lambda: (r := a.get(f"/api/v1/invocations/{done.json()['invocation_id']}")).status_code
                            == 200 and r.json(), what="A's sync record")
        assert record["status"] == "succeeded" and record["output"] is None
        assert "not kept" in record["logs"] and record["logs_truncated"] is True
        kept = b.post(f"/api/v1/functions/{name}/invoke", json={"small": 2}).json()
        assert b.get(f"/api/v1/invocations/{kept['invocation_id']}").json()["output"] == {"small": 2}


def test_f7_a_node_sweeps_on_its_own(make_node, tmp_path, database_url):
    name = unique("swept")
    with make_node(tmp_path / "home", database_url, runtimes=["python3"], retention_max_count=2,
                   retention_interval_s=0.2) as running, running.client() as api:
        deploy(api, name, NOOP)
        for _ in range(6):
            assert api.post(f"/api/v1/functions/{name}/invoke", json={}).json()["status"] == "succeeded"
        wait_until(lambda: len(statuses(api, name)) == 2, 60, "the sweep")


def test_f4_one_tenants_sync_flood_does_not_fill_the_queue_for_another(make_node, tmp_path, database_url):
    """Sync calls, the same class as finding 4: tenant A's calls to a slow concurrency-1 function wait in the
    node's queue; past A's share (half of queue + workers: 4 calls) A gets 429 and tenant B's call still
    gets in.

    Before the share, A's five calls (one running, four waiting) filled the queue and B got 429 as well."""
    import concurrent.futures

    key_a, key_b = tenant_keys(database_url, unique("tenant-a"), unique("tenant-b"))
    slow, noop = unique("slow"), unique("noop")
    with make_node(tmp_path / "home", database_url, auth="on", runtimes=["python3"], workers=4,
                   queue_size=4, tenant_queue_share=0.5) as running, \
            client(running, key_a) as a, client(running, key_b) as b:
        deploy(a, slow, SLOW, concurrency=1)
        deploy(b, noop, NOOP)
        scheduler = running.node.scheduler
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            calls = [pool.submit(a.post, f"/api/v1/functions/{slow}/invoke", json={"s": 3}) for _ in range(5)]
            # Either A's fifth call was refused (its share is 4), or all five are in: one running, four waiting.
            wait_until(lambda: any(c.done() and c.result().status_code == 429 for c in calls)
                       or scheduler.queue_depth >= 4, what="A's calls taken in or refused")
            served = b.post(f"/api/v1/functions/{noop}/invoke", json={})
            assert served.status_code == 200, served.text
            assert served.json()["output"] == "done"
            codes = sorted(call.result().status_code for call in calls)
        assert codes == [200, 200, 200, 200, 429], codes
        refused = next(c.result() for c in calls if c.result().status_code == 429)
        assert "share" in refused.json()["detail"]


def test_f7_a_listing_loads_a_bounded_number_of_bytes(make_node, tmp_path, database_url):
    """Next to finding 7: ``GET …/invocations?limit=1000`` loaded every row's output (up to 6 MiB each) into the
    node's memory at once. A listing now stops before 16 MiB of outputs and logs and says so.

    Before: all five 5 MiB rows came back (25 MiB in one answer), with no ``truncated`` flag."""
    name = unique("big")
    with make_node(tmp_path / "home", database_url, runtimes=["python3"], min_warm=0) as running, \
            running.client() as api:
        deploy(api, name, ECHO)

        async def fill(store):
            record = await store.get_function(name)
            rows = [_row(record, age=timedelta(seconds=i), output=b'"' + b"x" * (5 << 20) + b'"') for i in range(5)]
            for inv in rows:
                await store.insert_invocation(inv)
            return [inv.id for inv in rows]

        ids = in_store(database_url, fill)
        listed = api.get(f"/api/v1/functions/{name}/invocations", params={"limit": 1000})
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert [inv["invocation_id"] for inv in body["invocations"]] == ids[:3]  # newest first, 15 MiB
        assert body["truncated"] is True
        small = api.get(f"/api/v1/functions/{name}/invocations", params={"limit": 2}).json()
        assert [inv["invocation_id"] for inv in small["invocations"]] == ids[:2] and small["truncated"] is False
