"""The node registry and change notifications (issue 21): rows, heartbeats, dead nodes taken over once,
LISTEN/NOTIFY between stores and between whole nodes, draining. The three-node run behind HAProxy with a
``kill -9`` is ``test_cluster.py``."""

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from nimbus.store import InvocationRecord, NodeRecord, Store, tables
from nimbus.store.changes import CHANNEL
from waiting import wait_until

ECHO_1 = "def handler(event, context):\n    return 1\n"
ECHO_2 = "def handler(event, context):\n    return 2\n"


def unique(prefix: str = "r") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create(store: Store):
    return await store.create_function(name=unique("fn"), runtime="python3", handler="main.handler", env={},
                                       memory_mb=128, timeout_s=30.0, concurrency=10, code=ECHO_1.encode(),
                                       code_kind="source")


async def until(check, seconds: float = 20.0) -> None:
    """Wait on the event loop (the listener runs on it) for ``check()``; the bound is for a broken test."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def queued(fn) -> InvocationRecord:
    return InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, version_id=fn.version_id,
                            version=fn.version, mode="async", status="queued", event=b"{}", tenant=fn.tenant,
                            created_at=datetime.now(UTC))


def node_record(node_id: str, **values) -> NodeRecord:
    return NodeRecord(id=node_id, address="http://10.0.0.1:8080", driver="bwrap", runtimes=["python3"],
                      capacity={"workers": 4, "max_machines": 8}, version="test", state="up", **values)


async def age(store: Store, node_id: str, seconds: float) -> None:
    """Move a node's last heartbeat into the past, as if it had stopped beating then."""
    async with store._write_one() as conn:
        await conn.execute(tables.nodes.update().where(tables.nodes.c.id == node_id)
                           .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=seconds)))


# ---------------------------------------------------------------- the registry in the store


async def test_a_node_registers_beats_and_is_listed(database_url):
    store = await Store.open(database_url)
    try:
        me = unique("node")
        await store.register_node(node_record(me, stats={"machines": 3}))
        assert await store.heartbeat_node(me, state="draining", stats={"machines": 5, "in_flight": 2})
        found = {n.id: n for n in await store.list_nodes()}[me]
        assert (found.state, found.stats, found.runtimes, found.capacity["workers"]) == (
            "draining", {"machines": 5, "in_flight": 2}, ["python3"], 4)
        # A restart under the same id replaces the row whole.
        await store.register_node(node_record(me, stats={}))
        assert {n.id: n for n in await store.list_nodes()}[me].state == "up"
        assert not await store.heartbeat_node(unique("never-registered"), state="up", stats={})
    finally:
        await store.close()


async def test_a_silent_node_is_declared_dead_once_and_its_async_work_is_queued_again(database_url):
    stores = [await Store.open(database_url) for _ in range(3)]
    store = stores[0]
    try:
        dead, alive = unique("dead"), unique("alive")
        await store.register_node(node_record(dead))
        await store.register_node(node_record(alive))
        fn = await create(store)
        inv = queued(fn)
        await store.insert_invocation(inv)
        claimed = await store.claim_async(dead, limit=10, lease_s=600, busy={})
        assert [c.id for c in claimed] == [inv.id]
        await store.start_attempt(inv.id, claimed[0].lease_owner)

        assert await store.claim_dead_nodes(5, exclude=alive) == []  # it beat a moment ago
        await age(store, dead, 60)
        # Several live nodes notice together: exactly one of them gets the dead node.
        won = await asyncio.gather(*(s.claim_dead_nodes(5, exclude=unique("x")) for s in stores))
        assert sorted(sum(won, [])) == [dead]
        assert await store.release_owned(dead) == 1
        again = (await store.get_invocation(inv.id, fn.tenant))
        assert (again.status, again.lease_owner, again.attempts) == ("queued", None, 1)
        # Claimable at once, not when the 600 s lease would have run out.
        assert [c.id for c in await store.claim_async(alive, limit=10, lease_s=60, busy={})] == [inv.id]

        # The dead node was only paused: its next heartbeat is refused, so it knows to register again.
        assert not await store.heartbeat_node(dead, state="up", stats={})
        assert {n.id: n.state for n in await store.list_nodes()}[dead] == "dead"
        # A node never declares itself dead.
        await age(store, alive, 60)
        assert alive not in await store.claim_dead_nodes(5, exclude=alive)
        # Rows of nodes long gone are deleted; a stopped node's too, a live one's never.
        await store.set_node_state(alive, "stopped")
        await age(store, alive, 7200)
        await age(store, dead, 7200)
        await store.forget_nodes(3600)
        assert not {dead, alive} & {n.id for n in await store.list_nodes()}
    finally:
        for s in stores:
            await s.close()


# ---------------------------------------------------------------- notifications between stores


@pytest.mark.postgres
async def test_changes_reach_other_stores_and_not_their_sender(pg_database):
    sender, receiver = await Store.open(pg_database), await Store.open(pg_database)
    got_receiver: list[dict] = []
    got_sender: list[dict] = []
    listeners = [receiver.listener(got_receiver.append), sender.listener(got_sender.append)]
    try:
        for listener in listeners:
            await listener.start()
            assert listener.listening.is_set()
        fn = await create(sender)
        # The receiver cached the function; the change must drop it before the cache's own time runs out.
        await receiver.lookup_function(fn.name)
        updated = await sender.update_function(fn.id, code=ECHO_2.encode(), code_kind="source")
        await until(lambda: any(c["k"] == "function" for c in got_receiver), 10)
        change = next(c for c in got_receiver if c["k"] == "function")
        assert (change["id"], change["version_id"]) == (fn.id, updated.version_id)
        assert (await receiver.lookup_function(fn.name)).version_id == updated.version_id

        inv = queued(updated)
        await sender.insert_invocation(inv)
        await until(lambda: any(c["k"] == "work" for c in got_receiver), 10)
        await sender.delete_function(fn.id)
        await until(lambda: any(c["k"] == "function_deleted" for c in got_receiver), 10)
        # Reading a key announces nothing; revoking it does. The sentinel after the read arrives behind
        # anything the read might have sent (notifications come in commit order).
        key = await sender.create_api_key(tenant="default", name=unique("k"), key_hash=uuid.uuid4().hex)
        await sender.get_api_key(key.id)
        await sender._notify("sentinel", {})
        await until(lambda: any(c["k"] == "sentinel" for c in got_receiver), 10)
        assert not any(c["k"] == "key" for c in got_receiver)
        await sender.revoke_api_key(key.id)
        await until(lambda: any(c["k"] == "key" and c["key_hash"] == key.key_hash for c in got_receiver), 10)
        # Its own notifications never come back to the sender: only the first connect's resync.
        assert [c["k"] for c in got_sender] == ["resync"]
    finally:
        for listener in listeners:
            await listener.close()
        await sender.close()
        await receiver.close()


@pytest.mark.postgres
async def test_a_listener_whose_connection_is_killed_reconnects_and_says_resync(pg_database):
    store = await Store.open(pg_database)
    got: list[dict] = []
    listener = store.listener(got.append)
    try:
        await listener.start()
        assert [c["k"] for c in got] == ["resync"]
        async with store._write_one() as conn:
            await conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       "WHERE query LIKE :q AND pid <> pg_backend_pid()"),
                               {"q": f'LISTEN "{CHANNEL}"%'})
        await until(lambda: [c["k"] for c in got] == ["resync", "resync"], 20)
        # Listening again: a change sent now arrives.
        await until(lambda: listener.listening.is_set(), 10)
        other = await Store.open(pg_database)
        try:
            await other._notify("routes", {})
        finally:
            await other.close()
        await until(lambda: got[-1]["k"] == "routes", 10)
    finally:
        await listener.close()
        await store.close()


async def test_no_listener_on_sqlite_or_with_notify_off(database_url, pg_database):
    sqlite_store = await Store.open(database_url if database_url.startswith("sqlite") else pg_database,
                                    notify=database_url.startswith("sqlite"))
    try:
        assert sqlite_store.listener(lambda change: None) is None
    finally:
        await sqlite_store.close()


# ---------------------------------------------------------------- whole nodes


@pytest.mark.sandbox
@pytest.mark.postgres
def test_a_change_on_one_node_is_served_by_another_at_once(make_node, tmp_path, pg_database):
    """The look-up caches are set to a minute: only the notification explains B seeing A's changes."""
    slow_cache = {"function_cache_s": 60, "auth": "on", "auth_cache_s": 60}
    with (make_node(tmp_path / "a", pg_database, **slow_cache) as a,
          make_node(tmp_path / "b", pg_database, machine_uid_base=0x71000000, **slow_cache) as b):
        with a.client() as bare:
            admin = bare.post("/api/v1/keys", json={"name": unique("k"), "admin": True},
                              headers={"Authorization": f"Bearer {first_admin_key(a)}"})
        assert admin.status_code == 201, admin.text
        headers = {"Authorization": f"Bearer {admin.json()['key']}"}
        with a.client(headers=headers) as ca, b.client(headers=headers) as cb:
            name = unique("fn")
            assert ca.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                      "code": ECHO_1}).status_code == 201
            assert cb.post(f"/api/v1/functions/{name}/invoke", json={}).json()["output"] == 1
            machines_before = b.node.pool.stats()["python3"]["idle"]
            assert ca.put(f"/api/v1/functions/{name}", json={"code": ECHO_2}).status_code == 200
            began = time.monotonic()
            assert cb.post(f"/api/v1/functions/{name}/invoke", json={}).json()["output"] == 2
            print(f"B served A's update {1000 * (time.monotonic() - began):.1f} ms after A answered")
            assert machines_before >= 1  # B's machine of the old revision was retired, not kept idle
            wait_until(lambda: b.node.pool.stats()["python3"]["idle"] == 1, 10)

            # A key revoked through A stops working on B with its next request.
            other = ca.post("/api/v1/keys", json={"name": unique("k")}).json()
            assert cb.get("/api/v1/functions", headers={"Authorization": f"Bearer {other['key']}"}).status_code == 200
            assert ca.delete(f"/api/v1/keys/{other['id']}").status_code in (200, 204)
            assert cb.get("/api/v1/functions", headers={"Authorization": f"Bearer {other['key']}"}).status_code == 401

            # A deletion: B answers 404 and keeps no machine of it.
            assert ca.delete(f"/api/v1/functions/{name}").status_code == 204
            assert cb.post(f"/api/v1/functions/{name}/invoke", json={}).status_code == 404
            wait_until(lambda: b.node.pool.stats()["python3"]["idle"] == 0, 10)

            nodes = cb.get("/api/v1/nodes").json()["nodes"]
            mine = {n["id"]: n for n in nodes}
            ids = {a.node.registry.node_id, b.node.registry.node_id}
            assert ids <= set(mine) and all(mine[i]["state"] == "up" for i in ids)
            assert [n["id"] for n in nodes if n["self"]] == [b.node.registry.node_id]
            # A tenant's key may not see the fleet.
            tenant_key = ca.post("/api/v1/keys", json={"name": unique("k"), "tenant": unique("t")}).json()["key"]
            assert cb.get("/api/v1/nodes", headers={"Authorization": f"Bearer {tenant_key}"}).status_code == 403


def first_admin_key(running) -> str:
    """An admin key made straight in the node's store (on a shared database the node's first key may be
    another test's)."""
    from nimbus.gateway import auth

    key = auth.new_key()

    async def make():
        await running.node.store.create_api_key(tenant="default", name=unique("first"), admin=True,
                                                key_hash=auth.hash_key(key), prefix=auth.display_prefix(key))

    asyncio.run_coroutine_threadsafe(make(), running.node.registry._task.get_loop()).result(10)
    return key


@pytest.mark.sandbox
def test_a_draining_node_says_so_and_still_serves(make_node, tmp_path, database_url):
    with make_node(tmp_path / "n", database_url) as running, running.client() as client:
        name = unique("fn")
        assert client.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                      "code": ECHO_1}).status_code == 201
        assert client.get("/health").status_code == 200
        node = running.node
        loop = node.registry._task.get_loop()
        loop.call_soon_threadsafe(node.begin_drain)
        wait_until(lambda: client.get("/health").status_code == 503, 10)
        health = client.get("/health")
        assert health.headers["content-type"].startswith("application/problem+json")
        assert health.json()["title"] == "Draining"
        wait_until(lambda: {n["id"]: n for n in client.get("/api/v1/nodes").json()["nodes"]}[
            node.registry.node_id]["state"] == "draining", 10)
        # Still behind the balancer until it notices: calls keep working.
        assert client.post(f"/api/v1/functions/{name}/invoke", json={}).json()["output"] == 1
        node_id, url = node.registry.node_id, database_url
    # A clean stop is not a death: the row says stopped, and nobody takes anything over.

    async def state():
        store = await Store.open(url)
        try:
            return {n.id: n.state for n in await store.list_nodes()}[node_id]
        finally:
            await store.close()

    assert asyncio.run(state()) == "stopped"


def test_cluster_settings_are_checked():
    from pydantic import ValidationError

    from nimbus.config import Settings

    assert Settings(advertise_url="http://10.1.2.3:8080").advertise_url == "http://10.1.2.3:8080"
    for bad in ({"advertise_url": "10.1.2.3:8080"}, {"advertise_url": "http://x/path"}, {"node_dead_s": 0},
                {"drain_s": -1}, {"notify": "maybe"}):
        with pytest.raises(ValidationError):
            Settings(**bad)
