"""The store against real databases: each test runs on SQLite (a new file) and on PostgreSQL.

PostgreSQL tests share one database per pytest run, so every test uses its own function names and
tenant, and asserts only about rows it made. Claiming is global by nature (any queued async call is
work), so the claiming tests delete what they made before they finish.
"""

import asyncio
import hashlib
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from nimbus.deployment import ISOLATIONS, PER_CALL, SHARED
from nimbus.errors import Conflict, InvalidRequest, NotFound, StoreError
from nimbus.store import BuildRecord, FunctionRecord, InvocationRecord, Store, VersionRecord, tables
from nimbus.store.database import MIGRATIONS_DIR, normalise_url

CODE = b"def handler(event, context):\n    return event\n"


def unique(prefix: str = "f") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(database_url):
    opened = await Store.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def query(url: str, statement, **params):
    """Look at the database behind the store's back: all rows of one statement."""
    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.connect() as conn:
            if isinstance(statement, str):
                statement = sa.text(statement)
            return (await conn.execute(statement, params)).all()
    finally:
        await engine.dispose()


async def execute(url: str, statement, **params) -> None:
    """Change the database behind the store's back, committed."""
    engine = create_async_engine(normalise_url(url))
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(statement) if isinstance(statement, str) else statement, params)
    finally:
        await engine.dispose()


async def count_invocations(store: Store, function_id: str, status: str | None = None) -> int:
    """How many invocations of a function the database holds, in one status or any (written-behind rows
    are flushed first, so they count)."""
    await store.flush()
    query = sa.select(sa.func.count()).select_from(tables.invocations).where(
        tables.invocations.c.function_id == function_id)
    if status is not None:
        query = query.where(tables.invocations.c.status == status)
    async with store._read() as conn:
        return int(await conn.scalar(query) or 0)


async def renew_lease(store: Store, id_: str, token: str, lease_s: float) -> bool:
    """Whether one lease was renewed: the store's ``renew_leases`` for a single invocation."""
    return id_ in await store.renew_leases({id_: token}, lease_s)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_key(runtime: str, toolchain: str, source: bytes) -> str:
    return sha256(b"\0".join((runtime.encode(), toolchain.encode(), source)))


async def put_build(store: Store, source: bytes | None = None, artifact: bytes | None = None,
                    *, runtime: str = "go", toolchain: str = "go1.22.5 linux/amd64", **overrides) -> BuildRecord:
    """Cache a build of fresh (or the given) source; its artifact is unique unless given."""
    source = source if source is not None else f"package main // {uuid.uuid4().hex}".encode()
    artifact = artifact if artifact is not None else b"\x7fELF" + uuid.uuid4().bytes * 64
    values = dict(key=build_key(runtime, toolchain, source), runtime=runtime, toolchain=toolchain,
                  source_sha256=sha256(source), artifact=artifact, log="warning: unused variable\n",
                  duration_ms=1234.5)
    values.update(overrides)
    return await store.put_build(**values)


def artifact_rows(url: str, sha: str):
    return query(url, sa.select(tables.artifacts.c.size).where(tables.artifacts.c.sha256 == sha))


async def create(store: Store, name: str | None = None, **overrides) -> FunctionRecord:
    values = dict(
        name=name or unique(), runtime="python3", handler="main.handler", env={"GREETING": "hi"}, memory_mb=128,
        timeout_s=30.0, concurrency=10, code=CODE, code_kind="source",
    )
    values.update(overrides)
    return await store.create_function(**values)


def invocation(fn: FunctionRecord, **overrides) -> InvocationRecord:
    values = dict(
        id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, tenant=fn.tenant, version=fn.version,
        version_id=fn.version_id,
    )
    values.update(overrides)
    return InvocationRecord(**values)


def queued(fn: FunctionRecord, n: int) -> list[InvocationRecord]:
    # Distinct created_at values, so "oldest first" has one right answer.
    base = datetime.now(UTC)
    return [
        invocation(fn, mode="async", status="queued", event=f'{{"n": {i}}}'.encode(),
                   created_at=base + timedelta(microseconds=i))
        for i in range(n)
    ]


# ---------------------------------------------------------------- opening and migrations


async def test_migrations_apply_to_an_empty_database_and_reopening_is_a_no_op(empty_database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    # Several nodes starting at once: each migration still runs exactly once.
    stores = await asyncio.gather(*(Store.open(empty_database_url) for _ in range(3)))
    fn = await create(stores[0])
    for opened in stores:
        await opened.close()

    reopened = await Store.open(empty_database_url)
    try:
        assert (await reopened.get_function(fn.name)).id == fn.id
    finally:
        await reopened.close()

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert await query(empty_database_url, "SELECT version_num FROM alembic_version") == [(head,)]

    # What the hand-written migrations built is exactly what tables.py describes.
    def differences(connection):
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, tables.metadata)

    engine = create_async_engine(normalise_url(empty_database_url))
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(differences) == []
    finally:
        await engine.dispose()


async def test_migration_0002_keeps_a_database_made_at_0001_working(empty_database_url):
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def to_0001(connection):
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")

    # function_versions as 0001 made it: no artifact_sha256 column.
    versions_0001 = sa.table(
        "function_versions", *(sa.column(c.name, c.type) for c in tables.function_versions.c
                               if c.name != "artifact_sha256"))
    now = datetime.now(UTC)
    function_id, version_id, invocation_id = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    engine = create_async_engine(normalise_url(empty_database_url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(to_0001)
        async with engine.begin() as conn:
            assert (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).all() == [("0001",)]
            await conn.execute(tables.artifacts.insert(), dict(
                sha256=sha256(CODE), runtime="python3", size=len(CODE), content=CODE, created_at=now))
            await conn.execute(tables.functions.insert(), dict(
                id=function_id, tenant="default", name="old", version=1, created_at=now, updated_at=now))
            await conn.execute(versions_0001.insert(), dict(
                id=version_id, function_id=function_id, version=1, runtime="python3", handler="main.handler",
                env={"A": "1"}, memory_mb=128, timeout_s=3.0, concurrency=2, code_sha256=sha256(CODE),
                code_size=len(CODE), code_kind="source", created_at=now))
            await conn.execute(tables.invocations.insert(), dict(
                id=invocation_id, function_id=function_id, function_name="old", version=1, version_id=version_id,
                mode="sync", status="succeeded", output=b"1", created_at=now))
    finally:
        await engine.dispose()

    opened = await Store.open(empty_database_url)  # migrates to head
    try:
        fn = await opened.get_function("old")
        assert (fn.id, fn.version_id, fn.env, fn.timeout_s, fn.code_sha256, fn.created_at) == (
            function_id, version_id, {"A": "1"}, 3.0, sha256(CODE), now)
        assert (fn.artifact_sha256, fn.artifact_size) == (None, None)
        assert (await opened.get_version(version_id)).artifact_sha256 is None
        assert (await opened.get_invocation(invocation_id)).output == b"1"
        assert await opened.get_code(fn.code_sha256) == CODE
        v2 = await opened.update_function("old", memory_mb=256)
        assert (v2.version, v2.artifact_sha256) == (2, None)

        # The new parts work on the migrated database.
        built = await put_build(opened)
        compiled = await opened.update_function("old", runtime="go", code=b"package main",
                                                artifact_sha256=built.artifact_sha256)
        assert (await opened.get_function(fn.id)).artifact_sha256 == compiled.artifact_sha256
        await opened.delete_function("old")
        assert await opened.get_build(built.key) == built
    finally:
        await opened.close()
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert await query(empty_database_url, "SELECT version_num FROM alembic_version") == [(head,)]


async def test_migration_0010_makes_every_existing_revision_shared(empty_database_url):
    """Rows made with the 0009 schema (plain SQL, without the column) come out ``shared``, which is how they
    ran; the setting then works on the migrated database."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))

    def to_0009(connection):
        config.attributes["connection"] = connection
        command.upgrade(config, "0009")

    now = datetime.now(UTC)
    function_id, version_ids = uuid.uuid4().hex, [uuid.uuid4().hex, uuid.uuid4().hex]
    engine = create_async_engine(normalise_url(empty_database_url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(to_0009)
        async with engine.begin() as conn:
            await conn.execute(sa.text(
                "INSERT INTO artifacts (sha256, runtime, size, content, created_at) VALUES (:s, 'python3', :n, :c, :t)"),
                {"s": sha256(CODE), "n": len(CODE), "c": CODE, "t": now})
            await conn.execute(sa.text(
                "INSERT INTO functions (id, tenant, name, version, created_at, updated_at, last_published) "
                "VALUES (:id, 'default', 'old', 2, :t, :t, 1)"), {"id": function_id, "t": now})
            for number, version_id in enumerate(version_ids, 1):
                await conn.execute(sa.text(
                    "INSERT INTO function_versions (id, function_id, version, runtime, handler, env, memory_mb, "
                    "timeout_s, concurrency, code_sha256, code_size, code_kind, created_at, published) VALUES "
                    "(:id, :f, :n, 'python3', 'main.handler', '{}', 128, 3.0, 2, :s, :size, 'source', :t, :p)"),
                    {"id": version_id, "f": function_id, "n": number, "s": sha256(CODE), "size": len(CODE), "t": now,
                     "p": 1 if number == 1 else None})
    finally:
        await engine.dispose()

    opened = await Store.open(empty_database_url)  # migrates to head
    try:
        fn = await opened.get_function("old")
        assert (fn.version_id, fn.isolation) == (version_ids[1], SHARED)
        assert (await opened.get_version(version_ids[0])).isolation == SHARED
        assert (await opened.get_published("old", "default", 1)).isolation == SHARED
        assert fn.deployment().isolation == SHARED
        changed = await opened.update_function("old", isolation=PER_CALL)
        assert (changed.version, changed.isolation) == (3, PER_CALL)
        assert (await opened.get_function("old")).isolation == PER_CALL
        assert (await opened.get_version(version_ids[1])).isolation == SHARED  # revisions stay as they were
    finally:
        await opened.close()
    assert await query(empty_database_url, "SELECT DISTINCT isolation FROM function_versions ORDER BY isolation") == [
        (PER_CALL,), (SHARED,)]


async def test_open_accepts_every_url_spelling(database_url, tmp_path):
    if database_url.startswith("sqlite"):
        nested = tmp_path / "not" / "yet" / "there.db"
        spellings = [f"sqlite:///{nested}", f"sqlite+aiosqlite:///{nested}"]
    else:
        rest = database_url.split("://", 1)[1]
        spellings = [f"postgresql://{rest}", f"postgres://{rest}", f"postgresql+asyncpg://{rest}"]
    for url in spellings:
        opened = await Store.open(url)
        try:
            assert await opened.ping()
            assert opened.dialect == ("sqlite" if url.startswith("sqlite") else "postgresql")
        finally:
            await opened.close()
    if database_url.startswith("sqlite"):
        # WAL is a property of the file: a plain sqlite3 connection sees it too.
        conn = sqlite3.connect(nested)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            conn.close()


async def test_open_reports_a_bad_url_or_an_unreachable_server_as_store_error(database_url):
    with pytest.raises(StoreError, match="unsupported database"):
        await Store.open("mysql://root@localhost/nimbus")
    if not database_url.startswith("sqlite"):
        with pytest.raises(StoreError, match="could not open the database"):
            await Store.open("postgresql://postgres:secret@127.0.0.1:1/nimbus")


# ---------------------------------------------------------------- functions


async def test_create_then_get_by_name_and_by_id(store):
    fn = await create(store, env={"A": "1"}, memory_mb=256, timeout_s=2.5, concurrency=3)
    assert fn.version == 1 and fn.code_size == len(CODE) and fn.code_kind == "source"
    assert fn.created_at.tzinfo is not None and fn.created_at == fn.updated_at
    by_name = await store.get_function(fn.name)
    by_id = await store.get_function(fn.id)
    assert by_name == by_id
    assert (by_name.name, by_name.env, by_name.memory_mb, by_name.timeout_s, by_name.concurrency) == (
        fn.name, {"A": "1"}, 256, 2.5, 3)
    assert by_name.version_id == fn.version_id and by_name.code_sha256 == fn.code_sha256
    assert by_name.created_at == fn.created_at and by_name.created_at.utcoffset() == timedelta(0)
    assert await store.get_code(fn.code_sha256) == CODE
    # Interpreted: the machines run the code itself.
    assert (fn.artifact_sha256, fn.artifact_size) == (by_name.artifact_sha256, by_name.artifact_size) == (None, None)


async def test_list_is_paged_by_name_counts_all_and_filters_by_runtime(store):
    tenant = unique("tenant")
    names = sorted(unique() for _ in range(5))
    for i, name in enumerate(reversed(names)):
        await create(store, name, tenant=tenant, runtime="nodejs" if i % 2 else "python3")

    page, total = await store.list_functions(tenant=tenant, limit=2, offset=0)
    assert total == 5 and [f.name for f in page] == names[:2]
    page, total = await store.list_functions(tenant=tenant, limit=2, offset=4)
    assert total == 5 and [f.name for f in page] == names[4:]
    everything, _ = await store.list_functions(tenant=tenant, limit=50)
    assert [f.name for f in everything] == names

    node, total = await store.list_functions(tenant=tenant, runtime="nodejs")
    assert total == 2 and {f.runtime for f in node} == {"nodejs"}
    python, total = await store.list_functions(tenant=tenant, runtime="python3")
    assert total == 3 and [f.name for f in python] == sorted(f.name for f in python)

    # The runtime that counts is the latest version's.
    await store.update_function(python[0].name, tenant=tenant, runtime="nodejs", code=b"exports.handler = 1")
    assert (await store.list_functions(tenant=tenant, runtime="nodejs"))[1] == 3
    assert (await store.list_functions(tenant=unique("tenant")))[1] == 0


async def test_update_makes_a_new_version_and_keeps_what_was_not_given(store):
    fn = await create(store, env={"A": "1"}, memory_mb=256, concurrency=4)
    v2 = await store.update_function(fn.name, memory_mb=512)
    assert (v2.id, v2.version) == (fn.id, 2) and v2.version_id != fn.version_id
    assert (v2.env, v2.memory_mb, v2.timeout_s, v2.concurrency, v2.handler) == ({"A": "1"}, 512, 30.0, 4,
                                                                                  "main.handler")
    assert v2.code_sha256 == fn.code_sha256 and v2.created_at == fn.created_at and v2.updated_at >= fn.updated_at
    assert await store.get_function(fn.id) == v2

    new_code = b"def handler(event, context):\n    return 2\n"
    v3 = await store.update_function(fn.id, code=new_code, env={}, handler="app.main")
    assert v3.version == 3 and v3.env == {} and v3.handler == "app.main" and v3.memory_mb == 512
    assert v3.code_size == len(new_code) and await store.get_code(v3.code_sha256) == new_code

    # Versions are immutable: what version 1 ran is still there.
    first = await store.get_version(fn.version_id)
    assert isinstance(first, VersionRecord) and not hasattr(first, "version_id")
    assert (first.function_id, first.function_name, first.version, first.memory_mb, first.env) == (
        fn.id, fn.name, 1, 256, {"A": "1"})
    assert await store.get_code(first.code_sha256) == CODE
    assert (await store.get_version(v3.version_id)).handler == "app.main"


async def test_isolation_is_a_setting_of_each_revision_and_reaches_the_deployment(store):
    assert ISOLATIONS == (SHARED, PER_CALL) == ("shared", "per-call")
    plain = await create(store)
    assert plain.isolation == SHARED and (await store.get_function(plain.name)).isolation == SHARED
    assert plain.deployment().isolation == SHARED

    fn = await create(store, isolation=PER_CALL, memory_mb=256)
    assert fn.isolation == PER_CALL
    for read in (await store.get_function(fn.name), await store.get_function(fn.id),
                 await store.lookup_function(fn.name), await store.get_version(fn.version_id)):
        assert read.isolation == PER_CALL, read
        assert read.deployment().isolation == PER_CALL and read.deployment("1").isolation == PER_CALL
    listed, _ = await store.list_functions(tenant=fn.tenant, limit=1000)
    assert {f.name: f.isolation for f in listed}[fn.name] == PER_CALL

    kept = await store.update_function(fn.name, memory_mb=512)  # not given: kept
    assert (kept.version, kept.isolation, kept.memory_mb) == (2, PER_CALL, 512)
    back = await store.update_function(fn.name, isolation=SHARED)  # a new revision like any setting
    assert (back.version, back.isolation, back.memory_mb) == (3, SHARED, 512) and back.version_id != kept.version_id
    assert (await store.lookup_function(fn.name)).deployment().isolation == SHARED
    assert (await store.get_version(kept.version_id)).isolation == PER_CALL  # the old revision is unchanged

    for bad in ("isolated", "PER-CALL", ""):
        with pytest.raises(InvalidRequest, match="isolation"):
            await store.update_function(fn.name, isolation=bad)
        with pytest.raises(InvalidRequest, match="isolation"):
            await create(store, isolation=bad)
    assert (await store.get_function(fn.name)).version == 3  # nothing was written


async def test_concurrent_updates_get_consecutive_versions(store):
    fn = await create(store)
    updated = await asyncio.gather(*(store.update_function(fn.name, memory_mb=128 + i) for i in range(8)))
    assert sorted(u.version for u in updated) == list(range(2, 10))
    assert (await store.get_function(fn.name)).version == 9


async def test_a_taken_name_conflicts_within_a_tenant_only(store):
    fn = await create(store)
    with pytest.raises(Conflict, match=fn.name):
        await create(store, fn.name, code=b"other code")
    other = await create(store, fn.name, tenant=unique("tenant"))
    assert other.id != fn.id and other.name == fn.name

    # Racing creates of one name: exactly one wins.
    name = unique()
    results = await asyncio.gather(*(create(store, name) for _ in range(5)), return_exceptions=True)
    assert sum(isinstance(r, FunctionRecord) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, FunctionRecord))


async def test_missing_things_are_not_found(store):
    missing = unique()
    fn = await create(store)
    for call in (
        store.get_function(missing),
        store.update_function(missing, memory_mb=256),
        store.delete_function(missing),
        store.get_function(fn.name, tenant=unique("tenant")),
        store.get_version(uuid.uuid4().hex),
        store.get_code("0" * 64),
        store.get_invocation(uuid.uuid4().hex),
        store.finish_invocation(
            uuid.uuid4().hex, status="succeeded", start="cold", output=b"1", error=None, logs="",
            logs_truncated=False, duration_ms=1.0, finished_at=datetime.now(UTC)),
    ):
        with pytest.raises(NotFound):
            await call

    await store.delete_function(fn.id)
    with pytest.raises(NotFound, match=fn.name):  # a call recorded after its function was deleted
        await store.insert_invocation(invocation(fn, status="succeeded"))


async def test_delete_removes_versions_and_invocations_and_frees_the_name(store):
    fn = await create(store)
    v2 = await store.update_function(fn.name, code=b"second")
    await store.insert_invocation(invocation(v2, status="succeeded", output=b"1"))
    await store.insert_invocation(invocation(v2, mode="async", event=b"{}"))
    assert await count_invocations(store, fn.id) == 2

    deleted = await store.delete_function(fn.name)
    assert deleted == v2
    assert await count_invocations(store, fn.id) == 0
    for version_id in (fn.version_id, v2.version_id):
        with pytest.raises(NotFound):
            await store.get_version(version_id)
    with pytest.raises(NotFound):
        await store.get_function(fn.id)
    assert (await create(store, fn.name)).id != fn.id


async def test_identical_code_is_stored_once_and_kept_while_used(store, database_url):
    code = f"def handler(e, c):\n    return {uuid.uuid4().hex!r}\n".encode()
    one = await create(store, code=code)
    two = await create(store, code=code)
    assert one.code_sha256 == two.code_sha256

    def rows(sha):
        return query(database_url, sa.select(tables.artifacts.c.size).where(tables.artifacts.c.sha256 == sha))

    assert await rows(one.code_sha256) == [(len(code),)]

    await store.delete_function(one.name)
    assert await store.get_code(two.code_sha256) == code  # still used by two

    # Two's second version has new code; its first version still holds the shared artifact.
    replaced = await store.update_function(two.name, code=b"replacement " + code)
    assert await store.get_code(one.code_sha256) == code

    await store.delete_function(two.id)
    for sha in (one.code_sha256, replaced.code_sha256):
        assert await rows(sha) == []
        with pytest.raises(NotFound):
            await store.get_code(sha)


# ---------------------------------------------------------------- compiled runtimes: the build cache


async def test_a_build_is_stored_with_its_artifact_and_read_back_by_key(store, database_url):
    source = f"package main // {uuid.uuid4().hex}".encode()
    key = build_key("go", "go1.22.5 linux/amd64", source)
    assert await store.get_build(key) is None  # a miss is an answer, not an error

    artifact = b"\x7fELF" + uuid.uuid4().bytes * 1000
    stored = await store.put_build(key=key, runtime="go", toolchain="go1.22.5 linux/amd64",
                                   source_sha256=sha256(source), artifact=artifact, log="ok\n", duration_ms=2500.25)
    assert isinstance(stored, BuildRecord)
    assert (stored.key, stored.runtime, stored.toolchain, stored.source_sha256, stored.log, stored.duration_ms) == (
        key, "go", "go1.22.5 linux/amd64", sha256(source), "ok\n", 2500.25)
    assert (stored.artifact_sha256, stored.artifact_size) == (sha256(artifact), len(artifact))
    assert stored.created_at.utcoffset() == timedelta(0)
    assert await store.get_build(key) == stored
    assert await store.get_code(stored.artifact_sha256) == artifact

    # The artifact is shared with identical bytes already stored, here a function's code.
    fn = await create(store, code=b"same bytes " + key.encode())
    other = await put_build(store, artifact=b"same bytes " + key.encode(), log="")
    assert other.artifact_sha256 == fn.code_sha256 and (await store.get_build(other.key)).log == ""
    assert await artifact_rows(database_url, fn.code_sha256) == [(len(b"same bytes ") + 64,)]

    for bad in (dict(key="not-a-hash"), dict(key=key.upper()), dict(source_sha256=key + "0"),
                dict(toolchain="x" * 257)):
        with pytest.raises(ValueError):
            await put_build(store, **bad)


async def test_putting_a_key_again_returns_the_first_build_and_keeps_nothing_new(store, database_url):
    source = f"fn main() {{}} // {uuid.uuid4().hex}".encode()
    first = await put_build(store, source, runtime="rust", toolchain="rustc 1.79.0")
    # A build that is not reproducible gives other bytes; the cache still answers with the first.
    again_bytes = b"\x7fELF rebuilt " + uuid.uuid4().bytes
    again = await put_build(store, source, again_bytes, runtime="rust", toolchain="rustc 1.79.0",
                            log="other", duration_ms=1.0)
    assert again == first
    assert await artifact_rows(database_url, sha256(again_bytes)) == []


async def test_concurrent_puts_of_one_key_all_get_the_same_row(database_url):
    # Two stores: separate connections, as two nodes building the same code at once would use.
    stores = [await Store.open(database_url), await Store.open(database_url)]
    try:
        source = f"package main // {uuid.uuid4().hex}".encode()
        artifacts = [b"\x7fELF " + uuid.uuid4().bytes * 100 for _ in range(6)]
        results = await asyncio.gather(*(put_build(stores[i % 2], source, artifact, log=f"build {i}")
                                         for i, artifact in enumerate(artifacts)))
        assert all(r == results[0] for r in results)
        winner = results[0]
        assert winner.artifact_sha256 in {sha256(a) for a in artifacts}
        assert await query(database_url, "SELECT count(*) FROM builds WHERE key = :key", key=winner.key) == [(1,)]
        # The losers' bytes were rolled back with their rows: nothing names them.
        for artifact in artifacts:
            expected = [(len(artifact),)] if sha256(artifact) == winner.artifact_sha256 else []
            assert await artifact_rows(database_url, sha256(artifact)) == expected
    finally:
        for opened in stores:
            await opened.close()


async def test_a_put_that_loses_a_race_mid_transaction_returns_the_winners_row(store, database_url):
    """Another node commits the key after our put looked for it: ours must roll back, not fail."""
    source = f"package main // {uuid.uuid4().hex}".encode()
    key = build_key("go", "go1.22.5 linux/amd64", source)
    theirs, ours = b"\x7fELF theirs " + uuid.uuid4().bytes, b"\x7fELF ours " + uuid.uuid4().bytes
    now = datetime.now(UTC)
    engine = create_async_engine(normalise_url(database_url))
    try:
        async with engine.connect() as other:
            trans = await other.begin()
            await other.execute(tables.artifacts.insert(), dict(
                sha256=sha256(theirs), runtime="go", size=len(theirs), content=theirs, created_at=now))
            await other.execute(tables.builds.insert(), dict(
                key=key, runtime="go", toolchain="go1.22.5 linux/amd64", source_sha256=sha256(source),
                artifact_sha256=sha256(theirs), log="theirs", duration_ms=5.0, created_at=now))
            put = asyncio.create_task(put_build(store, source, ours))
            if store.dialect == "postgresql":
                # Wait until our INSERT … ON CONFLICT is blocked on their uncommitted row.
                for _ in range(500):
                    waiting = await query(database_url, "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid IN "
                                          "(SELECT pid FROM pg_stat_activity WHERE datname = current_database())")
                    if waiting[0][0]:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the put never waited on the other transaction")
            else:
                await asyncio.sleep(0.2)  # SQLite: our BEGIN IMMEDIATE waits out their write lock
            assert not put.done()
            await trans.commit()
        got = await asyncio.wait_for(put, 30)
    finally:
        await engine.dispose()
    assert (got.key, got.artifact_sha256, got.log, got.created_at) == (key, sha256(theirs), "theirs", now)
    assert await store.get_build(key) == got
    assert await artifact_rows(database_url, sha256(ours)) == []


async def test_a_compiled_function_reads_back_its_artifact_everywhere(store):
    tenant = unique("tenant")
    source = f"package main // {uuid.uuid4().hex}".encode()
    built = await put_build(store, source)
    fn = await create(store, tenant=tenant, runtime="go", handler="main", code=source,
                      artifact_sha256=built.artifact_sha256)
    assert (fn.code_sha256, fn.code_size) == (sha256(source), len(source))
    assert (fn.artifact_sha256, fn.artifact_size) == (built.artifact_sha256, built.artifact_size)
    assert await store.get_function(fn.name, tenant=tenant) == fn
    version = await store.get_version(fn.version_id)
    assert (version.artifact_sha256, version.artifact_size) == (built.artifact_sha256, built.artifact_size)
    interpreted = await create(store, tenant=tenant)
    listed, total = await store.list_functions(tenant=tenant)
    assert total == 2 and {f.name: (f.artifact_sha256, f.artifact_size) for f in listed} == {
        fn.name: (built.artifact_sha256, built.artifact_size), interpreted.name: (None, None)}
    assert (await store.list_functions(tenant=tenant, runtime="go"))[0] == [fn]

    # An artifact nobody stored is refused, and nothing is created.
    name = unique()
    with pytest.raises(NotFound, match="put_build"):
        await create(store, name, tenant=tenant, runtime="go", code=source, artifact_sha256="0" * 64)
    with pytest.raises(NotFound):
        await store.get_function(name, tenant=tenant)


async def test_updates_carry_the_artifact_with_the_code(store):
    source = f"package main // {uuid.uuid4().hex}".encode()
    first = await put_build(store, source)
    fn = await create(store, runtime="go", handler="main", code=source, artifact_sha256=first.artifact_sha256)

    # Settings only: same code, so the same artifact.
    v2 = await store.update_function(fn.name, memory_mb=512, env={"B": "2"})
    assert (v2.version, v2.code_sha256, v2.artifact_sha256, v2.artifact_size) == (
        2, fn.code_sha256, first.artifact_sha256, first.artifact_size)
    assert (await store.get_version(v2.version_id)).artifact_sha256 == first.artifact_sha256

    # New source, new build.
    new_source = source + b"\n// v3"
    second = await put_build(store, new_source)
    v3 = await store.update_function(fn.id, code=new_source, artifact_sha256=second.artifact_sha256)
    assert (v3.code_sha256, v3.artifact_sha256, v3.artifact_size) == (
        sha256(new_source), second.artifact_sha256, second.artifact_size)
    assert await store.get_function(fn.id) == v3

    # The same source rebuilt (a new toolchain): a new artifact without new code.
    rebuilt = await put_build(store, new_source, toolchain="go1.23.0 linux/amd64")
    v4 = await store.update_function(fn.id, artifact_sha256=rebuilt.artifact_sha256)
    assert (v4.code_sha256, v4.artifact_sha256) == (v3.code_sha256, rebuilt.artifact_sha256)

    # A missing artifact is refused and makes no version.
    with pytest.raises(NotFound, match="put_build"):
        await store.update_function(fn.id, code=b"package main", artifact_sha256="f" * 64)
    assert (await store.get_function(fn.id)).version == 4

    # New code for an interpreted runtime: nothing built, nothing to run but the code.
    v5 = await store.update_function(fn.id, runtime="python3", handler="main.handler", code=CODE)
    assert (v5.runtime, v5.artifact_sha256, v5.artifact_size) == ("python3", None, None)
    assert (await store.get_function(fn.id)).artifact_sha256 is None
    v6 = await store.update_function(fn.id, memory_mb=128)
    assert v6.artifact_sha256 is None

    # Older versions still name what they ran.
    assert (await store.get_version(v3.version_id)).artifact_sha256 == second.artifact_sha256
    assert (await store.get_version(fn.version_id)).artifact_sha256 == first.artifact_sha256


async def test_delete_keeps_artifacts_that_builds_or_other_versions_still_name(store, database_url):
    sources = [f"package main // {i} {uuid.uuid4().hex}".encode() for i in range(3)]
    b1, b2, b3 = [await put_build(store, source) for source in sources]
    fn = await create(store, runtime="go", handler="main", code=sources[0], artifact_sha256=b1.artifact_sha256)
    await store.update_function(fn.id, code=sources[1], artifact_sha256=b2.artifact_sha256)
    await store.update_function(fn.id, code=sources[2], artifact_sha256=b3.artifact_sha256)
    # Another function runs b2's artifact (as a version's artifact, not its code) and has fn's first source
    # as its code.
    other = await create(store, runtime="go", handler="main", code=sources[0], artifact_sha256=b2.artifact_sha256)
    # Pretend the cache entries of b1 and b2 were pruned: only b3's row still holds its artifact.
    await execute(database_url, sa.delete(tables.builds).where(tables.builds.c.key.in_([b1.key, b2.key])))

    await store.delete_function(fn.name)
    kept = {
        b3.artifact_sha256: b3.artifact_size,  # a build names it
        b2.artifact_sha256: b2.artifact_size,  # another version's artifact
        sha256(sources[0]): len(sources[0]),  # another version's code
    }
    removed = [b1.artifact_sha256, sha256(sources[1]), sha256(sources[2])]
    for sha, size in kept.items():
        assert await artifact_rows(database_url, sha) == [(size,)]
    for sha in removed:
        assert await artifact_rows(database_url, sha) == []

    # The cache outlives the function: deploying the same code again needs no build.
    assert await store.get_build(b3.key) == b3
    again = await create(store, runtime="go", handler="main", code=sources[2], artifact_sha256=b3.artifact_sha256)
    assert again.artifact_size == b3.artifact_size

    # The last user of b2's artifact goes, and so does the artifact.
    await store.delete_function(other.id)
    assert await artifact_rows(database_url, b2.artifact_sha256) == []
    assert await artifact_rows(database_url, sha256(sources[0])) == []


# ---------------------------------------------------------------- invocations


async def test_invocations_are_recorded_finished_read_and_listed_newest_first(store):
    fn = await create(store)
    start = datetime.now(UTC)
    sync = invocation(fn, status="succeeded", start="cold", restored=True, output=b'{"ok": true}', logs="hello\n",
                      duration_ms=1.5, created_at=start, started_at=start, finished_at=start, attempts=1)
    await store.insert_invocation(sync)
    assert await store.get_invocation(sync.id) == sync

    pending = invocation(fn, mode="async", status="queued", event=b'{"n": 1}', created_at=start + timedelta(seconds=1))
    await store.insert_invocation(pending)
    with pytest.raises(Conflict):
        await store.insert_invocation(pending)
    got = await store.get_invocation(pending.id)
    assert (got.status, got.event, got.output, got.error, got.logs, got.attempts) == ("queued", b'{"n": 1}', None,
                                                                                     None, "", 0)
    with pytest.raises(NotFound):
        await store.get_invocation(pending.id, tenant=unique("tenant"))

    done = datetime.now(UTC)
    error = {"type": "ValueError", "message": "bad", "stack": "Traceback…"}
    assert got.restored is False
    await store.finish_invocation(pending.id, status="failed", start="cold", output=None, error=error,
                                  logs="x" * 10, logs_truncated=True, duration_ms=12.0, finished_at=done, restored=True)
    got = await store.get_invocation(pending.id)
    assert (got.status, got.start, got.error, got.logs_truncated, got.duration_ms) == ("failed", "cold", error,
                                                                                      True, 12.0)
    assert got.restored is True
    assert got.finished_at == done and got.finished_at.tzinfo is not None and got.event == b'{"n": 1}'
    assert got.lease_owner is None and got.lease_expires_at is None

    with pytest.raises(ValueError, match="finished status"):
        await store.finish_invocation(pending.id, status="running", start=None, output=None, error=None, logs="",
                                      logs_truncated=False, duration_ms=None, finished_at=done)

    newer = invocation(fn, status="timed_out", created_at=start + timedelta(seconds=2))
    await store.insert_invocation(newer)
    listed = await store.list_invocations(fn.id)
    assert [i.id for i in listed] == [newer.id, pending.id, sync.id]
    assert listed[1].event is None and listed[1].error == error  # lists leave the event out
    assert [i.id for i in await store.list_invocations(fn.id, limit=2)] == [newer.id, pending.id]
    assert await count_invocations(store, fn.id) == 3
    assert await count_invocations(store, fn.id, status="failed") == 1


async def test_many_concurrent_writes_never_report_a_locked_database(store):
    fn = await create(store)
    invs = [invocation(fn, status="succeeded", output=b"null") for _ in range(100)]
    await asyncio.gather(*(store.insert_invocation(inv) for inv in invs),
                         *(store.update_function(fn.id, concurrency=i + 1) for i in range(10)))
    assert await count_invocations(store, fn.id) == 100


async def test_inserts_committed_together_still_fail_one_by_one(store):
    fn = await create(store)
    gone = await create(store)
    await store.delete_function(gone.id)
    good = [invocation(fn, status="succeeded") for _ in range(20)]
    await store.insert_invocation(good[0])
    # Started together, these share one transaction; the bad rows must not sink the good ones.
    results = await asyncio.gather(
        *(store.insert_invocation(inv) for inv in good[1:]),
        store.insert_invocation(invocation(gone, status="succeeded")),
        store.insert_invocation(good[0]),
        return_exceptions=True,
    )
    assert results[:19] == [None] * 19
    assert isinstance(results[19], NotFound) and isinstance(results[20], Conflict)
    assert await count_invocations(store, fn.id) == 20


async def test_close_waits_for_inserts_already_asked_for(database_url):
    opened = await Store.open(database_url)
    fn = await create(opened)
    invs = [invocation(fn, mode="async", event=b"{}") for _ in range(10)]
    pending = [asyncio.create_task(opened.insert_invocation(inv)) for inv in invs]
    await asyncio.sleep(0)  # each task has handed its row over, none is committed yet
    await opened.close()
    await asyncio.gather(*pending)
    reopened = await Store.open(database_url)
    try:
        assert await count_invocations(reopened, fn.id) == 10
        await reopened.delete_function(fn.id)
    finally:
        await reopened.close()


# ---------------------------------------------------------------- claiming async work


async def test_two_claimers_never_take_the_same_invocation(database_url):
    first, second = await Store.open(database_url), await Store.open(database_url)
    try:
        fn = await create(first)
        mine = queued(fn, 50)
        for inv in mine:
            await first.insert_invocation(inv)

        async def drain(claimer: Store, owner: str) -> list[InvocationRecord]:
            taken = []
            while batch := await claimer.claim_async(owner, limit=3, lease_s=60):
                assert [(i.created_at, i.id) for i in batch] == sorted((i.created_at, i.id) for i in batch)
                taken.extend(batch)
                await asyncio.sleep(0)
            return taken

        a, b = await asyncio.gather(drain(first, unique("node")), drain(second, unique("node")))
        ids_a, ids_b = [i.id for i in a], [i.id for i in b]
        assert len(set(ids_a)) == len(ids_a) and len(set(ids_b)) == len(ids_b)
        assert not set(ids_a) & set(ids_b)
        assert {inv.id for inv in mine} <= set(ids_a) | set(ids_b)

        claimed = {i.id: i for i in a + b}
        for inv in mine:
            got = claimed[inv.id]
            # A claim does not count an attempt (start_attempt does); its lease token names the claimer.
            assert (got.status, got.attempts, got.event) == ("running", 0, inv.event)
            assert got.lease_owner.startswith("node-") and got.lease_expires_at > datetime.now(UTC)
        assert await count_invocations(first, fn.id, status="queued") == 0
        await first.delete_function(fn.id)
    finally:
        await first.close()
        await second.close()


async def test_claims_take_the_oldest_first_and_only_async_work(store):
    fn = await create(store)
    mine = queued(fn, 4)
    for inv in reversed(mine):
        await store.insert_invocation(inv)
    await store.insert_invocation(invocation(fn, mode="sync", status="queued"))  # never claimable
    owner = unique("node")
    claimed = []
    while batch := await store.claim_async(owner, limit=2, lease_s=60):
        claimed.extend(i for i in batch if i.function_id == fn.id)
    assert [i.id for i in claimed] == [i.id for i in mine]
    assert await store.claim_async(owner, limit=0, lease_s=60) == []
    await store.delete_function(fn.id)


async def test_an_expired_lease_is_claimed_again_and_counts_an_attempt(store):
    fn = await create(store)
    (inv,) = queued(fn, 1)
    await store.insert_invocation(inv)
    crashed, rescuer = unique("node"), unique("node")

    first = {i.id: i for i in await store.claim_async(crashed, limit=1000, lease_s=0.5)}[inv.id]
    assert await store.start_attempt(inv.id, first.lease_owner)  # it reached a machine: one attempt
    assert inv.id not in [i.id for i in await store.claim_async(rescuer, limit=1000, lease_s=60)]
    await asyncio.sleep(0.6)
    again = {i.id: i for i in await store.claim_async(rescuer, limit=1000, lease_s=60)}[inv.id]
    assert again.attempts == 1 and again.lease_owner.startswith(f"{rescuer}:")

    assert not await renew_lease(store, inv.id, first.lease_owner, 60)  # no longer its lease
    assert not await store.start_attempt(inv.id, first.lease_owner)
    before = (await store.get_invocation(inv.id)).lease_expires_at
    assert await renew_lease(store, inv.id, again.lease_owner, 120)
    assert (await store.get_invocation(inv.id)).lease_expires_at > before
    assert await store.start_attempt(inv.id, again.lease_owner)

    await store.finish_invocation(inv.id, status="succeeded", start="warm", output=b"1", error=None, logs="",
                                  logs_truncated=False, duration_ms=3.0, finished_at=datetime.now(UTC))
    done = await store.get_invocation(inv.id)
    assert (done.status, done.attempts, done.lease_owner, done.lease_expires_at) == ("succeeded", 2, None, None)
    assert not await renew_lease(store, inv.id, again.lease_owner, 60)  # finished work has no lease to renew
    await store.delete_function(fn.id)


async def test_release_owned_requeues_only_that_owners_work(store):
    fn = await create(store)
    restarting, other = unique("node"), unique("node")
    early, late = queued(fn, 3), queued(fn, 2)
    for inv in early:
        await store.insert_invocation(inv)
    held = [i.id for i in await store.claim_async(restarting, limit=1000, lease_s=60)]
    assert {i.id for i in early} <= set(held)
    for inv in late:
        await store.insert_invocation(inv)
    assert {i.id for i in late} <= {i.id for i in await store.claim_async(other, limit=1000, lease_s=60)}

    assert await store.release_owned(restarting) == len(held)
    for inv in early:
        got = await store.get_invocation(inv.id)
        assert (got.status, got.lease_owner, got.lease_expires_at, got.attempts) == ("queued", None, None, 0)
    for inv in late:
        got = await store.get_invocation(inv.id)
        assert got.status == "running" and got.lease_owner.startswith(f"{other}:")
    assert await store.release_owned(restarting) == 0
    await store.delete_function(fn.id)


# ---------------------------------------------------------------- fencing and backoff


async def test_a_stale_lease_can_neither_start_finish_requeue_nor_renew(store):
    fn = await create(store, max_retries=4)
    assert (await store.get_version(fn.version_id)).max_retries == 4
    inv = InvocationRecord(id=uuid.uuid4().hex, function_id=fn.id, function_name=fn.name, version=1,
                           version_id=fn.version_id, mode="async", event=b"{}")
    await store.insert_invocation(inv)

    async def claim(owner, lease_s):
        return {i.id: i for i in await store.claim_async(owner, limit=1000, lease_s=lease_s)}.get(inv.id)

    stale = await claim("node-a", 0.2)
    assert await store.start_attempt(inv.id, stale.lease_owner)
    await asyncio.sleep(0.3)
    fresh = await claim("node-a", 60)  # the same node claims it again: only the lease token tells them apart
    assert stale.lease_owner != fresh.lease_owner and fresh.attempts == 1
    outcome = dict(start="warm", output=b"1", error=None, logs="", logs_truncated=False, duration_ms=1.0,
                   finished_at=datetime.now(UTC))
    assert not await store.finish_invocation(inv.id, status="succeeded", token=stale.lease_owner, **outcome)
    assert not await store.finish_invocation(inv.id, status="succeeded", token="node-a", **outcome)
    assert not await store.retry_later(inv.id, token=stale.lease_owner, not_before=datetime.now(UTC),
                                       error=None, start=None, logs="", logs_truncated=False, duration_ms=None)
    assert not await store.start_attempt(inv.id, stale.lease_owner)
    assert await store.release({inv.id: stale.lease_owner}) == 0
    assert await store.renew_leases({inv.id: stale.lease_owner}, 60) == set()
    assert await store.renew_leases({inv.id: fresh.lease_owner}, 60) == {inv.id}
    got = await store.get_invocation(inv.id)
    assert (got.status, got.lease_owner, got.attempts, got.output) == ("running", fresh.lease_owner, 1, None)

    # Retried with a backoff: not claimable before not_before, claimable after.
    assert await store.start_attempt(inv.id, fresh.lease_owner)
    assert await store.retry_later(inv.id, token=fresh.lease_owner,
                                   not_before=datetime.now(UTC) + timedelta(hours=1), error={"type": "E"},
                                   start=None, logs="", logs_truncated=False, duration_ms=None)
    assert await claim("node-b", 60) is None
    async with store._write() as conn:
        await conn.execute(tables.invocations.update().where(tables.invocations.c.id == inv.id)
                           .values(not_before=datetime.now(UTC) - timedelta(seconds=1)))
    third = await claim("node-b", 60)
    assert (third.attempts, third.not_before, third.error) == (2, None, {"type": "E"})
    assert await store.start_attempt(inv.id, third.lease_owner)
    assert await store.finish_invocation(inv.id, status="succeeded", token=third.lease_owner, callback=True,
                                         **outcome)
    done = await store.get_invocation(inv.id)
    assert (done.status, done.attempts, done.lease_owner, done.callback_status) == ("succeeded", 3, None, "pending")
    await store.delete_function(fn.id)


async def test_concurrent_inserts_of_one_idempotency_key_keep_one_row_per_tenant(database_url):
    first, second = await Store.open(database_url), await Store.open(database_url)
    try:
        fn = await create(first)
        key = unique("key")
        tries = [invocation(fn, mode="async", idempotency_key=key) for _ in range(20)]
        results = await asyncio.gather(*(
            (first if n % 2 else second).insert_idempotent(inv) for n, inv in enumerate(tries)))
        assert sum(created for _, created in results) == 1
        assert len({record.id for record, _ in results}) == 1
        assert await count_invocations(first, fn.id) == 1
        # The key is the tenant's own: another tenant's use of it is another invocation.
        elsewhere, created = await first.insert_idempotent(invocation(fn, tenant=unique("t"), idempotency_key=key))
        assert created and (await first.get_by_idempotency_key(elsewhere.tenant, key)).id == elsewhere.id
        await first.delete_function(fn.id)
    finally:
        await first.close()
        await second.close()


# ---------------------------------------------------------------- API keys


async def test_api_keys_are_found_by_hash_until_revoked(store):
    tenant = unique("tenant")
    key_hash = uuid.uuid4().hex * 2
    key = await store.create_api_key(tenant=tenant, name="ci", key_hash=key_hash)
    assert await store.get_api_key_by_hash(key_hash) == key
    with pytest.raises(Conflict):
        await store.create_api_key(tenant=tenant, name="again", key_hash=key_hash)
    other = await store.create_api_key(tenant=tenant, name="laptop", key_hash=uuid.uuid4().hex)
    assert [k.id for k in await store.list_api_keys(tenant=tenant)] == [key.id, other.id]

    revoked = await store.revoke_api_key(key.id)
    assert revoked.revoked_at is not None
    with pytest.raises(NotFound):
        await store.get_api_key_by_hash(key_hash)
    assert (await store.revoke_api_key(key.id)).revoked_at == revoked.revoked_at
    with pytest.raises(NotFound):
        await store.revoke_api_key(uuid.uuid4().hex)


async def test_function_lookup_cache_sees_this_stores_changes_at_once_and_others_within_its_time(database_url):
    """The invoke path's cache: a node's own update or delete is seen on the next call; another node's
    change only after ``function_cache_s`` (here long, so the staleness is visible and bounded by design)."""
    node_a = await Store.open(database_url, function_cache_s=3600)
    node_b = await Store.open(database_url)
    try:
        fn = await create(node_a)
        assert (await node_a.lookup_function(fn.name)).version == 1
        await node_b.update_function(fn.name, memory_mb=256)  # another node's change
        assert (await node_a.lookup_function(fn.name)).version == 1  # cached on node A
        assert (await node_a.get_function(fn.name)).version == 2  # the store itself is current
        await node_a.update_function(fn.name, memory_mb=512)  # node A's own change
        assert (await node_a.lookup_function(fn.name)).memory_mb == 512
        assert (await node_a.lookup_function(fn.id)).version == 3
        with pytest.raises(NotFound):
            await node_a.lookup_function(fn.name, tenant="someone-else")
        await node_a.delete_function(fn.name)
        with pytest.raises(NotFound):
            await node_a.lookup_function(fn.name)
    finally:
        await node_b.close()
        await node_a.close()


async def test_concurrent_lookups_after_expiry_cost_one_select(database_url):
    """32 calls of one function arriving as its cached look-up expires send one SELECT, not 32 (the
    herd was the warm p99 at concurrency 32)."""
    store = await Store.open(database_url, function_cache_s=0.05)
    selects = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("SELECT") and "functions" in statement:
            selects.append(statement)

    sa.event.listen(store._engine.sync_engine, "before_cursor_execute", count)
    try:
        fn = await create(store)
        for _ in range(2):  # a cold miss, then an expired entry
            await asyncio.sleep(0.06)
            selects.clear()
            found = await asyncio.gather(*(store.lookup_function(fn.name) for _ in range(32)))
            assert {f.version_id for f in found} == {fn.version_id}
            assert len(selects) == 1, selects
            selects.clear()
            routes = await asyncio.gather(*(store.lookup_qualified(fn.name, fn.tenant, "$LATEST")
                                            for _ in range(8)))
            assert {r[1] for r in routes} == {"$LATEST"} and not selects  # the entry just read
    finally:
        sa.event.remove(store._engine.sync_engine, "before_cursor_execute", count)
        await store.close()


# ---------------------------------------------------------------- layers and gc


async def test_layers_are_listed_per_tenant_and_collected_only_when_no_version_uses_them(store, database_url):
    manifest = f"six=={uuid.uuid4().int % 1000}\n".encode()
    layer = await put_build(store, manifest, runtime="python3", toolchain="python3.11 x86_64 glibc-2.36",
                            kind="layer", artifact=b"\x1f\x8b" + uuid.uuid4().bytes * 32)
    assert (await store.get_build(layer.key)).kind == "layer"
    fn = await create(store, layer_sha256=layer.artifact_sha256)
    assert fn.layer_sha256 == layer.artifact_sha256
    assert (await store.get_function(fn.name)).layer_sha256 == layer.artifact_sha256
    assert (await store.get_version(fn.version_id)).layer_sha256 == layer.artifact_sha256
    mine = {item.sha256: item for item in await store.list_layers()}
    assert mine[layer.artifact_sha256].functions == [fn.name]
    assert mine[layer.artifact_sha256].platform == "python3.11 x86_64 glibc-2.36"
    assert layer.artifact_sha256 not in {item.sha256 for item in await store.list_layers("someone-else")}
    assert layer.artifact_sha256 in {item.sha256 for item in await store.list_layers(None)}
    assert layer.artifact_sha256 in await store.layer_shas()

    # Settings-only versions keep the layer; new code without one drops it, but version 1 still uses it.
    assert (await store.update_function(fn.id, memory_mb=256)).layer_sha256 == layer.artifact_sha256
    updated = await store.update_function(fn.id, code=b"def handler(e, c): return 2\n", code_kind="source")
    assert updated.layer_sha256 is None
    await store.collect_garbage(grace_s=0)
    assert await store.get_build(layer.key) is not None
    assert await store.get_code(layer.artifact_sha256)

    await store.delete_function(fn.id)
    assert await store.get_build(layer.key) is not None  # the cache outlives the function until gc
    assert (await store.collect_garbage(grace_s=3600))["layers"] == 0  # too young
    freed = await store.collect_garbage(grace_s=0)
    assert freed["layers"] >= 1 and freed["artifacts"] >= 1 and freed["bytes"] >= len(b"\x1f\x8b") + 32 * 16
    assert await store.get_build(layer.key) is None
    assert await artifact_rows(database_url, layer.artifact_sha256) == []
    assert layer.artifact_sha256 not in {item.sha256 for item in await store.list_layers(None)}
    assert layer.artifact_sha256 not in await store.layer_shas()


async def test_gc_keeps_compiled_builds_a_version_runs_and_removes_unused_ones(store, database_url):
    used, unused = await put_build(store), await put_build(store)
    fn = await create(store, runtime="go", handler="main", artifact_sha256=used.artifact_sha256)
    freed = await store.collect_garbage(grace_s=0)
    assert freed["builds"] >= 1
    assert await store.get_build(used.key) is not None
    assert await store.get_build(unused.key) is None
    assert await artifact_rows(database_url, unused.artifact_sha256) == []
    assert await store.get_code(fn.code_sha256)  # the function's own code stays


async def test_a_version_cannot_name_a_layer_that_is_not_stored(store):
    with pytest.raises(NotFound):
        await create(store, layer_sha256="ab" * 32)
