"""Durable async invocations (issue 4, part 2): leases and fencing, retries with backoff, result
callbacks, idempotency keys, and nodes that die (``kill -9``) or are stopped (SIGTERM) mid-run.

The crash tests run the node as a real subprocess (``nimbus up``) so a SIGKILL is a real one: no
``finally``, no lifespan shutdown, leases left behind in the store.
"""

import asyncio
import concurrent.futures
import http.server
import os
import signal
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from nimbus.callbacks import AllowList
from nimbus.errors import InvalidRequest
from nimbus.store import InvocationRecord, Store, tables
from waiting import free_port, wait_until

pytestmark = pytest.mark.sandbox

NIMBUS = Path(sys.executable).with_name("nimbus")
FINISHED = {"succeeded", "failed", "timed_out"}
CRASH_CALLS = 300  # async invocations enqueued before the kill -9 / SIGTERM
# Small leases and polls keep the crash tests short; the settings are the documented NIMBUS_* ones.
FAST = {"async_lease_s": 2.0, "async_poll_s": 0.05, "async_retry_base_s": 0.2}
SLEEP_AND_ECHO = "import time\ndef handler(e, c):\n    time.sleep(e.get('s', 0))\n    return e.get('n')\n"


def unique(prefix: str = "d") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def deploy(client: httpx.Client, code: str = SLEEP_AND_ECHO, **settings) -> dict:
    resp = client.post("/api/v1/functions", json={"name": unique(), "runtime": "python3", "code": code, **settings})
    assert resp.status_code == 201, resp.text
    return resp.json()


def rows(database_url: str, function_id: str) -> list[InvocationRecord]:
    """Every invocation row the store holds for the function (the store's own record, not the API's)."""
    async def read():
        store = await Store.open(database_url)
        try:
            return await store.list_invocations(function_id, limit=100_000)
        finally:
            await store.close()

    return asyncio.run(read())


def sql(database_url: str, statement) -> None:
    async def run():
        store = await Store.open(database_url)
        try:
            async with store._write() as conn:
                await conn.execute(statement)
        finally:
            await store.close()

    asyncio.run(run())


class NodeProcess:
    """``nimbus up`` as a child process on a free port, configured through its environment."""

    def __init__(self, home: Path, database_url: str, **settings) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
        env.update({"NIMBUS_HOME": str(home), "NIMBUS_PORT": str(self.port), "NIMBUS_DATABASE_URL": database_url,
                    "NIMBUS_RUNTIMES": "python3", "NIMBUS_LOG_LEVEL": "info"})
        env.update({f"NIMBUS_{key.upper()}": str(value) for key, value in settings.items()})
        self.log = (home / f"node-{self.port}.log").open("wb")
        self.proc = subprocess.Popen([str(NIMBUS), "up"], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "NodeProcess":
        def ready():
            assert self.proc.poll() is None, f"the node exited: {self.output()}"
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, 90, "node start")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return (self.home / f"node-{self.port}.log").read_text(errors="replace")[-4000:]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def enqueue(url: str, name: str, n: int, seconds: float = 0.2) -> dict[str, int]:
    """POST ``n`` async calls from a few threads; the accepted ones' ids, each with its event's n."""
    def post(i: int) -> tuple[str, int]:
        with httpx.Client(base_url=url, timeout=60) as client:
            resp = client.post(f"/api/v1/functions/{name}/async", json={"n": i, "s": seconds})
            assert resp.status_code == 202, resp.text
            return resp.json()["invocation_id"], i

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return dict(pool.map(post, range(n)))


# ---------------------------------------------------------------- kill -9 and SIGTERM


def test_kill_9_mid_run_loses_nothing_and_runs_nothing_twice(tmp_path, database_url):
    with NodeProcess(tmp_path, database_url, **FAST) as node, node.client() as client:
        fn = deploy(client, concurrency=4)
        accepted = enqueue(node.url, fn["name"], CRASH_CALLS)
        wait_until(lambda: sum(r.status == "succeeded" for r in rows(database_url, fn["id"])) >= CRASH_CALLS // 5,
                   what="a fifth of the calls done")
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(30)
    at_kill = rows(database_url, fn["id"])
    # Running under the dead node's lease, and counted as started: the calls that were on a machine.
    interrupted = {r.id for r in at_kill if r.status == "running" and r.attempts == 1}
    assert not [r for r in at_kill if r.status == "queued" and r.attempts]
    assert any(r.status != "succeeded" for r in at_kill), "the node was killed after all the work was done"

    with NodeProcess(tmp_path, database_url, **FAST):  # the same home: the same node id
        wait_until(lambda: all(r.status in FINISHED for r in rows(database_url, fn["id"])), 120,
                   "every invocation finished")
    final = {r.id: r for r in rows(database_url, fn["id"])}
    assert set(final) == set(accepted)  # none lost, none invented: one row per accepted invocation
    assert {r.status for r in final.values()} == {"succeeded"}
    assert all(int(final[i].output) == n for i, n in accepted.items())
    assert all(r.lease_owner is None and r.lease_expires_at is None for r in final.values())
    # Only the calls that were on a machine when the node died ran a second time, and only once more;
    # claimed calls still waiting for a machine were not charged an attempt.
    assert {i for i, r in final.items() if r.attempts != 1} == interrupted
    assert {r.attempts for r in final.values()} <= {1, 2}
    print(f"\n[{database_url.split(':')[0]}] kill -9: {len(accepted)} accepted, "
          f"{len(set(accepted) - {i for i, r in final.items() if r.status == 'succeeded'})} lost, "
          f"{len(interrupted)} interrupted and run again")


def test_sigterm_hands_back_work_and_a_restart_finishes_it_without_running_anything_twice(tmp_path, database_url):
    with NodeProcess(tmp_path, database_url, **FAST) as node:
        with node.client() as client:
            fn = deploy(client, concurrency=4)
        accepted = enqueue(node.url, fn["name"], CRASH_CALLS // 2)
        wait_until(lambda: sum(r.status == "succeeded" for r in rows(database_url, fn["id"])) >= 20,
                   what="some calls done")
        node.proc.send_signal(signal.SIGTERM)
        node.proc.wait(120)
        log = node.output()
    after = rows(database_url, fn["id"])
    # Nothing is left running under a lease: what did not finish was handed back, claimable at once.
    assert not [r for r in after if r.status == "running" or r.lease_owner is not None], log
    assert any(r.status == "queued" for r in after), "the node was stopped after all the work was done"
    assert all(r.attempts == 0 for r in after if r.status == "queued")  # none had reached a machine
    # A node claims no more than its functions can start (issue 15, finding 4), so it seldom holds a call
    # that has not started: whatever it held was handed back or finished (no lease is left, above).
    assert "could not hand back" not in log

    with NodeProcess(tmp_path, database_url, **FAST):
        wait_until(lambda: all(r.status in FINISHED for r in rows(database_url, fn["id"])), 120,
                   "every invocation finished")
    final = {r.id: r for r in rows(database_url, fn["id"])}
    assert set(final) == set(accepted)
    assert {r.status for r in final.values()} == {"succeeded"}
    assert {r.attempts for r in final.values()} == {1}  # every call ran exactly once


# ---------------------------------------------------------------- one node, in-process


class Hook:
    """A real HTTP server on a free port that records the callbacks it receives."""

    def __init__(self, port: int | None = None, fail_first: int = 0, redirect_to: str | None = None) -> None:
        self.received: list[tuple[dict, bytes]] = []
        self.fail_first = fail_first
        self.redirect_to = redirect_to
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if hook.redirect_to:
                    self.send_response(307)
                    self.send_header("Location", hook.redirect_to)
                else:
                    self.send_response(500 if len(hook.received) <= hook.fail_first else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hook":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


NODE_SETTINGS = dict(FAST, async_lease_s=3.0, runtimes=["python3"], callback_allow="127.0.0.1, ::1/128")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable(request, tmp_path_factory, make_module_node):
    home = tmp_path_factory.mktemp("durable")
    url = f"sqlite:///{home / 'nimbus.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    with make_module_node(home, url, **NODE_SETTINGS) as running:
        running.database_url = url
        yield running


@pytest.fixture
def api(durable):
    with durable.client() as client:
        yield client


def settle(api: httpx.Client, inv_id: str, until=lambda r: r["status"] in FINISHED, seconds: float = 90) -> dict:
    """The invocation as the API shows it, once ``until`` holds (by default: once it has finished)."""
    def check():
        record = api.get(f"/api/v1/invocations/{inv_id}").json()
        return record if until(record) else None

    return wait_until(check, seconds, f"invocation {inv_id}")


def test_a_failing_call_is_retried_with_backoff_then_failed_with_the_reason_and_attempts(api):
    fn = deploy(api, "def handler(e, c):\n    raise ValueError('no good')\n")
    assert fn["max_retries"] == 2
    inv_id = api.post(f"/api/v1/functions/{fn['name']}/async", json={}).json()["invocation_id"]
    # Between attempts it waits, queued, with the last error and when the next attempt may start.
    waiting = settle(api, inv_id, lambda r: r["status"] == "queued" and r["attempts"] >= 1)
    assert waiting["error"]["type"] == "ValueError" and waiting["next_attempt_at"] is not None
    assert datetime.fromisoformat(waiting["next_attempt_at"]) > datetime.fromisoformat(waiting["created_at"])
    final = settle(api, inv_id)
    assert (final["status"], final["attempts"], final["error"]["type"]) == ("failed", 3, "ValueError")
    assert (final["error"]["message"], final["error"]["attempts"]) == ("no good", 3)
    assert final["next_attempt_at"] is None


def test_a_call_that_fails_at_first_succeeds_on_a_retry(api):
    # The first call a machine serves fails; the retry finds that machine idle (it is not retired for a
    # function error) and succeeds. Not a time window: a slow first attempt would make that one pass.
    fn = deploy(api, "calls = []\ndef handler(e, c):\n    calls.append(1)\n"
                     "    if len(calls) == 1:\n        raise RuntimeError('not yet')\n    return 'ok'\n")
    inv_id = api.post(f"/api/v1/functions/{fn['name']}/async", json={}).json()["invocation_id"]
    final = settle(api, inv_id)
    assert (final["status"], final["output"]) == ("succeeded", "ok") and final["attempts"] >= 2


def test_a_dying_machine_and_a_timeout_are_retried_up_to_max_retries(api):
    dying = deploy(api, "import os\ndef handler(e, c):\n    os._exit(3)\n", max_retries=1)
    slow = deploy(api, SLEEP_AND_ECHO, timeout_s=0.5, max_retries=0)
    died = api.post(f"/api/v1/functions/{dying['name']}/async", json={}).json()["invocation_id"]
    timed = api.post(f"/api/v1/functions/{slow['name']}/async", json={"s": 5}).json()["invocation_id"]
    died, timed = settle(api, died), settle(api, timed)
    assert (died["status"], died["attempts"], died["error"]["type"]) == ("failed", 2, "RuntimeExit")
    assert (timed["status"], timed["attempts"], timed["error"]["type"]) == ("failed", 1, "TimeoutError")
    assert (died["error"]["attempts"], timed["error"]["attempts"]) == (2, 1)


def test_max_retries_is_validated_and_versioned(api):
    name = unique()
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": SLEEP_AND_ECHO,
                                               "max_retries": 11})
    assert resp.status_code == 422 and resp.headers["content-type"].startswith("application/problem+json")
    fn = deploy(api, max_retries=0)
    assert fn["max_retries"] == 0
    updated = api.put(f"/api/v1/functions/{fn['name']}", json={"max_retries": 5}).json()
    assert (updated["max_retries"], updated["version"]) == (5, 2)
    assert api.put(f"/api/v1/functions/{fn['name']}", json={"timeout_s": 3}).json()["max_retries"] == 5
    assert api.put(f"/api/v1/functions/{fn['name']}", json={"max_retries": -1}).status_code == 422


def test_the_result_is_posted_to_the_callback_url_and_retried_until_it_lands(api):
    fn = deploy(api)
    with Hook(fail_first=1) as hook:
        resp = api.post(f"/api/v1/functions/{fn['name']}/async", json={"n": 7},
                        headers={"X-Nimbus-Callback-Url": hook.url})
        assert resp.status_code == 202, resp.text
        inv_id = resp.json()["invocation_id"]
        done = settle(api, inv_id, lambda r: r["callback_status"] == "delivered")
        assert (done["status"], done["output"], done["callback_attempts"]) == ("succeeded", 7, 2)
        assert len(hook.received) == 2
        headers, body = hook.received[-1]
        assert headers["x-nimbus-invocation-id"] == inv_id and headers["content-type"] == "application/json"
        sent = httpx.Response(200, content=body).json()
        assert (sent["invocation_id"], sent["status"], sent["output"], sent["attempts"]) == (inv_id, "succeeded", 7, 1)

        # The query parameter works too, and a failed call's result is delivered all the same.
        failing = deploy(api, "def handler(e, c):\n    raise KeyError('x')\n", max_retries=0)
        resp = api.post(f"/api/v1/functions/{failing['name']}/async", params={"callback_url": hook.url}, json={})
        other = settle(api, resp.json()["invocation_id"], lambda r: r["callback_status"] == "delivered")
        assert other["callback_attempts"] == 1 and other["status"] == "failed"
        assert httpx.Response(200, content=hook.received[-1][1]).json()["error"]["type"] == "KeyError"
    plain = api.post(f"/api/v1/functions/{fn['name']}/async", json={}).json()["invocation_id"]
    assert settle(api, plain)["callback_status"] is None


@pytest.mark.parametrize("url", [
    "http://localhost:9/hook",  # a name the list does not hold (it holds 127.0.0.1)
    "http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data", "http://[::ffff:10.0.0.1]/x",
    "ftp://127.0.0.1/hook", "/relative", "http://127.0.0.1:99999/",
])
def test_a_callback_url_the_allow_list_refuses_is_a_422_problem(api, url):
    name = deploy(api)["name"]
    before = api.get(f"/api/v1/functions/{name}/invocations", params={"limit": 1000}).json()["invocations"]
    resp = api.post(f"/api/v1/functions/{name}/async", headers={"X-Nimbus-Callback-Url": url}, json={})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json") and resp.json()["detail"]
    after = api.get(f"/api/v1/functions/{name}/invocations", params={"limit": 1000}).json()["invocations"]
    assert len(after) == len(before)  # nothing was enqueued


def test_allow_list_entries():
    assert not AllowList("") and not AllowList(" , ")
    with pytest.raises(InvalidRequest, match="callbacks are off"):
        AllowList("").check("http://127.0.0.1/")
    allow = AllowList("hooks.example.com, .corp.example, 10.1.0.0/16, ::1")
    for url in ("https://hooks.example.com/x", "http://HOOKS.example.com:8443/", "http://a.corp.example/",
                "http://corp.example/", "http://10.1.2.3/", "http://[::1]:8080/"):
        assert allow.check(url) == url
    for url in ("http://evil.example.com/", "http://hooks.example.com.evil/", "http://xcorp.example/",
                "http://10.2.0.1/", "http://127.0.0.1/", "http://user@10.9.0.1/"):
        with pytest.raises(InvalidRequest):
            allow.check(url)
    with pytest.raises(ValueError):
        AllowList("not a host!")


def test_a_pending_callback_survives_a_restart(tmp_path, database_url, make_node):
    port = free_port()  # nothing listens there yet
    hook_url = f"http://127.0.0.1:{port}/hook"
    with make_node(tmp_path, database_url, **NODE_SETTINGS) as running, running.client() as api:
        fn = deploy(api)
        inv_id = api.post(f"/api/v1/functions/{fn['name']}/async", json={"n": 1},
                          headers={"X-Nimbus-Callback-Url": hook_url}).json()["invocation_id"]
        pending = settle(api, inv_id, lambda r: r["callback_attempts"] >= 1 and r["callback_status"] == "pending")
        assert pending["status"] == "succeeded"
    with Hook(port=port) as hook, make_node(tmp_path, database_url, **NODE_SETTINGS) as running:
        with running.client() as api:
            done = settle(api, inv_id, lambda r: r["callback_status"] == "delivered")
        assert done["callback_attempts"] >= 2
        assert [h["x-nimbus-invocation-id"] for h, _ in hook.received] == [inv_id]


def test_a_repeated_idempotency_key_returns_the_first_invocation(api, durable):
    fn = deploy(api, "import uuid\ndef handler(e, c):\n    return uuid.uuid4().hex\n")
    url = f"/api/v1/functions/{fn['name']}"
    sync_key, async_key = unique("sync"), unique("async")
    first = api.post(f"{url}/invoke", json={}, headers={"Idempotency-Key": sync_key}).json()
    again = api.post(f"{url}/invoke", json={"other": 1}, headers={"Idempotency-Key": sync_key}).json()
    assert first["status"] == "succeeded" and again == first  # the stored result: it did not run again

    queued = api.post(f"{url}/async", json={}, headers={"Idempotency-Key": async_key})
    repeat = api.post(f"{url}/async", json={}, headers={"Idempotency-Key": async_key})
    assert queued.status_code == repeat.status_code == 202
    assert repeat.json()["invocation_id"] == queued.json()["invocation_id"]
    assert repeat.headers["location"] == queued.headers["location"]
    settle(api, queued.json()["invocation_id"])
    # Keys of sync and async calls, and of other functions, do not mix: a reused key is a 409.
    assert api.post(f"{url}/async", json={}, headers={"Idempotency-Key": sync_key}).status_code == 409
    other = deploy(api)
    resp = api.post(f"/api/v1/functions/{other['name']}/invoke", json={}, headers={"Idempotency-Key": sync_key})
    assert resp.status_code == 409 and resp.headers["content-type"].startswith("application/problem+json")
    assert len(rows(durable.database_url, fn["id"])) == 2


def test_concurrent_requests_with_one_key_resolve_to_one_invocation(api, durable):
    fn = deploy(api, "import time, uuid\ndef handler(e, c):\n    time.sleep(0.2)\n    return uuid.uuid4().hex\n")
    url = f"{durable.url}/api/v1/functions/{fn['name']}"

    def call(args):
        mode, key = args
        with httpx.Client(timeout=60) as client:
            return client.post(f"{url}/{mode}", json={}, headers={"Idempotency-Key": key})

    sync_key, async_key = unique("sync"), unique("async")
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, [("invoke", sync_key)] * 12 + [("async", async_key)] * 12))
    sync, asyn = answers[:12], answers[12:]
    assert {r.status_code for r in sync} == {200} and {r.status_code for r in asyn} == {202}
    assert len({r.json()["invocation_id"] for r in sync}) == 1
    assert len({r.json()["output"] for r in sync}) == 1  # one run, one result, for all twelve
    assert len({r.json()["invocation_id"] for r in asyn}) == 1
    settle(api, asyn[0].json()["invocation_id"])
    assert len(rows(durable.database_url, fn["id"])) == 2


@pytest.mark.parametrize("key", ["x" * 257, b"cl\xe9", "a\tb", b"\x80\x81"])
def test_an_invalid_idempotency_key_is_a_422_problem(api, key):
    name = deploy(api)["name"]
    for mode in ("invoke", "async"):
        resp = api.post(f"/api/v1/functions/{name}/{mode}", json={}, headers={"Idempotency-Key": key})
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
    assert api.post(f"/api/v1/functions/{name}/invoke", json={},
                    headers={"Idempotency-Key": (uuid.uuid4().hex * 8)[:256]}).status_code == 200


def test_a_node_that_loses_its_lease_stops_the_call_and_its_late_outcome_is_dropped(api, durable):
    fn = deploy(api, SLEEP_AND_ECHO)
    inv_id = api.post(f"/api/v1/functions/{fn['name']}/async", json={"s": 4, "n": 1}).json()["invocation_id"]
    worker = durable.node.scheduler.async_worker
    wait_until(lambda: inv_id in worker._held and worker._held[inv_id].started, what="the call running")
    # Another node claims it, as it would once the lease ran out (a paused node, a partition).
    _i = tables.invocations
    sql(durable.database_url, _i.update().where(_i.c.id == inv_id).values(
        lease_owner="thief:1", lease_expires_at=datetime.now(UTC) + timedelta(hours=1)))
    wait_until(lambda: inv_id not in worker._held, what="the node noticing its lease is gone")
    # Its task has ended (cancelled, its machine killed): nothing of this attempt is left to write late.
    wait_until(lambda: not [t for t in list(worker._async_tasks) if t.get_name() == f"async-{inv_id}"],
               what="the attempt's task ending")
    (row,) = [r for r in rows(durable.database_url, fn["id"]) if r.id == inv_id]
    assert (row.status, row.lease_owner, row.attempts, row.output) == ("running", "thief:1", 1, None)
    sql(durable.database_url, _i.update().where(_i.c.id == inv_id).values(
        lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # the thief dies too
    final = settle(api, inv_id)
    assert (final["status"], final["output"], final["attempts"]) == ("succeeded", 1, 2)


def test_a_callback_that_keeps_failing_is_given_up_and_redirects_are_not_followed(tmp_path):
    """The deliverer on its own, against a real store and a real HTTP server that only ever redirects."""
    from nimbus.callbacks import Deliverer

    async def scenario(hook_url: str, allow: str, max_attempts: int) -> InvocationRecord:
        store = await Store.open(f"sqlite:///{tmp_path / 'cb.db'}")
        try:
            fn = await store.create_function(name=unique(), runtime="python3", handler="main.handler", env={},
                                             memory_mb=128, timeout_s=1, concurrency=1, code=b"x",
                                             code_kind="source")
            inv = InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, version=1,
                                   version_id=fn.version_id, mode="async", status="succeeded", output=b"1",
                                   callback_url=hook_url, callback_status="pending", finished_at=datetime.now(UTC))
            await store.insert_invocation(inv)
            deliverer = Deliverer(store, AllowList(allow), "node-x", poll_s=0.05, base_s=0.05,
                                  max_attempts=max_attempts)
            await deliverer.start()
            try:
                while (got := await store.get_invocation(inv.id)).callback_status == "pending":
                    await asyncio.sleep(0.05)
            finally:
                await deliverer.close()
            return got
        finally:
            await store.close()

    with Hook(redirect_to="http://10.0.0.1/elsewhere") as hook:
        got = asyncio.run(asyncio.wait_for(scenario(hook.url, "127.0.0.1", 3), 90))
        assert (got.callback_status, got.callback_attempts) == ("failed", 3)
        assert len(hook.received) == 3  # each redirect counted as a failure, never followed to 10.0.0.1
    with Hook() as hook:  # the allow list changed since the call was enqueued: refused without a request
        got = asyncio.run(asyncio.wait_for(scenario(hook.url, "10.0.0.0/8", 3), 90))
        assert (got.callback_status, got.callback_attempts, hook.received) == ("failed", 1, [])
