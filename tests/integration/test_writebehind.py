"""Write-behind of finished sync invocations (issue 5): one batched INSERT for many calls, readable
before it is committed, flushed on close and on node stop, retried when the database fails; async
invocations still written before their 202. Every test runs on SQLite and PostgreSQL.

Write statements are counted with a SQLAlchemy ``before_cursor_execute`` listener on the store's engine:
what reaches the database, not what the code meant to send. Tests that must not depend on timing use a
long interval (nothing flushes by the clock) and flush or close explicitly.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from nimbus.errors import NotFound
from nimbus.store import FunctionRecord, InvocationRecord, Store, tables
from nimbus.store.database import normalise_url

CODE = b"def handler(event, context):\n    return event\n"
NEVER_MS = 60_000  # an interval no test waits for: only size, flush() and close() write


def unique(prefix: str = "w") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Writes:
    """Counts the INSERT and UPDATE statements on ``invocations`` a store's engine sends."""

    def __init__(self, store: Store) -> None:
        self.inserts = self.updates = 0
        event.listen(store._engine.sync_engine, "before_cursor_execute", self._seen)

    @property
    def count(self) -> int:
        return self.inserts + self.updates

    def _seen(self, conn, cursor, statement, parameters, context, executemany) -> None:
        text = statement.lstrip().upper()
        self.inserts += text.startswith("INSERT INTO INVOCATIONS")
        self.updates += text.startswith("UPDATE INVOCATIONS")


async def stored_ids(url: str, function_id: str) -> set[str]:
    """The invocation ids the database holds for a function, read behind the store's back."""
    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(
                sa.select(tables.invocations.c.id).where(tables.invocations.c.function_id == function_id))).all()
    finally:
        await engine.dispose()
    return {row[0] for row in rows}


async def create(store: Store) -> FunctionRecord:
    return await store.create_function(name=unique(), runtime="python3", handler="main.handler", env={},
                                       memory_mb=128, timeout_s=30.0, concurrency=10, code=CODE, code_kind="source")


def finished(fn: FunctionRecord, n: int = 0) -> InvocationRecord:
    """A sync call as the scheduler hands it over: finished, with output, logs and timings."""
    now = datetime.now(UTC)
    return InvocationRecord(
        id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, tenant=fn.tenant, version=fn.version,
        version_id=fn.version_id, mode="sync", status="succeeded", start="hot", output=f'{{"n": {n}}}'.encode(),
        logs=f"line {n}\n", duration_ms=0.5, created_at=now + timedelta(microseconds=n), started_at=now,
        finished_at=now, attempts=1,
    )


async def wait_for(check, what: str, seconds: float = 60.0):
    """Poll ``check`` (a coroutine function) until it is truthy; a generous deadline, not a timing goal."""
    deadline = time.monotonic() + seconds
    while not (result := await check()):
        assert time.monotonic() < deadline, f"{what} not reached within {seconds} s"
        await asyncio.sleep(0.01)
    return result


# ---------------------------------------------------------------- the store


async def test_a_burst_is_one_insert_and_readable_before_it(database_url):
    store = await Store.open(database_url, write_behind_ms=NEVER_MS)
    try:
        fn = await create(store)
        writes = Writes(store)
        invs = [finished(fn, n) for n in range(100)]
        for inv in invs:
            await store.record_invocation(inv)
        assert writes.count == 0 and store.unwritten == 100  # nothing written per call
        for inv in invs:  # read-your-writes, from memory
            assert await store.get_invocation(inv.id) == inv
        with pytest.raises(NotFound):
            await store.get_invocation(invs[0].id, tenant=unique("tenant"))
        listed = await store.list_invocations(fn.id, limit=10)
        assert [i.id for i in listed] == [inv.id for inv in reversed(invs[-10:])]
        assert await stored_ids(database_url, fn.id) == set()

        assert await store.flush()
        assert writes.count == 1 and store.unwritten == 0  # one multi-row INSERT
        assert await stored_ids(database_url, fn.id) == {inv.id for inv in invs}
        assert await store.get_invocation(invs[5].id) == invs[5]  # now from the database, unchanged
        async with store._read() as conn:  # counted through the store, as stored: each row once
            assert await conn.scalar(sa.select(sa.func.count()).select_from(tables.invocations)
                                     .where(tables.invocations.c.function_id == fn.id)) == 100
    finally:
        await store.close()


async def test_a_list_that_reads_while_its_rows_are_flushed_still_has_them(database_url):
    """The rows of a flush that commits after the list read the database, but before it looked in the
    buffer, were once in neither: the list came back without them (test_api's listing flaked so)."""
    store = await Store.open(database_url, write_behind_ms=NEVER_MS)
    try:
        fn = await create(store)
        invs = [finished(fn, n) for n in range(2)]
        for inv in invs:
            await store.record_invocation(inv)
        real_read = store._read

        @contextlib.asynccontextmanager
        async def read_then_flush():
            async with real_read() as conn:
                class Conn:
                    async def execute(self, *args, **kwargs):
                        result = await conn.execute(*args, **kwargs)
                        await store.flush()  # the rows commit after this read, before the buffer is looked at
                        return result

                    def __getattr__(self, name):
                        return getattr(conn, name)

                yield Conn()

        store._read = read_then_flush
        listed = await store.list_invocations(fn.id)
        assert store.unwritten == 0 and await stored_ids(database_url, fn.id) == {inv.id for inv in invs}
        assert [i.id for i in listed] == [invs[1].id, invs[0].id]
    finally:
        store._read = real_read
        await store.close()


async def test_a_full_batch_goes_at_once_and_the_rest_after_the_interval(database_url):
    store = await Store.open(database_url, write_behind_ms=5, write_behind_rows=10)
    try:
        fn = await create(store)
        writes = Writes(store)
        invs = [finished(fn, n) for n in range(25)]
        for inv in invs:  # no await yields here: all 25 are pending before the flusher first runs
            await store.record_invocation(inv)

        async def all_stored():
            return store.unwritten == 0 and await stored_ids(database_url, fn.id) == {inv.id for inv in invs}

        await wait_for(all_stored, "every row written without flush()")
        assert writes.count == 3  # 10 + 10 at once, 5 when the interval ran out
    finally:
        await store.close()


async def test_zero_interval_writes_through(database_url):
    store = await Store.open(database_url, write_behind_ms=0)
    try:
        fn = await create(store)
        writes = Writes(store)
        inv = finished(fn)
        await store.record_invocation(inv)
        assert writes.count == 1 and store.unwritten == 0
        assert await stored_ids(database_url, fn.id) == {inv.id}
        with pytest.raises(ValueError, match="finished"):
            await store.record_invocation(dataclasses.replace(inv, id=uuid.uuid4().hex, status="running"))
    finally:
        await store.close()


async def test_close_writes_every_pending_row(database_url):
    store = await Store.open(database_url, write_behind_ms=NEVER_MS)
    fn = await create(store)
    invs = [finished(fn, n) for n in range(30)]
    for inv in invs:
        await store.record_invocation(inv)
    await store.close()
    reopened = await Store.open(database_url)
    try:
        for inv in invs:
            assert await reopened.get_invocation(inv.id) == inv
    finally:
        await reopened.close()


async def test_rows_of_a_deleted_function_are_dropped_not_retried_forever(database_url, caplog):
    store = await Store.open(database_url, write_behind_ms=NEVER_MS)
    try:
        kept, gone, deleted_later = await create(store), await create(store), await create(store)
        await store.delete_function(gone.id)
        good = [finished(kept, n) for n in range(5)]
        orphan = finished(gone)
        for inv in (*good[:2], orphan, *good[2:]):
            await store.record_invocation(inv)
        pending = finished(deleted_later)
        await store.record_invocation(pending)
        await store.delete_function(deleted_later.id)  # its unwritten rows go with it
        with pytest.raises(NotFound):
            await store.get_invocation(pending.id)

        with caplog.at_level(logging.WARNING, logger="nimbus.store"):
            assert await store.flush()
        assert store.unwritten == 0
        assert await stored_ids(database_url, kept.id) == {inv.id for inv in good}
        dropped = [r.getMessage() for r in caplog.records if "not recording" in r.getMessage()]
        assert len(dropped) == 1 and orphan.id in dropped[0] and "not found" in dropped[0]
    finally:
        await store.close()


async def execute(url: str, statement: str) -> None:
    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


async def test_a_failing_flush_keeps_its_rows_and_retries_until_they_are_written(empty_database_url, caplog):
    url = empty_database_url
    store = await Store.open(url, write_behind_ms=5)
    try:
        fn = await create(store)
        await execute(url, "ALTER TABLE invocations RENAME TO invocations_away")  # every INSERT now fails
        invs = [finished(fn, n) for n in range(5)]
        with caplog.at_level(logging.ERROR, logger="nimbus.store"):
            for inv in invs:
                await store.record_invocation(inv)

            async def failed_twice():
                return sum("could not write" in r.getMessage() for r in caplog.records) >= 2

            await wait_for(failed_twice, "two failed flushes")
        assert store.unwritten == 5
        for inv in invs:
            assert await store.get_invocation(inv.id) == inv  # still readable while failing
        await execute(url, "ALTER TABLE invocations_away RENAME TO invocations")
        assert await store.flush(timeout=60)
        assert await stored_ids(url, fn.id) == {inv.id for inv in invs}
    finally:
        await store.close()


async def test_rows_in_a_flush_that_waits_for_the_database_stay_readable(empty_database_url):
    url = empty_database_url
    store = await Store.open(url, write_behind_ms=5)
    try:
        fn = await create(store)
        release = await hold_invocations_lock(url)  # the flush blocks on it, its rows in flight
        try:
            invs = [finished(fn, n) for n in range(3)]
            for inv in invs:
                await store.record_invocation(inv)

            async def in_flight():
                return len(store._behind._inflight) == 3  # private peek: the INSERT has been sent

            await wait_for(in_flight, "the flush to start")
            await asyncio.sleep(0.05)  # let it reach the lock
            for inv in invs:
                assert await store.get_invocation(inv.id) == inv
            assert {i.id for i in await store.list_invocations(fn.id)} == {inv.id for inv in invs}
        finally:
            await release()
        assert await store.flush(timeout=60)
        assert await stored_ids(url, fn.id) == {inv.id for inv in invs}
    finally:
        await store.close()


async def hold_invocations_lock(url: str):
    """Take the lock an INSERT into invocations needs, from another connection; returns the release."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("sqlite:///", 1)[1], isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")

        async def release_sqlite():
            conn.execute("ROLLBACK")
            conn.close()

        return release_sqlite
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    transaction = conn.transaction()
    await transaction.start()
    await conn.execute("LOCK TABLE invocations IN EXCLUSIVE MODE")  # readers pass, writers wait

    async def release_pg():
        await transaction.rollback()
        await conn.close()

    return release_pg


# ---------------------------------------------------------------- a real node


def deploy(client) -> dict:
    resp = client.post("/api/v1/functions", json={"name": unique(), "runtime": "python3",
                                                  "code": "def handler(e, c):\n    return e\n"})
    assert resp.status_code == 201, resp.text
    return resp.json()


def invoke(client, name: str, n: int) -> dict:
    resp = client.post(f"/api/v1/functions/{name}/invoke", json={"n": n})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "succeeded" and body["output"] == {"n": n}, body
    return body


@pytest.mark.sandbox
def test_node_sync_calls_cost_one_batched_write_and_node_stop_writes_them(tmp_path, database_url, make_node):
    calls = 40
    with make_node(tmp_path, database_url, runtimes=["python3"], write_behind_ms=NEVER_MS) as running:
        writes = Writes(running.node.store)
        with running.client() as client:
            fn = deploy(client)
            with concurrent.futures.ThreadPoolExecutor(8) as threads:
                bodies = list(threads.map(lambda n: invoke(client, fn["name"], n), range(calls)))
            for n, body in enumerate(bodies):  # read-your-writes right after the call
                got = client.get(f"/api/v1/invocations/{body['invocation_id']}")
                assert got.status_code == 200, got.text
                assert (got.json()["status"], got.json()["output"]) == ("succeeded", {"n": n})
            listed = client.get(f"/api/v1/functions/{fn['name']}/invocations", params={"limit": 1000}).json()
            assert {item["invocation_id"] for item in listed["invocations"]} >= {b["invocation_id"] for b in bodies}
            assert writes.count == 0  # not one write per call: all are still pending

            resp = client.post(f"/api/v1/functions/{fn['name']}/async", json={"n": -1})
            assert resp.status_code == 202, resp.text
            # An async call is in the database before its 202, write-behind or not.
            assert resp.json()["invocation_id"] in asyncio.run(stored_ids(database_url, fn["id"]))
            assert writes.inserts == 1
    # Stopped with the sync rows pending: the stop wrote all of them, in one INSERT.
    assert asyncio.run(stored_ids(database_url, fn["id"])) >= {b["invocation_id"] for b in bodies}
    assert writes.inserts == 2


@pytest.mark.sandbox
def test_node_default_interval_writes_every_call_without_a_stop(tmp_path, database_url, make_node):
    with make_node(tmp_path, database_url, runtimes=["python3"]) as running:
        with running.client() as client:
            fn = deploy(client)
            with concurrent.futures.ThreadPoolExecutor(8) as threads:
                bodies = list(threads.map(lambda n: invoke(client, fn["name"], n), range(30)))
            for body in bodies:
                assert client.get(f"/api/v1/invocations/{body['invocation_id']}").status_code == 200
            ids = {b["invocation_id"] for b in bodies}

            async def all_stored():
                return await stored_ids(database_url, fn["id"]) >= ids

            asyncio.run(wait_for(all_stored, "every sync call in the database while the node runs"))


async def test_a_caller_over_the_bound_waits_for_room_not_for_the_whole_backlog(tmp_path):
    """At the bound a caller waits until a flush makes room below it, not until every row, including
    the ones others keep adding, is written (that wait was ~1 s at c=32 on SQLite)."""
    from nimbus.store.writebehind import WriteBehind

    written: list[int] = []
    gate = asyncio.Event()

    async def insert_rows(rows):
        await gate.wait()
        written.append(len(rows))

    behind = WriteBehind(insert_rows, interval_s=60, max_rows=4)
    for i in range(10):
        behind.put({"id": str(i), "function_id": "f"})
    waiter = asyncio.create_task(behind.wait_below(8))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # 10 unwritten, the first flush still blocked
    for i in range(10, 20):  # others keep adding while it waits
        behind.put({"id": str(i), "function_id": "f"})
    gate.set()
    await asyncio.wait_for(waiter, 10)
    assert behind.backlog < 20 and written  # returned once there was room, with rows still pending
    await behind.close(10)
    assert sum(written) == 20
