"""Node-wide behaviour: durable async work across a restart, admission limits, the warm pool's loops."""

import asyncio
import concurrent.futures
import os
import signal
import time
import uuid
from datetime import UTC, datetime

import pytest

pytestmark = pytest.mark.sandbox

SLEEPY = "import time\ndef handler(e, c):\n    time.sleep(e.get('s', 0))\n    return 'done'\n"


def create(client, code=SLEEPY, **settings) -> dict:
    name = f"n-{uuid.uuid4().hex[:8]}"
    resp = client.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": code, **settings})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_async_work_written_before_a_restart_is_run_after_it(tmp_path, database_url, make_node):
    from nimbus.store import InvocationRecord, Store

    with make_node(tmp_path, database_url, runtimes=["python3"]) as running:
        with running.client() as client:
            fn = create(client, "def handler(e, c):\n    return e['n'] + 1\n")
    # The node is down. Work lands in the store as an async call would leave it: queued, with its event.
    ids = [uuid.uuid4().hex for _ in range(5)]

    async def enqueue():
        store = await Store.open(database_url)
        try:
            for n, inv_id in enumerate(ids):
                await store.insert_invocation(InvocationRecord(
                    id=inv_id, function_id=fn["id"], function_name=fn["name"], tenant="default", version=1,
                    version_id=(await store.get_function(fn["name"])).version_id, mode="async", status="queued",
                    event=str(n).join(['{"n": ', "}"]).encode(), created_at=datetime.now(UTC)))
        finally:
            await store.close()

    asyncio.run(enqueue())
    with make_node(tmp_path, database_url, runtimes=["python3"]) as running:
        with running.client() as client:
            outputs = []
            for inv_id in ids:
                deadline = time.monotonic() + 60
                while (record := client.get(f"/api/v1/invocations/{inv_id}").json())["status"] in ("queued",
                                                                                                   "running"):
                    assert time.monotonic() < deadline, record
                    time.sleep(0.05)
                assert record["status"] == "succeeded", record
                outputs.append(record["output"])
    assert outputs == [1, 2, 3, 4, 5]


def test_full_queue_answers_429_with_retry_after(tmp_path, make_node):
    with make_node(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", runtimes=["python3"], workers=1,
                   queue_size=1) as running, running.client() as client:
        fn = create(client)
        url = f"/api/v1/functions/{fn['name']}/invoke"
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: client.post(url, json={"s": 1}), range(6)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and "queue" in refused.json()["detail"]
        assert client.post(url, json={}).status_code == 200  # and it serves again once the burst passes


def test_prewarm_keeps_blank_machines_and_health_loop_replaces_dead_ones(tmp_path, make_node):
    with make_node(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", runtimes=["python3", "nodejs"], min_warm=2,
                   health_interval_s=0.2) as running, running.client() as client:
        def blanks():
            pool = client.get("/health").json()["pool"]
            return pool["python3"]["blank"], pool["nodejs"]["blank"]

        wait_until(lambda: blanks() == (2, 2))
        fn = create(client)
        assert client.post(f"/api/v1/functions/{fn['name']}/invoke", json={}).json()["start"] == "warm"
        wait_until(lambda: blanks() == (2, 2))  # refilled
        # kill a blank machine behind the pool's back: the health loop notices and the pre-warm loop replaces it
        victim = running.node.pool._blank["python3"][0]
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(lambda: victim not in running.node.pool._blank["python3"])
        wait_until(lambda: blanks() == (2, 2))


def wait_until(check, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"condition not reached: {check.__code__.co_consts}"
        time.sleep(0.05)
