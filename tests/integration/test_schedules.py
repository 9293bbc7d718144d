"""Schedules: ticks fire exactly once across nodes sharing one PostgreSQL database, through the store's
claim; missed ticks collapse into one; disabled schedules fire nothing; the API and a real node."""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import sqlalchemy as sa

from nimbus.store import Store, tables
from nimbus.triggers.ticks import TickLoop

T0 = datetime(2030, 1, 1, tzinfo=UTC)
CODE = b"def handler(event, context):\n    return event\n"


def unique(prefix: str = "sch") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _rows(store: Store, function_id: str) -> list[tuple]:
    i = tables.invocations
    async with store._read() as conn:
        return (await conn.execute(sa.select(i.c.event, i.c.trigger, i.c.mode, i.c.status)
                                   .where(i.c.function_id == function_id))).all()


async def _wait_for(store: Store, function_id: str, count: int) -> None:
    deadline = time.monotonic() + 60  # only so a broken claim fails instead of hanging
    while len(await _rows(store, function_id)) < count:
        assert time.monotonic() < deadline, f"tick {count} never fired"
        await asyncio.sleep(0.002)


@pytest.mark.postgres
async def test_three_nodes_fire_each_of_200_ticks_exactly_once(pg_database):
    stores = [await Store.open(pg_database, function_cache_s=0) for _ in range(3)]
    clock = [T0]
    loops = [TickLoop(s, region="us-east-1", account_id="000000000000", poll_s=0.001, clock=lambda: clock[0])
             for s in stores]
    try:
        fn = await stores[0].create_function(name=unique(), runtime="python3", handler="main.handler", env={},
                                             memory_mb=128, timeout_s=30.0, concurrency=10, code=CODE,
                                             code_kind="source")
        schedule = await stores[0].create_schedule(fn.name, fn.tenant, name="every-minute", qualifier="$LATEST",
                                                   expression="rate(1 minute)", input=None, enabled=True,
                                                   next_fire_at=T0 + timedelta(minutes=1))
        await stores[0].create_schedule(fn.name, fn.tenant, name="paused", qualifier="$LATEST",
                                        expression="rate(1 minute)", input='{"never": true}', enabled=False,
                                        next_fire_at=T0 + timedelta(minutes=1))
        for loop in loops:
            await loop.start()
        for k in range(1, 201):
            clock[0] = T0 + timedelta(minutes=k)
            if k == 100:  # one node dies abruptly, maybe in the middle of a claim
                loops[1]._task.cancel()
            await _wait_for(stores[0], fn.id, k)
        # Every loop still alive has seen the last tick before we look for duplicates.
        for _ in range(20):
            await asyncio.gather(loops[0].tick(), loops[2].tick())
        rows = await _rows(stores[0], fn.id)
        times = [orjson.loads(event)["time"] for event, *_ in rows]
        expected = {(T0 + timedelta(minutes=k)).strftime("%Y-%m-%dT%H:%M:%SZ") for k in range(1, 201)}
        assert len(rows) == 200 and set(times) == expected  # each tick once, none from the paused schedule
        assert {(trigger, mode, status) for _, trigger, mode, status in rows} == {("schedule", "async", "queued")}
        event = orjson.loads(rows[0][0])
        assert event["resources"] == [f"arn:aws:events:us-east-1:000000000000:rule/{fn.name}-every-minute"]
        print("ticks won per node:", [loop.fired for loop in loops], "lost races:", [loop.lost for loop in loops])

        # Every node down for 50 minutes: the missed ticks fire once, as the latest one, on recovery.
        clock[0] = T0 + timedelta(minutes=250, seconds=30)
        await _wait_for(stores[0], fn.id, 201)
        for _ in range(20):
            await asyncio.gather(loops[0].tick(), loops[2].tick())
        rows = await _rows(stores[0], fn.id)
        assert len(rows) == 201
        assert max(orjson.loads(event)["time"] for event, *_ in rows) == "2030-01-01T04:10:00Z"
        after = await stores[0].get_schedule(fn.name, fn.tenant, "every-minute")
        assert after.next_fire_at == T0 + timedelta(minutes=251)
        assert await stores[0].count_ticks(schedule.id) == 201
    finally:
        for loop in loops:
            await loop.close()
        for s in stores:
            await s.close()


async def test_tick_rows_older_than_a_day_are_deleted_by_the_next_claim(empty_database_url):
    store = await Store.open(empty_database_url, function_cache_s=0)
    clock = [T0]
    loop = TickLoop(store, region="us-east-1", account_id="000000000000", clock=lambda: clock[0])
    try:
        fn = await store.create_function(name=unique(), runtime="python3", handler="main.handler", env={},
                                         memory_mb=128, timeout_s=30.0, concurrency=10, code=CODE, code_kind="source")
        schedule = await store.create_schedule(fn.name, fn.tenant, name="hourly", qualifier="$LATEST",
                                               expression="rate(1 hour)", input='{"fixed": 1}', enabled=True,
                                               next_fire_at=T0 + timedelta(hours=1))
        for hour in range(1, 31):
            clock[0] = T0 + timedelta(hours=hour)
            assert await loop.tick() == 1
            assert await loop.tick() == 0  # the same tick is not fired twice by the same node either
        assert await store.count_ticks(schedule.id) == 25  # hours 6..30: a day back from the latest, inclusive
        rows = await _rows(store, fn.id)
        assert len(rows) == 30 and {event for event, *_ in rows} == {b'{"fixed": 1}'}
    finally:
        await store.close()


def test_api_creates_lists_pauses_and_deletes_and_a_tick_runs_the_function(node, api):
    name = unique("fn")
    assert api.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                "code": CODE.decode()}).status_code == 201
    base = f"/api/v1/functions/{name}/schedules"
    bad = api.post(base, json={"name": "bad", "expression": "cron(0 0 * * * *)"})
    assert bad.status_code == 422 and "day-of-week" in bad.text
    bad = api.post(base, json={"name": "bad", "expression": "cron(61 0 * * ? *)"})
    assert bad.status_code == 422 and "minutes field" in bad.text
    made = api.post(base, json={"name": "nightly", "expression": "cron(0 3 * * ? *)"})
    assert made.status_code == 201, made.text
    assert made.json()["next_fire_at"].startswith(
        (datetime.now(UTC) + timedelta(hours=0 if datetime.now(UTC).hour < 3 else 24)).strftime("%Y-%m-%dT03:00"))
    assert api.post(base, json={"name": "nightly", "expression": "rate(1 day)"}).status_code == 409
    assert [s["name"] for s in api.get(base).json()["schedules"]] == ["nightly"]
    paused = api.put(f"{base}/nightly", json={"enabled": False})
    assert paused.status_code == 200 and paused.json()["enabled"] is False
    assert api.put(f"{base}/nightly", json={"enabled": True}).json()["enabled"] is True
    assert api.delete(f"{base}/nightly").status_code == 204
    assert api.get(f"{base}/nightly").status_code == 404

    # A tick of a real node's loop, its clock moved on: an async invocation with the Scheduled Event, run.
    made = api.post(base, json={"name": "every-minute", "expression": "rate(1 minute)"}).json()
    due = datetime.fromisoformat(made["next_fire_at"])
    ticks = node.node.ticks
    ticks.clock = lambda: due + timedelta(seconds=1)
    deadline = time.monotonic() + 60
    while True:
        listed = api.get(f"/api/v1/functions/{name}/invocations").json()
        done = [i for i in listed.get("invocations", []) if i["status"] == "succeeded"]
        if done:
            break
        assert time.monotonic() < deadline, listed
        time.sleep(0.05)
    ticks.clock = lambda: datetime.now(UTC)
    inv = api.get(f"/api/v1/invocations/{done[0]['invocation_id']}").json()
    assert inv["mode"] == "async" and inv["trigger"] == "schedule" and len(done) == 1
    event = inv["output"]  # the function returns its event
    assert event["detail-type"] == "Scheduled Event" and event["time"] == due.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert event["resources"] == [f"arn:aws:events:us-east-1:000000000000:rule/{name}-every-minute"]


def test_cli_adds_lists_pauses_resumes_and_removes(node, api):
    from typer.testing import CliRunner

    from nimbus.cli import app

    name = unique("fn")
    assert api.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                "code": CODE.decode()}).status_code == 201
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, [*args, "--url", node.url])
        assert result.exit_code == 0, result.output
        return result.output

    assert "added" in run("schedule", "add", name, "nightly", "cron(0 3 * * ? *)", "--input", '{"job": "x"}')
    assert "nightly" in run("schedule", "ls", name) and "cron(0 3 * * ? *)" in run("schedule", "ls", name)
    run("schedule", "pause", name, "nightly")
    assert api.get(f"/api/v1/functions/{name}/schedules/nightly").json()["enabled"] is False
    run("schedule", "resume", name, "nightly")
    got = api.get(f"/api/v1/functions/{name}/schedules/nightly").json()
    assert got["enabled"] is True and got["input"] == {"job": "x"}
    bad = runner.invoke(app, ["schedule", "add", name, "bad", "rate(5 seconds)", "--url", node.url])
    assert bad.exit_code == 1
    run("schedule", "rm", name, "nightly")
    assert api.get(f"/api/v1/functions/{name}/schedules").json()["schedules"] == []


TICKER = """
import asyncio, sys
from datetime import datetime
from pathlib import Path

from nimbus.store import Store
from nimbus.triggers.ticks import TickLoop


async def main(url: str, clock_file: str) -> None:
    store = await Store.open(url, function_cache_s=0)
    path = Path(clock_file)
    loop = TickLoop(store, region="us-east-1", account_id="000000000000", poll_s=0.001,
                    clock=lambda: datetime.fromisoformat(path.read_text()))
    await loop.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.postgres
async def test_three_node_processes_one_killed_with_sigkill_still_fire_each_tick_once(pg_database, tmp_path):
    """Three processes, each a store and a tick loop on one PostgreSQL database, read one clock the test
    moves a minute at a time; at tick 100 one of them is killed with SIGKILL, whatever it was doing (its
    open transaction dies with its connection). Every one of 200 ticks still fires exactly once."""
    import os
    import signal
    import subprocess
    import sys

    store = await Store.open(pg_database, function_cache_s=0)
    clock_file = tmp_path / "clock"

    def set_clock(moment: datetime) -> None:
        staged = tmp_path / "clock.new"
        staged.write_text(moment.isoformat())
        staged.replace(clock_file)  # atomically: a reader never sees half a time

    set_clock(T0)
    fn = await store.create_function(name=unique(), runtime="python3", handler="main.handler", env={},
                                     memory_mb=128, timeout_s=30.0, concurrency=10, code=CODE, code_kind="source")
    await store.create_schedule(fn.name, fn.tenant, name="every-minute", qualifier="$LATEST",
                                expression="rate(1 minute)", input=None, enabled=True,
                                next_fire_at=T0 + timedelta(minutes=1))
    script = tmp_path / "ticker.py"
    script.write_text(TICKER)
    procs = [subprocess.Popen([sys.executable, str(script), pg_database, str(clock_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        for k in range(1, 201):
            set_clock(T0 + timedelta(minutes=k))
            if k == 100:
                os.kill(procs[1].pid, signal.SIGKILL)
            await _wait_for(store, fn.id, k)
        await asyncio.sleep(0.5)  # the living loops poll many times more: any duplicate would show now
        rows = await _rows(store, fn.id)
        times = [orjson.loads(event)["time"] for event, *_ in rows]
        assert len(rows) == 200 and len(set(times)) == 200
        assert procs[1].wait(5) == -signal.SIGKILL
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        await store.close()
