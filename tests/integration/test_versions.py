"""Published versions: the store on SQLite and PostgreSQL, migration 0008, and a real node invoking each
qualifier (the function reports ``context.function_version``; the answer's ``executed_version`` agrees)."""

import asyncio
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import nimbus.store
from nimbus.errors import Conflict, InvalidRequest, NotFound
from nimbus.gateway.names import merge_qualifier, split_qualifier
from nimbus.store import Store, tables
from nimbus.store.database import normalise_url

MIGRATIONS_DIR = Path(nimbus.store.__file__).parent / "migrations"
CODE = b"def handler(event, context):\n    return event\n"


def unique(prefix: str = "v") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def store(database_url):
    opened = await Store.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def create(store: Store, name: str | None = None, **overrides):
    values = dict(name=name or unique(), runtime="python3", handler="main.handler", env={}, memory_mb=128,
                  timeout_s=30.0, concurrency=10, code=CODE, code_kind="source")
    values.update(overrides)
    return await store.create_function(**values)


# ---------------------------------------------------------------- names


def test_split_qualifier():
    assert split_qualifier("hello") == ("hello", None)
    assert split_qualifier("hello:prod") == ("hello", "prod")
    assert split_qualifier("hello:3") == ("hello", "3")
    assert split_qualifier("hello:$LATEST") == ("hello", "$LATEST")
    with pytest.raises(InvalidRequest):
        split_qualifier("hello:")
    assert merge_qualifier("hello", "prod") == ("hello", "prod")
    assert merge_qualifier("hello:prod", "prod") == ("hello", "prod")
    with pytest.raises(InvalidRequest, match="qualifier"):
        merge_qualifier("hello:prod", "beta")


# ---------------------------------------------------------------- the store


async def test_publish_is_idempotent_numbers_ascend_and_are_never_reused(store):
    fn = await create(store, description="first", role="arn:aws:iam::000000000000:role/r")
    assert (fn.published, fn.description, fn.role) == (None, "first", "arn:aws:iam::000000000000:role/r")
    one = await store.publish_version(fn.name, fn.tenant, description="v one")
    assert (one.published, one.id, one.description) == (1, fn.version_id, "v one")
    again = await store.publish_version(fn.name, fn.tenant, description="ignored")
    assert (again.published, again.id, again.description) == (1, fn.version_id, "v one")  # nothing changed
    assert (await store.get_function(fn.name)).published == 1

    v2 = await store.update_function(fn.name, memory_mb=256)
    assert (v2.published, v2.description, v2.role) == (None, "first", "arn:aws:iam::000000000000:role/r")
    two = await store.publish_version(fn.id, fn.tenant)
    assert (two.published, two.id, two.memory_mb) == (2, v2.version_id, 256)
    assert [v.published for v in await store.list_published(fn.name, fn.tenant)] == [1, 2]
    assert (await store.get_published(fn.name, fn.tenant, 1)).memory_mb == 128

    await store.delete_published(fn.name, fn.tenant, 2)
    with pytest.raises(NotFound):
        await store.get_published(fn.name, fn.tenant, 2)
    with pytest.raises(NotFound):
        await store.delete_published(fn.name, fn.tenant, 2)
    # $LATEST is the revision that was 2; publishing it again gives a new number, not 2.
    three = await store.publish_version(fn.name, fn.tenant)
    assert (three.published, three.id) == (3, v2.version_id)
    assert [v.published for v in await store.list_published(fn.name, fn.tenant)] == [1, 3]
    with pytest.raises(NotFound):
        await store.get_published(fn.name, fn.tenant, "abc")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await store.publish_version(unique(), fn.tenant)
    with pytest.raises(NotFound):  # another tenant sees nothing
        await store.list_published(fn.name, "someone-else")


async def test_a_published_version_keeps_the_isolation_it_was_published_with(store):
    fn = await create(store, isolation="per-call")
    one = await store.publish_version(fn.name, fn.tenant)
    assert (one.published, one.isolation) == (1, "per-call")
    await store.update_function(fn.name, isolation="shared")
    two = await store.publish_version(fn.name, fn.tenant)
    assert (two.published, two.isolation) == (2, "shared")
    assert [(v.published, v.isolation) for v in await store.list_published(fn.name, fn.tenant)] == [
        (1, "per-call"), (2, "shared")]
    assert (await store.get_published(fn.name, fn.tenant, 1)).isolation == "per-call"
    await store.create_alias(fn.name, fn.tenant, "prod", version=1)
    await store.update_function(fn.name, isolation="per-call", memory_mb=256)  # $LATEST moves on; 1 and 2 stay
    for qualifier, isolation in (("1", "per-call"), ("prod", "per-call"), ("2", "shared"), (None, "per-call")):
        record, executed = await store.lookup_qualified(fn.name, fn.tenant, qualifier)
        assert record.isolation == isolation, qualifier
        assert record.deployment(executed).isolation == isolation, qualifier
    assert (await store.get_published(fn.name, fn.tenant, 2)).deployment("2").isolation == "shared"


async def test_aliases_validate_and_block_deleting_their_versions(store):
    fn = await create(store)
    await store.publish_version(fn.name, fn.tenant)
    await store.update_function(fn.name, memory_mb=256)
    await store.publish_version(fn.name, fn.tenant)
    prod = await store.create_alias(fn.name, fn.tenant, "prod", version="1", additional={2: 0.25},
                                    description="live")
    assert (prod.version, prod.additional, prod.description, prod.function_name) == (1, {2: 0.25}, "live", fn.name)
    with pytest.raises(Conflict):
        await store.create_alias(fn.name, fn.tenant, "prod", version=1)
    latest = await store.create_alias(fn.name, fn.tenant, "edge", version="$LATEST")
    assert latest.version == "$LATEST"
    bad = [
        dict(alias="123", version=1),  # all digits: a version number
        dict(alias="a.b", version=1),
        dict(alias="x" * 129, version=1),
        dict(alias="w1", version=1, additional={2: 1.5}),
        dict(alias="w2", version=1, additional={2: -0.1}),
        dict(alias="w3", version=1, additional={1: 0.1}),  # the same as the main version
        dict(alias="w4", version=1, additional={2: 0.1, 3: 0.1}),
        dict(alias="w5", version="$LATEST", additional={2: 0.1}),
        dict(alias="w6", version="latest"),
        dict(alias="w7", version=1, additional={2: True}),
    ]
    for args in bad:
        alias = args.pop("alias")
        with pytest.raises(InvalidRequest):
            await store.create_alias(fn.name, fn.tenant, alias, **args)
    with pytest.raises(NotFound):
        await store.create_alias(fn.name, fn.tenant, "ghost", version=7)
    with pytest.raises(NotFound):
        await store.create_alias(fn.name, fn.tenant, "ghost", version=1, additional={9: 0.5})

    for number in (1, 2):  # main and additional versions are both in use
        with pytest.raises(Conflict, match="prod"):
            await store.delete_published(fn.name, fn.tenant, number)
    updated = await store.update_alias(fn.name, fn.tenant, "prod", version=2, additional={})
    assert (updated.version, updated.additional, updated.description) == (2, {}, "live")
    assert updated.revision_id != prod.revision_id and updated.created_at == prod.created_at
    await store.delete_published(fn.name, fn.tenant, 1)  # nothing routes to 1 now
    with pytest.raises(NotFound):
        await store.update_alias(fn.name, fn.tenant, "prod", version=1)
    assert [a.name for a in await store.list_aliases(fn.name, fn.tenant)] == ["edge", "prod"]
    await store.delete_alias(fn.name, fn.tenant, "edge")
    with pytest.raises(NotFound):
        await store.get_alias(fn.name, fn.tenant, "edge")
    with pytest.raises(NotFound):
        await store.delete_alias(fn.name, fn.tenant, "edge")

    await store.delete_function(fn.name)  # deletes versions and aliases with it
    async with store._read() as conn:
        left = await conn.scalar(sa.select(sa.func.count()).select_from(tables.aliases)
                                 .where(tables.aliases.c.function_id == fn.id))
    assert left == 0
    again = await create(store, name=fn.name)
    with pytest.raises(NotFound):
        await store.get_alias(again.name, again.tenant, "prod")
    assert await store.list_published(again.name, again.tenant) == []


async def test_lookup_qualified_resolves_each_qualifier(store):
    fn = await create(store, env={"TAG": "a"})
    await store.publish_version(fn.name, fn.tenant)
    await store.update_function(fn.name, env={"TAG": "b"})
    await store.publish_version(fn.name, fn.tenant)
    await store.update_function(fn.name, env={"TAG": "c"})
    await store.create_alias(fn.name, fn.tenant, "prod", version=1)
    await store.create_alias(fn.name, fn.tenant, "all-two", version=1, additional={2: 1.0})
    await store.create_alias(fn.name, fn.tenant, "edge", version="$LATEST")
    cases = {None: ("c", "$LATEST"), "$LATEST": ("c", "$LATEST"), "1": ("a", "1"), "2": ("b", "2"),
             "prod": ("a", "1"), "all-two": ("b", "2"), "edge": ("c", "$LATEST")}
    for qualifier, (tag, version) in cases.items():
        record, executed = await store.lookup_qualified(fn.name, fn.tenant, qualifier)
        assert (record.env["TAG"], executed, record.id) == (tag, version, fn.id), qualifier
        assert record.deployment(executed).executed_version == version
    for missing in ("3", "beta", "0", "99999999999999999999"):
        with pytest.raises(NotFound):
            await store.lookup_qualified(fn.name, fn.tenant, missing)
    with pytest.raises(InvalidRequest):
        await store.lookup_qualified(fn.name, fn.tenant, "no.such")


async def test_alias_update_reaches_another_node_within_the_cache_interval(database_url):
    """Two stores on one database, as two nodes: one rolls back, the other runs the old version once its
    cached resolution expires (function_cache_s)."""
    writer = await Store.open(database_url, function_cache_s=0.2)
    reader = await Store.open(database_url, function_cache_s=0.2)
    try:
        fn = await create(writer, env={"TAG": "a"})
        await writer.publish_version(fn.name, fn.tenant)
        await writer.update_function(fn.name, env={"TAG": "b"})
        await writer.publish_version(fn.name, fn.tenant)
        await writer.create_alias(fn.name, fn.tenant, "prod", version=2)
        assert (await reader.lookup_qualified(fn.name, fn.tenant, "prod"))[1] == "2"
        await writer.update_alias(fn.name, fn.tenant, "prod", version=1)  # the rollback
        deadline = time.monotonic() + 30
        while (await reader.lookup_qualified(fn.name, fn.tenant, "prod"))[1] != "1":
            assert time.monotonic() < deadline, "the other node never saw the rollback"
            await asyncio.sleep(0.05)
        record, _ = await reader.lookup_qualified(fn.name, fn.tenant, "prod")
        assert record.env == {"TAG": "a"}
    finally:
        await writer.close()
        await reader.close()


async def test_migration_0008_publishes_every_existing_revision(empty_database_url):
    """Rows made with the 0007 schema: each revision becomes the published version of its number, the
    counter is the highest, old invocations ran $LATEST; the numbers keep working."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def to_0007(connection):
        config.attributes["connection"] = connection
        command.upgrade(config, "0007")

    now = datetime.now(UTC)
    function_id, invocation_id = uuid.uuid4().hex, uuid.uuid4().hex
    version_ids = [uuid.uuid4().hex for _ in range(3)]
    sha = __import__("hashlib").sha256(CODE).hexdigest()
    engine = create_async_engine(normalise_url(empty_database_url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(to_0007)
        async with engine.begin() as conn:
            # Plain SQL with the 0007 columns only: the new ones must not be needed.
            await conn.execute(sa.text(
                "INSERT INTO artifacts (sha256, runtime, size, content, created_at) VALUES (:s, 'python3', :n, :c, :t)"),
                {"s": sha, "n": len(CODE), "c": CODE, "t": now})
            await conn.execute(sa.text(
                "INSERT INTO functions (id, tenant, name, version, created_at, updated_at) "
                "VALUES (:id, 'default', 'old', 3, :t, :t)"), {"id": function_id, "t": now})
            for number, version_id in enumerate(version_ids, 1):
                await conn.execute(sa.text(
                    "INSERT INTO function_versions (id, function_id, version, runtime, handler, env, memory_mb, "
                    "timeout_s, concurrency, code_sha256, code_size, code_kind, created_at) VALUES (:id, :f, :n, "
                    "'python3', 'main.handler', :env, :m, 3.0, 2, :s, :size, 'source', :t)"),
                    {"id": version_id, "f": function_id, "n": number, "env": f'{{"N": "{number}"}}',
                     "m": 64 * (number + 1), "s": sha, "size": len(CODE), "t": now})
            await conn.execute(sa.text(
                "INSERT INTO invocations (id, function_id, function_name, tenant, version, version_id, mode, status, "
                "created_at) VALUES (:id, :f, 'old', 'default', 2, :v, 'sync', 'succeeded', :t)"),
                {"id": invocation_id, "f": function_id, "v": version_ids[1], "t": now})
    finally:
        await engine.dispose()

    opened = await Store.open(empty_database_url)  # migrates to head
    try:
        fn = await opened.get_function("old")
        assert (fn.version, fn.published, fn.description, fn.role) == (3, 3, "", None)
        assert [(v.published, v.id, v.memory_mb) for v in await opened.list_published("old", "default")] == [
            (1, version_ids[0], 128), (2, version_ids[1], 192), (3, version_ids[2], 256)]
        record, executed = await opened.lookup_qualified("old", "default", "2")
        assert (record.version_id, record.env, executed) == (version_ids[1], {"N": "2"}, "2")
        assert (await opened.get_invocation(invocation_id)).executed_version == "$LATEST"
        # Publishing the unchanged latest returns 3; after a change, the next number is 4.
        assert (await opened.publish_version("old", "default")).published == 3
        await opened.update_function("old", memory_mb=512)
        assert (await opened.publish_version("old", "default")).published == 4
    finally:
        await opened.close()


# ---------------------------------------------------------------- a real node

VERSIONED = """
import os
MACHINE = os.urandom(8).hex()

def handler(event, context):
    return {"version": context.function_version, "tag": TAG, "machine": MACHINE}

TAG = "%s"
"""


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reaping_node(request, tmp_path_factory, make_module_node):
    """A node whose idle machines go after a second without calls, checked every 0.2 s."""
    home = tmp_path_factory.mktemp("home")
    url = f"sqlite:///{home / 'nimbus.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_database")
    with make_module_node(home, url, idle_ttl_s=1.0, health_interval_s=0.2) as running:
        yield running


@pytest.fixture
def api(reaping_node):
    with reaping_node.client() as client:
        yield client


def deploy(api, tag: str, name: str | None = None) -> dict:
    name = name or unique("fn")
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": VERSIONED % tag})
    if resp.status_code == 409:
        resp = api.put(f"/api/v1/functions/{name}", json={"code": VERSIONED % tag})
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def call(api, path: str, **params) -> dict:
    resp = api.post(path, json={}, params=params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "succeeded", body
    assert body["executed_version"] == body["output"]["version"], body
    return body


def assert_problem(resp, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    for word in words:
        assert word in body["detail"], body
    return body


@pytest.mark.sandbox
def test_publish_list_get_delete_over_the_api(api):
    name = deploy(api, "a")["name"]
    first = api.post(f"/api/v1/functions/{name}/versions", json={"description": "first"})
    assert first.status_code == 201, first.text
    assert first.json()["version"] == "1" and first.json()["description"] == "first"
    assert first.headers["location"] == f"/api/v1/functions/{name}/versions/1"
    same = api.post(f"/api/v1/functions/{name}/versions")  # no body: $LATEST is published already
    assert same.status_code == 200 and same.json()["version"] == "1"
    deploy(api, "b", name)
    assert api.post(f"/api/v1/functions/{name}/versions").json()["version"] == "2"
    assert [v["version"] for v in api.get(f"/api/v1/functions/{name}/versions").json()["versions"]] == ["1", "2"]
    assert api.get(f"/api/v1/functions/{name}/versions/1").json()["revision"] == 1
    assert api.get(f"/api/v1/functions/{name}").json()["published"] == 2

    assert_problem(api.get(f"/api/v1/functions/{name}/versions/7"), 404, "version 7")
    assert_problem(api.get(f"/api/v1/functions/{name}/versions/abc"), 404)
    assert_problem(api.get(f"/api/v1/functions/{unique()}/versions"), 404)
    assert_problem(api.post(f"/api/v1/functions/{name}/versions", json={"description": "x" * 300}), 422)
    assert_problem(api.post(f"/api/v1/functions/{name}/versions", json={"other": 1}), 422)
    assert api.post(f"/api/v1/functions/{name}/aliases", json={"name": "prod", "version": "1"}).status_code == 201
    assert_problem(api.delete(f"/api/v1/functions/{name}/versions/1"), 409, "prod")
    assert api.delete(f"/api/v1/functions/{name}/versions/2").status_code == 204
    assert [v["version"] for v in api.get(f"/api/v1/functions/{name}/versions").json()["versions"]] == ["1"]
    assert_problem(api.post(f"/api/v1/functions/{name}:2/invoke", json={}), 404, "version 2")

    assert api.delete(f"/api/v1/functions/{name}").status_code == 204  # deletes all
    assert_problem(api.get(f"/api/v1/functions/{name}/versions"), 404)
    assert_problem(api.get(f"/api/v1/functions/{name}/aliases/prod"), 404)


@pytest.mark.sandbox
def test_each_qualifier_runs_its_version_on_machines_of_its_own(api, reaping_node):
    name = deploy(api, "a")["name"]
    api.post(f"/api/v1/functions/{name}/versions")
    latest_is_one = call(api, f"/api/v1/functions/{name}/invoke")
    as_one = call(api, f"/api/v1/functions/{name}:1/invoke")
    # The same revision as $LATEST and as 1: different function_version, so different machines.
    assert (latest_is_one["output"]["tag"], as_one["output"]["tag"]) == ("a", "a")
    assert (latest_is_one["executed_version"], as_one["executed_version"]) == ("$LATEST", "1")
    assert latest_is_one["output"]["machine"] != as_one["output"]["machine"]
    assert as_one["start"] != "hot"

    deploy(api, "b", name)
    api.post(f"/api/v1/functions/{name}/versions")
    deploy(api, "c", name)
    api.post(f"/api/v1/functions/{name}/aliases", json={"name": "prod", "version": "2"})
    seen = {
        "plain": call(api, f"/api/v1/functions/{name}/invoke"),
        "$LATEST": call(api, f"/api/v1/functions/{name}:$LATEST/invoke"),
        "1": call(api, f"/api/v1/functions/{name}:1/invoke"),
        "2 (query)": call(api, f"/api/v1/functions/{name}/invoke", qualifier="2"),
        "prod": call(api, f"/api/v1/functions/{name}:prod/invoke"),
        "prod (query)": call(api, f"/api/v1/functions/{name}/invoke", qualifier="prod"),
        # With an Idempotency-Key the call goes through FastAPI's route instead of the fast path.
        "prod (route)": api.post(f"/api/v1/functions/{name}:prod/invoke", json={},
                                 headers={"Idempotency-Key": uuid.uuid4().hex}).json(),
    }
    assert {k: (v["executed_version"], v["output"]["tag"]) for k, v in seen.items()} == {
        "plain": ("$LATEST", "c"), "$LATEST": ("$LATEST", "c"), "1": ("1", "a"), "2 (query)": ("2", "b"),
        "prod": ("2", "b"), "prod (query)": ("2", "b"), "prod (route)": ("2", "b")}
    machines = {v["output"]["machine"] for k, v in seen.items() if k in ("plain", "1", "prod")}
    assert len(machines) == 3
    record = api.get(f"/api/v1/invocations/{seen['prod']['invocation_id']}").json()
    assert (record["executed_version"], record["version"]) == ("2", 2)

    # Async: the qualifier is resolved when queued, recorded, and what the function sees.
    queued = api.post(f"/api/v1/functions/{name}:prod/async", json={})
    assert queued.status_code == 202, queued.text
    deadline = time.monotonic() + 60
    while (inv := api.get(f"/api/v1/invocations/{queued.json()['invocation_id']}").json())["status"] in (
            "queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (inv["status"], inv["executed_version"], inv["output"]["version"]) == ("succeeded", "2", "2")

    assert_problem(api.post(f"/api/v1/functions/{name}:beta/invoke", json={}), 404, "alias 'beta'")
    assert_problem(api.post(f"/api/v1/functions/{name}:no.pe/invoke", json={}), 422)
    assert_problem(api.post(f"/api/v1/functions/{name}:/invoke", json={}), 422)
    assert_problem(api.post(f"/api/v1/functions/{name}:prod/invoke", json={}, params={"qualifier": "1"}), 422)
    assert_problem(api.post(f"/api/v1/functions/{name}:9/async", json={}), 404)


@pytest.mark.sandbox
def test_an_unreached_version_holds_no_machines_after_the_idle_ttl(api, reaping_node):
    name = deploy(api, "a")["name"]
    api.post(f"/api/v1/functions/{name}/versions")
    first = call(api, f"/api/v1/functions/{name}:1/invoke")
    fn = api.get(f"/api/v1/functions/{name}").json()
    version_id = api.get(f"/api/v1/functions/{name}/versions/1").json()["revision_id"]
    pool = reaping_node.node.pool
    assert pool.idle_count(version_id, "1") == 1
    deploy(api, "b", name)  # $LATEST moves on: nothing reaches version 1 now
    assert pool.idle_count(version_id, "1") == 1  # an update retires $LATEST's machines only
    assert fn["published"] == 1
    deadline = time.monotonic() + 30
    while pool.idle_count(version_id, "1"):
        assert time.monotonic() < deadline, "version 1 kept its machine past the idle TTL"
        time.sleep(0.1)
    again = call(api, f"/api/v1/functions/{name}:1/invoke")  # it still runs, on a new machine
    assert again["output"]["tag"] == "a" and again["output"]["machine"] != first["output"]["machine"]
