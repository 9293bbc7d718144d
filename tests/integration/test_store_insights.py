"""The console overview's queries against real databases (SQLite and PostgreSQL), on known data.

PostgreSQL tests share one database per run: every test has tenants of its own, and deletes its functions
(and with them their queued rows, which no claimer may take meanwhile: they are due in a year).
"""

import asyncio
import random
import uuid
from datetime import timedelta

import pytest

from nimbus.store import FunctionRecord, InvocationRecord, Store, insights
from nimbus.store.insights import EDGES_MS, bucket_of, percentile
from nimbus.store.records import utcnow

CODE = b"def handler(event, context):\n    return event\n"


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(database_url):
    opened = await Store.open(database_url)
    made: list[FunctionRecord] = []
    opened.made = made  # type: ignore[attr-defined]
    try:
        yield opened
    finally:
        for fn in made:
            await opened.delete_function(fn.id, tenant=fn.tenant)
        await opened.close()


async def function(store: Store, owner: str) -> FunctionRecord:
    fn = await store.create_function(name=f"f-{uuid.uuid4().hex[:8]}", runtime="python3", handler="main.handler",
                                     env={}, memory_mb=128, timeout_s=30.0, concurrency=10, code=CODE,
                                     code_kind="source", tenant=owner)
    store.made.append(fn)  # type: ignore[attr-defined]
    return fn


def call(fn: FunctionRecord, ago: timedelta, duration_ms: float | None = 5.0, *, now=None, **values) -> InvocationRecord:
    finished = duration_ms is not None
    values = {"status": "succeeded" if finished else "queued", "start": "hot" if finished else None, **values}
    return InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, tenant=fn.tenant,
                            version=fn.version, version_id=fn.version_id, duration_ms=duration_ms,
                            created_at=(now or utcnow()) - ago, **values)


async def put(store: Store, calls: list[InvocationRecord]) -> None:
    await asyncio.gather(*(store.insert_invocation(inv) for inv in calls))


def near(value: float | None, exact: float) -> bool:
    """Within half a histogram bucket (10 buckets a decade: a factor of 10**0.05, about 12 %)."""
    return value is not None and max(value / exact, exact / value) <= 10 ** 0.05 + 1e-6


def test_buckets_and_percentiles_from_counts():
    assert bucket_of(0.05) == 0 and bucket_of(EDGES_MS[0]) == 1 and bucket_of(10 ** 9) == len(EDGES_MS)
    assert percentile({}, 0.5) is None
    counts = {bucket_of(10.0): 98, bucket_of(1000.0): 2}
    assert near(percentile(counts, 0.50), 10.0) and near(percentile(counts, 0.99), 1000.0)
    assert near(percentile({bucket_of(3.0): 1}, 0.99), 3.0)


async def test_per_minute_counts_starts_errors_and_percentiles(store):
    owner = tenant()
    fn = await function(store, owner)
    now = utcnow()
    rows = [call(fn, timedelta(minutes=5), 10.0, now=now) for _ in range(98)]
    rows += [call(fn, timedelta(minutes=5), 1000.0, now=now, status="failed", start="cold") for _ in range(2)]
    rows += [call(fn, timedelta(minutes=30), 2.0, now=now, start=kind) for kind in ("cold", "warm", "forked", "hot", "hot")]
    rows += [call(fn, timedelta(minutes=30), 40.0, now=now, status="timed_out", start="warm")]
    rows += [call(fn, timedelta(minutes=30), None, now=now, mode="async", not_before=now + timedelta(days=365))]
    rows += [call(fn, timedelta(minutes=75), 1.0, now=now) for _ in range(7)]  # before the hour: not counted
    await put(store, rows)

    found = await store.tenant_insights(owner, now=now)

    assert len(found.minutes) == 60 and found.minutes[-1].at == now.replace(second=0, microsecond=0)
    assert found.calls == 107 and found.errors == 3 and not found.sampled
    assert found.starts == {"cold": 3, "warm": 2, "forked": 1, "hot": 100}
    five, thirty = found.minutes[59 - 5], found.minutes[59 - 30]
    assert (five.calls, five.errors) == (100, 2)
    assert near(five.p50_ms, 10.0) and near(five.p99_ms, 1000.0)
    assert (thirty.calls, thirty.errors) == (7, 1)  # the queued call counts as a call, not as a duration
    assert near(thirty.p50_ms, 2.0) and near(thirty.p99_ms, 40.0)
    assert sum(m.calls for m in found.minutes) == found.calls
    assert all(m.calls == 0 and m.p50_ms is None for k, m in enumerate(found.minutes) if k not in (29, 54))


async def test_hour_percentiles_match_the_exact_ones(store):
    owner = tenant()
    fn = await function(store, owner)
    draw = random.Random(7)
    durations = [draw.lognormvariate(3, 1.2) for _ in range(400)]
    await put(store, [call(fn, timedelta(minutes=draw.randrange(59), seconds=draw.random() * 50), d)
                      for d in durations])
    found = await store.tenant_insights(owner)
    ordered = sorted(durations)
    assert found.calls == 400
    assert near(found.p50_ms, ordered[199]) and near(found.p99_ms, ordered[395])


async def test_tenants_see_only_their_own(store):
    mine, theirs = tenant(), tenant()
    fn, other = await function(store, mine), await function(store, theirs)
    now = utcnow()
    await put(store, [call(fn, timedelta(minutes=1), 3.0) for _ in range(4)])
    await put(store, [call(other, timedelta(minutes=1), 500.0, status="failed") for _ in range(9)])
    await put(store, [call(other, timedelta(minutes=2), None, mode="async", not_before=now + timedelta(days=365))])

    found = await store.tenant_insights(mine, now=now)
    assert (found.calls, found.errors) == (4, 0) and near(found.p99_ms, 3.0)
    assert await store.recent_failures(mine) == []
    assert await store.async_backlog(mine) == 0
    assert (await store.tenant_insights(theirs, now=now)).calls == 10
    assert len(await store.recent_failures(theirs)) == 9
    assert await store.async_backlog(theirs) == 1
    assert (await store.tenant_insights(tenant(), now=now)).calls == 0


async def test_backlog_counts_queued_and_running_async_calls(store):
    owner = tenant()
    fn = await function(store, owner)
    later = utcnow() + timedelta(days=365)
    await put(store, [call(fn, timedelta(seconds=1), None, mode="async", not_before=later) for _ in range(3)])
    await put(store, [call(fn, timedelta(seconds=1), None, mode="async", status="running",
                           lease_owner="elsewhere", lease_expires_at=later) for _ in range(2)])
    await put(store, [call(fn, timedelta(seconds=1), 4.0, mode="async"), call(fn, timedelta(seconds=1), 4.0)])
    assert await store.async_backlog(owner) == 5


async def test_recent_failures_are_the_newest_ten(store):
    owner = tenant()
    fn = await function(store, owner)
    failures = [call(fn, timedelta(minutes=k), 7.0, status="failed" if k % 2 else "timed_out",
                     error={"type": "ValueError", "message": f"bad input {k}", "stack": ["x"]}) for k in range(12)]
    await put(store, [*failures, *(call(fn, timedelta(seconds=k)) for k in range(20))])
    await put(store, [call(fn, timedelta(days=2), 7.0, status="failed")])  # too old to be recent

    found = await store.recent_failures(owner)
    assert [f.id for f in found] == [f.id for f in failures[:10]]
    assert found[1].status == "failed" and found[1].error_type == "ValueError" and found[1].message == "bad input 1"
    assert found[0].status == "timed_out" and found[0].duration_ms == 7.0
    assert [f.id for f in await store.recent_failures(owner, limit=3)] == [f.id for f in failures[:3]]


async def test_a_busy_hour_is_sampled_from_its_newest_calls(store, monkeypatch):
    owner = tenant()
    fn = await function(store, owner)
    await put(store, [call(fn, timedelta(minutes=10), 100.0) for _ in range(5)])
    await put(store, [call(fn, timedelta(minutes=1), 1.0) for _ in range(5)])
    monkeypatch.setattr(insights, "WINDOW_MAX", 5)
    found = await store.tenant_insights(owner)
    assert found.sampled and found.calls == 5 and near(found.p99_ms, 1.0)
