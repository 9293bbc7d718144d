"""The console's function queries (store/activity.py) on SQLite and PostgreSQL: the name search, each
function's activity of the last 24 h, a function's newest calls without payloads, and its URLs.

PostgreSQL tests share the run's database: every test uses a tenant of its own.
"""

import uuid
from datetime import timedelta

import pytest

from nimbus.store import InvocationRecord, Store
from nimbus.store.records import utcnow

CODE = b"def handler(event, context):\n    return event\n"


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def store(database_url):
    opened = await Store.open(database_url, write_behind_ms=0)
    try:
        yield opened
    finally:
        await opened.close()


async def make(store: Store, tenant: str, name: str):
    return await store.create_function(name=name, runtime="python3", handler="main.handler", env={}, memory_mb=128,
                                       timeout_s=5, concurrency=1, code=CODE, code_kind="source", tenant=tenant)


async def call(store: Store, fn, *, status="succeeded", age=timedelta(0), **fields) -> InvocationRecord:
    inv = InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, version=fn.version,
                           version_id=fn.version_id, tenant=fn.tenant, status=status, created_at=utcnow() - age,
                           **fields)
    await store.insert_invocation(inv)
    return inv


async def test_search_finds_substrings_literally_within_the_tenant(store):
    tenant, other = unique(), unique()
    for name in ("alpha", "beta", "alphabet", "gamma-ray", "a-b"):
        await make(store, tenant, name)
    await make(store, other, "alpha-of-other")
    await store.publish_version("beta", tenant)

    found, total = await store.search_functions(tenant=tenant, contains="alpha")
    assert [fn.name for fn, _ in found] == ["alpha", "alphabet"] and total == 2
    found, total = await store.search_functions(tenant=tenant, contains="ALPHA")  # names are lower-case
    assert total == 2
    # LIKE's wildcards are plain characters here.
    assert (await store.search_functions(tenant=tenant, contains="%"))[1] == 0
    assert (await store.search_functions(tenant=tenant, contains="a_b"))[1] == 0
    assert [fn.name for fn, _ in (await store.search_functions(tenant=tenant, contains="-"))[0]] == ["a-b", "gamma-ray"]

    everything, total = await store.search_functions(tenant=tenant)
    assert total == 5 and [fn.name for fn, _ in everything] == ["a-b", "alpha", "alphabet", "beta", "gamma-ray"]
    assert dict((fn.name, last) for fn, last in everything)["beta"] == 1
    assert everything[0][0].runtime == "python3" and everything[0][0].tenant == tenant

    page, total = await store.search_functions(tenant=tenant, limit=2, offset=2)
    assert [fn.name for fn, _ in page] == ["alphabet", "beta"] and total == 5


async def test_activity_counts_the_window_and_finds_the_last_call(store):
    tenant = unique()
    busy, idle, old, silent = [await make(store, tenant, name) for name in ("busy", "idle", "old", "silent")]
    for _ in range(3):
        await call(store, busy)
    await call(store, busy, status="failed", error={"type": "Boom", "message": "x", "stack": ""})
    await call(store, busy, status="timed_out")
    await call(store, busy, status="failed", age=timedelta(hours=30))  # outside the window
    newest = await call(store, busy, status="running", mode="async")
    await call(store, old, age=timedelta(days=3))

    found = await store.function_activity([busy.id, idle.id, old.id, silent.id], tenant=tenant)
    assert found[busy.id].calls == 6 and found[busy.id].errors == 2
    assert found[busy.id].error_rate == pytest.approx(2 / 6)
    assert found[busy.id].last_call == newest.created_at  # the newest row, to the microsecond both stores keep
    assert found[old.id].calls == 0 and found[old.id].error_rate is None
    assert found[old.id].last_call is not None and found[old.id].last_call < utcnow() - timedelta(days=2)
    assert found[silent.id].last_call is None and found[silent.id].calls == 0

    # Another tenant asking about these ids learns nothing.
    assert await store.function_activity([busy.id], tenant=unique()) == {}
    assert await store.function_activity([], tenant=tenant) == {}


async def test_recent_calls_are_newest_first_without_payloads(store):
    tenant = unique()
    fn = await make(store, tenant, "worker")
    made = [await call(store, fn, age=timedelta(seconds=60 - i), output=b'"big"', logs="hello", start="cold",
                       duration_ms=12.5, trigger="url") for i in range(5)]
    await call(store, fn, status="failed", error={"type": "ValueError", "message": "no", "stack": "..."})
    calls = await store.recent_calls(fn.id, tenant=tenant, limit=4)
    assert len(calls) == 4
    assert calls[0].status == "failed" and calls[0].failed and calls[0].error_type == "ValueError"
    assert [c.id for c in calls[1:]] == [inv.id for inv in reversed(made)][:3]
    assert calls[1].start == "cold" and calls[1].duration_ms == 12.5 and calls[1].trigger == "url"
    assert not hasattr(calls[1], "output") and not hasattr(calls[1], "logs")
    assert await store.recent_calls(fn.id, tenant=unique()) == []


async def test_recent_calls_include_rows_written_behind(database_url):
    opened = await Store.open(database_url, write_behind_ms=60_000)
    try:
        tenant = unique()
        fn = await make(opened, tenant, "fast")
        inv = InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, version=1,
                               version_id=fn.version_id, tenant=tenant, status="succeeded", start="hot")
        await opened.record_invocation(inv)
        assert [c.id for c in await opened.recent_calls(fn.id, tenant=tenant)] == [inv.id]
        activity = await opened.function_activity([fn.id], tenant=tenant)
        assert activity[fn.id].last_call == inv.created_at and activity[fn.id].calls == 1
    finally:
        await opened.close()


async def test_function_urls_of_one_function(store):
    tenant = unique()
    fn = await make(store, tenant, "web")
    await make(store, tenant, "plain")
    assert await store.function_urls(fn.id, tenant=tenant) == []
    await store.put_function_url("web", tenant, "", auth="none", cors={"allow_origins": ["*"]})
    urls = await store.function_urls(fn.id, tenant=tenant)
    assert [(u.qualifier, u.auth, u.function_name) for u in urls] == [("", "none", "web")]
    assert urls[0].cors == {"allow_origins": ["*"]}
    assert await store.function_urls(fn.id, tenant=unique()) == []
