"""Three real nodes on one PostgreSQL database behind HAProxy (issue 21): a node killed mid-load loses no async
call and only its own sync calls, an update made on one node is served by another at once, the killed node
rejoins, and a drained node hands its functions over without a failed call.

Each node is ``nimbus up`` in a process of its own with a disjoint range of machine uids, so a function that
returns ``os.getuid()`` says which node ran it: that is how the test knows where HAProxy sent each name.
"""

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from nimbus.cluster.haproxy import render
from waiting import free_port, stop, wait_until

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="Debian's haproxy is not installed (make test-tools installs it)"),
]

NIMBUS = Path(sys.executable).with_name("nimbus")
PG_ADMIN_DSN = os.environ.get("NIMBUS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
UID_BASE, UID_STEP = 0x70000000, 0x100000
HEARTBEAT_S, DEAD_S, POLL_S, DRAIN_S = 0.5, 3.0, 1.0, 3.0  # drain > HAProxy fall 2 x inter 1 s
CACHE_S = 30  # longer than any wait below: only a notification explains a node seeing a change quickly
WHO = ("import os, time\n\ndef handler(event, context):\n    time.sleep(event.get('sleep', 0))\n"
       "    return {'i': event.get('i'), 'uid': os.getuid(), 'v': VERSION}\n")
SYNC_THREADS = 6
ASYNC_BEFORE, ASYNC_AFTER, ASYNC_SLEEP_S = 60, 15, 0.5


def code(version: int) -> str:
    return WHO.replace("VERSION", str(version))


def node_of(uid: int) -> int:
    return (uid - UID_BASE) // UID_STEP


async def _sql(dsn: str, query: str, *args) -> list:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def sql(dsn: str, query: str, *args) -> list:
    return asyncio.run(_sql(dsn, query, *args))


class Node:
    """One ``nimbus up`` process; ``start`` again after ``kill`` brings it back on the same home and port."""

    def __init__(self, index: int, home: Path, database_url: str) -> None:
        self.index = index
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
        self.env.update({f"NIMBUS_{k}": str(v) for k, v in {
            "DATABASE_URL": database_url, "RUNTIMES": "python3", "FUNCTION_TEMPLATES": "off",
            "LOG_LEVEL": "info", "MACHINE_UID_BASE": UID_BASE + index * UID_STEP, "MACHINE_UID_COUNT": UID_STEP,
            "MIN_WARM": 1, "MAX_WARM": 2, "HEARTBEAT_S": HEARTBEAT_S, "NODE_DEAD_S": DEAD_S,
            "ASYNC_POLL_S": POLL_S, "ASYNC_RETRY_BASE_S": 0.2, "FUNCTION_CACHE_S": CACHE_S,
            "DRAIN_S": DRAIN_S, "ADVERTISE_URL": self.url}.items()})
        self.log_path = home / "node.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([str(NIMBUS), "up", "--home", str(self.home), "--port", str(self.port)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"node {self.index} exited: {self.output()}"
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def id(self) -> str:
        return (self.home / "node-id").read_text().strip()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def registry(self) -> dict[str, dict]:
        """node id -> its row in this node's ``GET /api/v1/nodes``."""
        response = httpx.get(f"{self.url}/api/v1/nodes", timeout=10)
        assert response.status_code == 200, response.text
        return {row["id"]: row for row in response.json()["nodes"]}


@dataclass
class Cluster:
    nodes: list[Node]
    balancer: str
    database_url: str
    homes: dict[str, int] = field(default_factory=dict)  # function name -> index of the node HAProxy sends it to

    def deploy(self, name: str, **fields) -> None:
        response = httpx.post(f"{self.balancer}/api/v1/functions", timeout=60,
                              json={"name": name, "runtime": "python3", "code": code(1), **fields})
        assert response.status_code == 201, response.text

    def call(self, base: str, name: str, i: int = 0) -> dict:
        response = httpx.post(f"{base}/api/v1/functions/{name}/invoke", json={"i": i}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "succeeded" and body["output"]["i"] == i, body
        return body["output"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    name = f"nimbus_cluster_{uuid.uuid4().hex[:12]}"
    sql(PG_ADMIN_DSN, f'CREATE DATABASE "{name}"')
    database_url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    nodes = [Node(i, tmp_path_factory.mktemp(f"node{i}"), database_url) for i in range(3)]
    haproxy = None
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            wait_until(node.healthy, 120, f"node {node.index} answering /health")
        port = free_port()
        config = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
        config.write_text(render(servers=[node.url for node in nodes], bind=f"127.0.0.1:{port}"))
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        balancer = f"http://127.0.0.1:{port}"

        def through() -> bool:
            assert haproxy.poll() is None, "haproxy exited"
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{balancer}/health", timeout=5).status_code == 200
            return False

        wait_until(through, 60, "HAProxy passing /health to a node")
        running = Cluster(nodes, balancer, database_url)
        # Functions until every node is the home of two: the uid of each first call says whose it is.
        for n in itertools.count():
            if n >= 40 or all(list(running.homes.values()).count(i) >= 2 for i in range(3)):
                break
            running.deploy(f"who-{n}")
            running.homes[f"who-{n}"] = node_of(running.call(balancer, f"who-{n}")["uid"])
        yield running
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(30)
        for node in nodes:
            node.stop()
        sql(PG_ADMIN_DSN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_every_node_lists_the_three_up_and_itself(cluster):
    ids = {node.id for node in cluster.nodes}
    for node in cluster.nodes:
        rows = wait_until(lambda node=node: r if set(r := node.registry()) == ids else None, 30, "three rows")
        assert {row["state"] for row in rows.values()} == {"up"}, rows
        assert [i for i, row in rows.items() if row["self"]] == [node.id], rows
        assert rows[node.id]["address"] == node.url
    assert sorted(set(cluster.homes.values())) == [0, 1, 2], cluster.homes


def test_an_update_through_one_node_is_served_by_another_at_once(cluster):
    a, b = cluster.nodes[0].url, cluster.nodes[1].url
    cluster.deploy("changing")
    assert httpx.post(f"{a}/api/v1/functions/changing/versions", timeout=30).status_code == 201
    assert httpx.post(f"{a}/api/v1/functions/changing/aliases", timeout=30,
                      json={"name": "live", "version": 1}).status_code == 201
    assert cluster.call(b, "changing")["v"] == 1  # B has it cached now, for CACHE_S
    assert cluster.call(b, "changing:live")["v"] == 1

    def served(qualified: str, version: int):
        return lambda: cluster.call(b, qualified)["v"] == version

    put = httpx.put(f"{a}/api/v1/functions/changing", json={"code": code(2)}, timeout=30)
    assert put.status_code == 200, put.text
    began = time.monotonic()
    wait_until(served("changing", 2), CACHE_S / 3, "B serving the new code")
    update_s = time.monotonic() - began

    assert httpx.post(f"{a}/api/v1/functions/changing/versions", timeout=30).status_code == 201
    moved = httpx.put(f"{a}/api/v1/functions/changing/aliases/live", json={"version": 2}, timeout=30)
    assert moved.status_code == 200, moved.text
    began = time.monotonic()
    wait_until(served("changing:live", 2), CACHE_S / 3, "B following the alias")
    alias_s = time.monotonic() - began
    print(f"\nB served the update {update_s:.3f} s and the alias change {alias_s:.3f} s after A made them "
          f"(function cache {CACHE_S} s)")


@dataclass
class Call:
    name: str
    sent: float
    returned: float
    outcome: str  # ok | error (a connection error or HAProxy's 502/503) | wrong


class SyncLoad:
    """Threads calling the ``who-`` functions through HAProxy in turn until stopped, every call recorded."""

    def __init__(self, balancer: str, names: list[str]) -> None:
        self.balancer, self.names = balancer, names
        self.calls: list[Call] = []
        self.stopped = threading.Event()
        self.counter = itertools.count()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(SYNC_THREADS)]

    def __enter__(self) -> "SyncLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(120)

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.balancer, timeout=60) as client:
            for n in itertools.count(offset):
                if self.stopped.is_set():
                    return
                name, i = self.names[n % len(self.names)], next(self.counter)
                sent = time.monotonic()
                try:
                    response = client.post(f"/api/v1/functions/{name}/invoke", json={"i": i, "sleep": 0.02})
                except httpx.TransportError:
                    outcome = "error"
                else:
                    if response.status_code in (502, 503):
                        outcome = "error"
                    elif response.status_code == 200 and response.json().get("status") == "succeeded" and \
                            response.json()["output"]["i"] == i and response.json()["output"]["uid"] >= UID_BASE:
                        outcome = "ok"
                    else:
                        outcome = f"wrong: {response.status_code} {response.text[:200]}"
                self.calls.append(Call(name, sent, time.monotonic(), outcome))


def submit(balancer: str, n: int) -> tuple[list[str], int]:
    """``n`` async calls of ``slow`` through HAProxy: the ids accepted, and how many were refused."""
    accepted, refused = [], 0
    with httpx.Client(base_url=balancer, timeout=60) as client:
        for i in range(n):
            try:
                response = client.post("/api/v1/functions/slow/async", json={"i": i, "sleep": ASYNC_SLEEP_S})
            except httpx.TransportError:
                refused += 1
                continue
            if response.status_code == 202:
                accepted.append(response.json()["invocation_id"])
            else:
                assert response.status_code in (502, 503), response.text
                refused += 1
    return accepted, refused


def leased(cluster: Cluster) -> dict[str, list[str]]:
    """node id -> ids of the started async calls it holds now."""
    rows = sql(cluster.database_url, "SELECT id, lease_owner FROM invocations "
                                     "WHERE status = 'running' AND attempts > 0 AND lease_owner IS NOT NULL")
    held: dict[str, list[str]] = {}
    for row in rows:
        held.setdefault(row["lease_owner"].split(":")[0], []).append(row["id"])
    return held


def test_a_node_killed_mid_load_loses_no_async_call_and_only_its_own_sync_calls(cluster):
    # Two at a time on each node, half a second each: the batch runs for seconds, some on every node.
    cluster.deploy("slow", concurrency=2)
    with SyncLoad(cluster.balancer, sorted(cluster.homes)) as load:
        accepted, refused = submit(cluster.balancer, ASYNC_BEFORE)
        by_id = {node.id: node for node in cluster.nodes}

        def victim_found() -> Node | None:
            held = leased(cluster)
            homes = set(cluster.homes.values())
            found = [by_id[owner] for owner in held if owner in by_id and by_id[owner].index in homes]
            return max(found, key=lambda node: len(held[node.id])) if found else None

        victim = wait_until(victim_found, 60, "a node with sync functions running async calls")
        killed_at = time.monotonic()
        victim.kill()
        kill_done = time.monotonic()
        # Exact: a killed node commits nothing more.
        running_there = {row["id"] for row in sql(
            cluster.database_url, "SELECT id FROM invocations WHERE status = 'running' AND lease_owner LIKE $1",
            f"{victim.id}:%")}
        survivor = next(node for node in cluster.nodes if node is not victim)

        wait_until(lambda: survivor.registry()[victim.id]["state"] == "dead", 10 * (DEAD_S + HEARTBEAT_S),
                   "the killed node shown dead")
        dead_s = time.monotonic() - killed_at

        def taken_over() -> bool:
            rows = sql(cluster.database_url, "SELECT status, lease_owner FROM invocations WHERE id = ANY($1)",
                       list(running_there))
            return all(row["status"] in ("succeeded", "failed") or
                       (row["status"] == "running" and not row["lease_owner"].startswith(f"{victim.id}:"))
                       for row in rows)

        wait_until(taken_over, 10 * (DEAD_S + POLL_S), "the killed node's async calls taken over")
        takeover_s = time.monotonic() - killed_at

        more, more_refused = submit(cluster.balancer, ASYNC_AFTER)
        accepted, refused = accepted + more, refused + more_refused

        def all_finished() -> bool:
            rows = sql(cluster.database_url, "SELECT count(*) AS n FROM invocations WHERE id = ANY($1) "
                                             "AND status IN ('succeeded', 'failed', 'timed_out')", accepted)
            return rows[0]["n"] == len(accepted)

        wait_until(all_finished, 120, "every async call finished")
        # Sync calls keep coming until HAProxy has long stopped sending the dead node anything.
        wait_until(lambda: time.monotonic() > killed_at + 3 * DEAD_S, 60)

    rows = sql(cluster.database_url, "SELECT id, status, attempts FROM invocations WHERE function_name = 'slow'")
    by_row = {row["id"]: row for row in rows}
    assert set(accepted) <= set(by_row), "accepted async calls without a row"
    assert len(by_row) <= len(accepted) + refused
    assert {by_row[i]["status"] for i in accepted} == {"succeeded"}, [dict(by_row[i]) for i in accepted]
    again = {i for i, row in by_row.items() if row["attempts"] > 1}
    assert again <= running_there, (again, running_there)
    assert all(row["attempts"] <= 2 for row in rows)

    wrong = [call for call in load.calls if call.outcome.startswith("wrong")]
    assert not wrong, wrong[:5]
    errors = [call for call in load.calls if call.outcome == "error"]
    victims = {name for name, home in cluster.homes.items() if home == victim.index}
    in_flight = [call for call in load.calls if call.name in victims
                 and call.sent <= kill_done and call.returned >= killed_at]
    assert len(errors) <= len(in_flight), (errors, in_flight)
    print(f"\nkilled node {victim.index} with {len(running_there)} async calls leased; "
          f"{len(again)} ran again elsewhere; {len(accepted)} async calls accepted, {refused} refused; "
          f"shown dead after {dead_s:.2f} s, its async calls taken over after {takeover_s:.2f} s; "
          f"{len(load.calls)} sync calls, {len(errors)} errors, {len(in_flight)} in flight on it at the kill")

    # It comes back on the same home and port: up again in the registry, and HAProxy's again.
    victim.start()
    wait_until(victim.healthy, 120, "the restarted node answering")
    wait_until(lambda: survivor.registry()[victim.id]["state"] == "up", 30, "the restarted node up again")
    mine = sorted(victims)
    wait_until(lambda: node_of(cluster.call(cluster.balancer, mine[0])["uid"]) == victim.index, 60,
               "HAProxy sending the restarted node its functions again")
    for n, name in enumerate(sorted(cluster.homes) * 2):
        assert node_of(cluster.call(cluster.balancer, name, n)["uid"]) == cluster.homes[name]


def test_a_drained_node_keeps_serving_then_hands_its_functions_over_without_a_failed_call(cluster):
    drained = cluster.nodes[2]
    other = cluster.nodes[0]
    mine = sorted(name for name, home in cluster.homes.items() if home == drained.index)
    wait_until(lambda: node_of(cluster.call(cluster.balancer, mine[0])["uid"]) == drained.index, 60,
               "HAProxy sending the node its functions")
    with SyncLoad(cluster.balancer, mine) as load:
        wait_until(lambda: len(load.calls) > 20, 60)
        assert drained.proc is not None
        drained.proc.send_signal(signal.SIGTERM)

        def draining() -> bool:
            try:
                return httpx.get(f"{drained.url}/health", timeout=5).status_code == 503
            except httpx.HTTPError:
                return False

        wait_until(draining, 30, "/health answering 503")
        assert other.registry()[drained.id]["state"] == "draining"
        assert node_of(cluster.call(drained.url, mine[0], 7)["uid"]) == drained.index  # still served
        drained.proc.wait(60)
        wait_until(lambda: other.registry()[drained.id]["state"] == "stopped", 30, "the registry saying stopped")
        moved = len(load.calls)
        wait_until(lambda: len(load.calls) > moved + 20, 60)

    assert [c for c in load.calls if c.outcome != "ok"] == []
    assert node_of(cluster.call(cluster.balancer, mine[0])["uid"]) != drained.index
