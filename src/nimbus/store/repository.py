"""``Store``: the one place that knows the queries, on SQLite (aiosqlite) or PostgreSQL (asyncpg).

How the two backends are kept honest:

- **Writes on SQLite** are serialised in-process by an ``asyncio.Lock``. A transaction of several
  statements starts with ``BEGIN IMMEDIATE``, so it never has to upgrade a read lock to a write lock
  halfway (which SQLite refuses with "database is locked" no matter the busy timeout); a lone statement
  runs in autocommit mode, atomic by itself. Another process, or another ``Store`` on the same file,
  waits out ``busy_timeout``. WAL mode lets readers run beside the one writer.
- **Round trips** are what a call costs (each one a hop to aiosqlite's thread, or a packet to
  PostgreSQL), so reads and lone write statements open no transaction, statements are built once, and
  invocation inserts arriving together are committed together.
- **Finished sync invocations are written behind** (``record_invocation``): the caller already has its
  answer, so its row waits in memory for a few milliseconds and goes out with the others of that
  interval in one multi-row INSERT. Reads on this node see it meanwhile; ``close`` writes it out; a crash
  loses at most the last interval's (plus, while the database is failing, the unwritten backlog's).
  Async invocations and idempotent sync calls are never written behind: their rows must exist first.
- **Writes on PostgreSQL** run concurrently from a pool; rows that must not change under a transaction
  are locked explicitly (``FOR UPDATE``, ``FOR KEY SHARE``), and async work is claimed with
  ``FOR UPDATE SKIP LOCKED`` so claimers on any number of nodes never take the same row.
- **Errors** from SQLAlchemy and the drivers never leave this module raw: a name taken becomes
  ``Conflict``, a missing row ``NotFound``, anything else ``StoreError`` with what was being done.
"""

import asyncio
import contextlib
import hashlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from nimbus.errors import Conflict, NimbusError, NotFound, StoreError
from nimbus.home import private_file
from nimbus.store import tables
from nimbus.store.records import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TENANT,
    FINISHED_STATUSES,
    ApiKeyRecord,
    BuildRecord,
    FunctionRecord,
    InvocationRecord,
    LayerRecord,
    VersionRecord,
    utcnow,
)

log = logging.getLogger("nimbus.store")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for another process's transaction
SQLITE_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
VACUUM_STEP_PAGES = 2048  # pages given back per write transaction: other writers get the lock in between
SWEEP_BATCH = 500  # invocation rows deleted per write transaction by the retention sweep
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 10
# pg_advisory_xact_lock key held while migrating, so nodes starting together migrate one at a time.
PG_MIGRATION_LOCK = 0x4E494D42  # "NIMB"
HASH_IN_THREAD_BYTES = 1 << 20  # hash larger code off the event loop
ARTIFACT_PUT_TRIES = 3
ERROR_DETAIL_MAX = 500
DEFAULT_LIST_LIMIT = 50
INSERT_BATCH_MAX = 256  # invocation rows per group-committed transaction
FUNCTION_CACHE_S = 1.0  # how stale the invoke path's function look-up may be for changes made by other nodes
FUNCTION_CACHE_MAX = 10_000
DEFAULT_WRITE_BEHIND_MS = 5.0  # how long a finished sync invocation may wait in memory for its INSERT
WRITE_BEHIND_MAX_PENDING = 10_000  # beyond this backlog (a failing database), callers wait for the flush
WRITE_BEHIND_RETRY_MAX_S = 1.0  # a failing flush is retried with backoff, doubling up to this
USAGE_FRESH_S = 5.0  # how old a tenant's measured bytes may be when an async call is checked against them
WRITE_BEHIND_CLOSE_TIMEOUT_S = 30.0  # how long close keeps retrying before it gives up on the rows (logged)

# Execution option that makes the SQLite "begin" hook emit BEGIN IMMEDIATE (readers emit no BEGIN).
_WRITE_OPTION = "nimbus_write"

_f = tables.functions
_v = tables.function_versions
_a = tables.artifacts
_i = tables.invocations
_k = tables.api_keys
_b = tables.builds
_t = tables.artifact_tenants
# The artifacts table once more, joined on a version's or build's built artifact for its size.
_built = tables.artifacts.alias("built")

# Statements are built once, with named parameters: building and cache-keying a statement per call
# costs more than the query on the hot path (every invoke reads its function and writes its invocation).
_key = sa.bindparam("key", type_=sa.String)
_tenant = sa.bindparam("tenant", type_=sa.String)

# A function as it runs now: the functions row joined with its latest version (and, for compiled runtimes,
# the size of its built artifact: a primary-key lookup, where copying it into the version would need the
# artifact read before every insert).
_FUNCTION_COLUMNS = (
    _f.c.id, _f.c.name, _f.c.tenant, _v.c.runtime, _v.c.handler, _v.c.env, _v.c.memory_mb, _v.c.timeout_s,
    _v.c.concurrency, _f.c.version, _v.c.id.label("version_id"), _v.c.code_sha256, _v.c.code_size,
    _v.c.code_kind, _f.c.created_at, _f.c.updated_at, _v.c.artifact_sha256, _built.c.size.label("artifact_size"),
    _v.c.max_retries, _v.c.layer_sha256,
)
_LATEST = _f.join(_v, sa.and_(_v.c.function_id == _f.c.id, _v.c.version == _f.c.version))
_SELECT_LATEST = sa.select(*_FUNCTION_COLUMNS).select_from(
    _LATEST.outerjoin(_built, _built.c.sha256 == _v.c.artifact_sha256)
)
# A name or an id; a name that happens to look like an id wins over the id.
_BY_KEY = (_f.c.tenant == _tenant, sa.or_(_f.c.name == _key, _f.c.id == _key))
_KEY_ORDER = sa.case((_f.c.name == _key, 0), else_=1)
_GET_FUNCTION = _SELECT_LATEST.where(*_BY_KEY).order_by(_KEY_ORDER).limit(1)
_FUNCTION_BY_ID = _SELECT_LATEST.where(_f.c.id == _key)
_LOCK_FUNCTION = sa.select(_f.c.id).where(*_BY_KEY).order_by(_KEY_ORDER).limit(1).with_for_update()
_NAME_TAKEN = sa.select(_f.c.id).where(_f.c.tenant == _tenant, _f.c.name == _key)

_GET_VERSION = sa.select(
    _v.c.id, _v.c.function_id, _f.c.name.label("function_name"), _f.c.tenant, _v.c.version, _v.c.runtime,
    _v.c.handler, _v.c.env, _v.c.memory_mb, _v.c.timeout_s, _v.c.concurrency, _v.c.code_sha256, _v.c.code_size,
    _v.c.code_kind, _v.c.created_at, _v.c.artifact_sha256, _built.c.size.label("artifact_size"), _v.c.max_retries,
    _v.c.layer_sha256,
).select_from(
    _v.join(_f, _f.c.id == _v.c.function_id).outerjoin(_built, _built.c.sha256 == _v.c.artifact_sha256)
).where(_v.c.id == _key)

_GET_CODE = sa.select(_a.c.content).where(_a.c.sha256 == _key)
# An artifact something still needs: a version's code, built artifact or layer, or a build-cache row.
_STILL_USED = sa.or_(
    sa.select(_v.c.id).where(_v.c.code_sha256 == _a.c.sha256).exists(),
    sa.select(_v.c.id).where(_v.c.artifact_sha256 == _a.c.sha256).exists(),
    sa.select(_v.c.id).where(_v.c.layer_sha256 == _a.c.sha256).exists(),
    sa.select(_b.c.key).where(_b.c.artifact_sha256 == _a.c.sha256).exists(),
)
# FOR KEY SHARE: a concurrent delete cannot collect the artifact before our version references it.
_ARTIFACT_PRESENT = sa.select(_a.c.sha256).where(_a.c.sha256 == _key).with_for_update(read=True, key_share=True)
# The same lock on a built artifact a new version is to reference, and its size for the record.
_ARTIFACT_SIZE = sa.select(_a.c.size).where(_a.c.sha256 == _key).with_for_update(read=True, key_share=True)

_GET_BUILD = sa.select(
    _b.c.key, _b.c.runtime, _b.c.toolchain, _b.c.source_sha256, _b.c.artifact_sha256,
    _a.c.size.label("artifact_size"), _b.c.log, _b.c.duration_ms, _b.c.created_at, _b.c.kind,
).select_from(_b.join(_a, _a.c.sha256 == _b.c.artifact_sha256)).where(_b.c.key == _key)

_LIST_LAYERS = sa.select(
    _b.c.key, _b.c.runtime, _b.c.toolchain, _b.c.artifact_sha256, _a.c.size, _b.c.log, _b.c.duration_ms,
    _b.c.created_at,
).select_from(_b.join(_a, _a.c.sha256 == _b.c.artifact_sha256)).where(_b.c.kind == "layer").order_by(
    _b.c.created_at.desc())
# Each tenant's own first request for a layer: what a tenant's listing shows instead of the build's.
_LAYER_ASKS = sa.select(_b.c.artifact_sha256, _t.c.tenant, _t.c.duration_ms, _t.c.created_at).select_from(
    _b.join(_t, _t.c.key == _b.c.key)).where(_b.c.kind == "layer")
_LAYER_USERS = sa.select(_v.c.layer_sha256, _f.c.name, _f.c.tenant).distinct().select_from(
    _v.join(_f, _f.c.id == _v.c.function_id)).where(_v.c.layer_sha256.is_not(None))

_INSERT_INVOCATION = _i.insert()
_GET_INVOCATION = sa.select(_i).where(_i.c.id == _key, _i.c.tenant == _tenant)
# Given a parameter dict, an UPDATE sets the columns its keys name; "key" picks the row.
_UPDATE_INVOCATION = _i.update().where(_i.c.id == _key)
# Lists leave out the event: up to 6 MiB each, and shown by no list view.
_LIST_INVOCATIONS = (
    sa.select(*(c for c in _i.c if c.name != "event")).where(_i.c.function_id == _key)
    .order_by(_i.c.created_at.desc(), _i.c.id.desc()).limit(sa.bindparam("limit", type_=sa.Integer))
)
# A listing's rows newest first with what each costs to load (output and logs: up to 6 MiB + 64 KiB each),
# so a listing can stop at a byte budget instead of loading a thousand results into memory.
_LIST_SIZES = (
    sa.select(_i.c.id, (sa.func.coalesce(sa.func.length(_i.c.output), 0)
                        + sa.func.coalesce(sa.func.length(_i.c.logs), 0)).label("size"))
    .where(_i.c.function_id == _key)
    .order_by(_i.c.created_at.desc(), _i.c.id.desc()).limit(sa.bindparam("limit", type_=sa.Integer))
)
_LIST_BY_IDS = (
    sa.select(*(c for c in _i.c if c.name != "event")).where(_i.c.id.in_(sa.bindparam("ids", expanding=True)))
)
# Claimable async work: queued and past its retry backoff, or running under a lease that ran out (its node died).
_CLAIMABLE = (
    _i.c.mode == "async",
    sa.or_(
        sa.and_(_i.c.status == "queued", sa.or_(_i.c.not_before.is_(None), _i.c.not_before <= sa.bindparam("now"))),
        sa.and_(_i.c.status == "running", _i.c.lease_expires_at < sa.bindparam("now")),
    ),
)
# A node's leases: its id alone (sync calls, callback deliveries) or its id and a claim's nonce (async work).
_OWNED = sa.or_(_i.c.lease_owner == sa.bindparam("owner"),
                _i.c.lease_owner.like(sa.bindparam("owner_like", type_=sa.String), escape="\\"))
_RELEASE_OWNED = (
    _i.update()
    .where(_i.c.mode == "async", _i.c.status == "running", _OWNED)
    .values(status="queued", lease_owner=None, lease_expires_at=None)
)
# A sync call with an Idempotency-Key is recorded as running before it runs; if its node stopped
# meanwhile, nobody will finish it: say so, so a repeated key gets an answer instead of waiting forever.
_ABANDON_OWNED_SYNC = (
    _i.update()
    .where(_i.c.mode == "sync", _i.c.status == "running", _OWNED)
    .values(status="failed", lease_owner=None, lease_expires_at=None, finished_at=sa.bindparam("now"),
            error={"type": "NodeStopped", "message": "the node running this call stopped before it finished",
                   "stack": ""})
)
# Callback deliveries this node held when it stopped are free again at once.
_RELEASE_OWNED_CALLBACKS = (
    _i.update()
    .where(_i.c.callback_status == "pending", _OWNED)
    .values(lease_owner=None, lease_expires_at=None)
)
_RENEW_LEASE = (
    _i.update()
    .where(_i.c.id == _key, _i.c.lease_owner == sa.bindparam("owner"), _i.c.status == "running")
    .values(lease_expires_at=sa.bindparam("expires"))
)
# Every write that starts, ends or hands back an attempt is fenced by its lease token ("<node>:<nonce>",
# new with every claim). A node whose lease ran out, and whose work another claim took, changes nothing
# with a late write, even when the new claimer is the same node.
_FENCE = (_i.c.id == _key, _i.c.status == "running", _i.c.lease_owner == sa.bindparam("token"))
_FENCED_UPDATE = _i.update().where(*_FENCE)
_CLAIM_CALLBACKS = (
    _i.update()
    .where(_i.c.id.in_(
        sa.select(_i.c.id)
        .where(
            _i.c.callback_status == "pending",
            sa.or_(_i.c.not_before.is_(None), _i.c.not_before <= sa.bindparam("now")),
            sa.or_(_i.c.lease_expires_at.is_(None), _i.c.lease_expires_at < sa.bindparam("now")),
        )
        .order_by(_i.c.finished_at, _i.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .with_for_update(skip_locked=True)
    ))
    .values(lease_owner=sa.bindparam("owner"), lease_expires_at=sa.bindparam("expires"),
            callback_attempts=_i.c.callback_attempts + 1)
    .returning(*(c for c in _i.c if c.name != "event"))
)
_CALLBACK_DONE = _i.update().where(
    _i.c.id == _key, _i.c.callback_status == "pending", _i.c.lease_owner == sa.bindparam("owner"),
    _i.c.callback_attempts == sa.bindparam("attempt"),
)
# What the retention sweep may delete: finished, and no result still to be posted to a callback (the
# subquery reads the callback_status index, not the rows, whose large values come before that column).
_SWEEPABLE = (
    _i.c.status.in_(sorted(FINISHED_STATUSES)),
    _i.c.id.not_in(sa.select(_i.c.id).where(_i.c.callback_status == "pending")),
)
# Bytes an invocation keeps: event and output, and its logs (counted in characters: at most 64 KiB of them).
_STORED_BYTES = (sa.func.coalesce(sa.func.length(_i.c.event), 0) + sa.func.coalesce(sa.func.length(_i.c.output), 0)
                 + sa.func.length(_i.c.logs))
_TENANT_USAGE = sa.select(sa.func.coalesce(sa.func.sum(_STORED_BYTES), 0)).where(_i.c.tenant == _tenant)
_BY_IDEMPOTENCY_KEY = sa.select(_i).where(_i.c.tenant == _tenant, _i.c.idempotency_key == _key)
_INVOCATION_FIELDS = tuple(f.name for f in fields(InvocationRecord))


# ---------------------------------------------------------------- URLs and engines


def normalise_url(url: str | URL) -> URL:
    """The async-driver form of a database URL: ``sqlite+aiosqlite`` or ``postgresql+asyncpg``.

    Accepts ``sqlite:///path``, ``postgresql://…``, ``postgres://…`` and URLs already naming a driver.
    """
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise StoreError(f"not a database URL: {url!r}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise StoreError(
        f"unsupported database {parsed.render_as_string(hide_password=True)!r}: use sqlite:/// or postgresql://"
    )


def _create_engine(url: URL) -> AsyncEngine:
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            private_file(Path(database).expanduser())  # results and secrets: never readable by others
        engine = create_async_engine(url)
        _configure_sqlite(engine.sync_engine)
        return engine
    # No pre-ping: it would cost a round trip on every checkout of the hot path. A connection that died
    # with the server fails one call (StoreError), and SQLAlchemy then discards the whole stale pool.
    return create_async_engine(url, pool_size=PG_POOL_SIZE, max_overflow=PG_MAX_OVERFLOW)


def _configure_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver would otherwise open its own deferred transactions; "begin" below decides instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # WAL is a property of the file, switched on once by Store.open; these are per connection.
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; safe with WAL
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A writer takes the write lock up front: upgrading a read transaction later can fail outright.
        # Readers open no transaction at all: each SELECT is atomic on its own, and BEGIN/ROLLBACK would
        # cost two more trips to the driver's thread on every read.
        if conn.get_execution_options().get(_WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


# ---------------------------------------------------------------- errors at the boundary


@contextlib.contextmanager
def _boundary(action: str) -> Iterator[None]:
    """Let Nimbus's own errors through; turn database and connection errors into ``StoreError``."""
    try:
        yield
    except NimbusError:
        raise
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise StoreError(f"could not {action}: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    # The driver's own message, without the SQL and parameters SQLAlchemy adds (they may hold code or events).
    orig = getattr(exc, "orig", None)
    cause = orig if orig is not None else exc
    text = f"{type(cause).__name__}: {cause}".strip()
    text = " ".join(text.split())
    return text if len(text) <= ERROR_DETAIL_MAX else text[: ERROR_DETAIL_MAX - 1] + "…"


def _integrity_kind(exc: sa_exc.IntegrityError) -> str:
    """``unique``, ``foreign_key`` or ``other``, whichever backend raised it."""
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state == "23505":
        return "unique"
    if state == "23503":
        return "foreign_key"
    name = getattr(orig, "sqlite_errorname", "")
    if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
        return "unique"
    if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
        return "foreign_key"
    text = str(orig)
    if "UNIQUE constraint failed" in text:
        return "unique"
    if "FOREIGN KEY constraint failed" in text:
        return "foreign_key"
    return "other"


# ---------------------------------------------------------------- helpers


def _new_id() -> str:
    return uuid.uuid4().hex


async def _sha256(data: bytes) -> str:
    if len(data) > HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


def _size(*values: bytes | str | None) -> int:
    """Bytes (characters, for text) of what an invocation row keeps, as ``_STORED_BYTES`` counts them."""
    return sum(len(value) for value in values if value)


def _function(row: sa.Row) -> FunctionRecord:
    values = dict(row._mapping)
    values["env"] = dict(values["env"] or {})
    return FunctionRecord(**values)


def _version(row: sa.Row) -> VersionRecord:
    values = dict(row._mapping)
    values["env"] = dict(values["env"] or {})
    return VersionRecord(**values)


def _invocation(row: sa.Row) -> InvocationRecord:
    return InvocationRecord(**row._mapping)


def _api_key(row: sa.Row) -> ApiKeyRecord:
    return ApiKeyRecord(**row._mapping)


def _build(row: sa.Row) -> BuildRecord:
    return BuildRecord(**row._mapping)


def _check_sha256(what: str, value: str) -> None:
    # SQLite would store a longer or malformed key without complaint; PostgreSQL would refuse it only late.
    if len(value) != 64 or value.strip("0123456789abcdef"):
        raise ValueError(f"{what} must be a lower-case hex sha256 (64 characters), not {value!r}")


def _claim_statement(busy: Mapping[str, int], *, lock: bool) -> sa.Update:
    """The UPDATE … RETURNING of ``Store.claim_async``; ``busy``: calls per function the claimer already holds.

    Built per claim (``busy`` changes); window functions rank the claimable rows, which PostgreSQL does
    not allow beside ``FOR UPDATE``: there the ranking reads a snapshot and a second select locks the picks.
    """
    held = sa.case(busy, value=_i.c.function_id, else_=0) if busy else sa.literal(0)
    nth = sa.func.row_number().over(partition_by=_i.c.function_id, order_by=(_i.c.created_at, _i.c.id))
    ranked = (
        sa.select(_i.c.id, _i.c.tenant, _i.c.created_at, nth.label("nth"), (_v.c.concurrency - held).label("free"))
        .select_from(_i.join(_v, _v.c.id == _i.c.version_id))
        .where(*_CLAIMABLE)
        .subquery("ranked")
    )
    turn = sa.func.row_number().over(partition_by=ranked.c.tenant,
                                     order_by=(ranked.c.nth, ranked.c.created_at, ranked.c.id))
    fair = (sa.select(ranked.c.id, ranked.c.created_at, turn.label("turn"))
            .where(ranked.c.nth <= ranked.c.free).subquery("fair"))
    picks = (sa.select(fair.c.id).order_by(fair.c.turn, fair.c.created_at, fair.c.id)
             .limit(sa.bindparam("limit", type_=sa.Integer)))
    if lock:
        picks = sa.select(_i.c.id).where(_i.c.id.in_(picks), *_CLAIMABLE).with_for_update(skip_locked=True)
    return (
        _i.update()
        .where(_i.c.id.in_(picks))
        .values(status="running", lease_owner=sa.bindparam("owner"), lease_expires_at=sa.bindparam("expires"),
                not_before=None)
        .returning(*_i.c)
    )


class _LostRace(Exception):  # noqa: N818 - control flow, never leaves this module
    """Raised inside a write transaction to roll it back: another writer committed the same row first."""


def _not_found(key: str) -> NotFound:
    return NotFound(f"function {key!r} not found")


def _insert_error(exc: BaseException, values: dict[str, Any]) -> BaseException:
    """What ``insert_invocation`` raises for ``exc``."""
    if isinstance(exc, sa_exc.IntegrityError):
        kind = _integrity_kind(exc)
        if kind == "foreign_key":
            return NotFound(f"function {values['function_name'] or values['function_id']!r} not found")
        if kind == "unique":
            return Conflict(f"invocation {values['id']!r} already exists")
    if isinstance(exc, (sa_exc.SQLAlchemyError, OSError)):
        return StoreError(f"could not record invocation {values['id']!r}: {_describe(exc)}")
    return exc


class _InsertBatcher:
    """Group commit for ``insert_invocation``: calls that arrive while a write is in flight go together
    in the next transaction, one multi-row INSERT, so recording every call does not cap the node at one
    transaction per call. Each caller still returns only once its own row is committed, and still gets
    its own error: a batch that fails is retried row by row to find out whose row it was.
    """

    def __init__(self, store: "Store") -> None:
        self._store = store
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def insert(self, values: dict[str, Any]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((values, future))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="nimbus-store-inserts")
        # A caller cancelled while waiting leaves its row queued: like a statement already sent, it may
        # still be committed.
        await future

    async def drain(self) -> None:
        """Wait for every insert already asked for."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        batch: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:INSERT_BATCH_MAX], self._pending[INSERT_BATCH_MAX:]
                await self._write(batch)
                batch = []
        except BaseException as exc:  # cancelled with the loop: nobody may be left waiting forever
            for _, future in batch + self._pending:
                if not future.done():
                    future.set_exception(StoreError(f"the store stopped before recording the invocation: {exc!r}"))
            self._pending = []
            raise
        finally:
            self._task = None

    async def _write(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        try:
            await self._store._insert_rows([values for values, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:
                    await self._write([item])
                return
            values, future = batch[0]
            if not future.done():
                future.set_exception(_insert_error(exc, values))
            return
        for _, future in batch:
            if not future.done():
                future.set_result(None)


class _WriteBehind:
    """Write-behind of finished sync invocations: ``put`` keeps the row and returns at once; a flusher
    task commits what is pending every ``interval_s``, or as soon as ``max_rows`` are pending, as one
    multi-row INSERT in one transaction.

    Why: the caller of a sync call already has its answer, so making it wait for its own commit (or
    paying one transaction per call) only costs latency and caps throughput. Rows stay readable here
    until committed (``get``, ``of_function``), so this node reads its own writes. A flush that fails
    is retried with backoff and logged; the rows stay pending meanwhile. A row is dropped only when the
    database refuses it for good (its function was deleted, or the id is stored already), with a log line.
    """

    def __init__(self, store: "Store", interval_s: float, max_rows: int) -> None:
        self._store = store
        self.interval_s = interval_s
        self.max_rows = max_rows
        self._pending: dict[str, dict[str, Any]] = {}  # id → row, oldest first
        self._inflight: dict[str, dict[str, Any]] = {}  # in a flush not yet committed
        self._wake = asyncio.Event()  # flush before the interval is up: enough rows, or flush() asked
        self._hurry = 0  # flush() calls waiting: skip the interval until they are done
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Rows not committed yet."""
        return len(self._pending) + len(self._inflight)

    def put(self, values: dict[str, Any]) -> None:
        self._pending[values["id"]] = values
        if len(self._pending) >= self.max_rows:
            self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="nimbus-store-write-behind")

    def get(self, id_: str) -> dict[str, Any] | None:
        return self._pending.get(id_) or self._inflight.get(id_)

    def of_function(self, function_id: str) -> list[dict[str, Any]]:
        return [values for rows in (self._inflight, self._pending) for values in rows.values()
                if values["function_id"] == function_id]

    def forget_function(self, function_id: str) -> None:
        """Drop the pending rows of a function being deleted (its invocations go with it)."""
        for id_ in [id_ for id_, values in self._pending.items() if values["function_id"] == function_id]:
            del self._pending[id_]

    async def flush(self) -> None:
        """Commit every row put so far, retrying while the database fails."""
        self._hurry += 1
        try:
            while self._task is not None:
                self._wake.set()
                await asyncio.shield(self._task)
        finally:
            self._hurry -= 1

    async def close(self, timeout: float) -> None:
        """Flush; after ``timeout`` s of failing, give up and log every row that is lost."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            lost = list(self._inflight) + list(self._pending)
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            log.error("the store stopped with %d finished sync invocations still unwritten after %g s of "
                      "failing writes; lost: %s", len(lost), timeout, ", ".join(lost))
            self._pending.clear()
            self._inflight.clear()

    async def _run(self) -> None:
        backoff = 0.0  # after a failed flush: how long to leave the database alone
        try:
            while self._pending:
                if backoff:
                    await asyncio.sleep(backoff)  # a full buffer does not cut it short: no hammering
                elif len(self._pending) < self.max_rows and not self._hurry:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.interval_s)
                self._wake.clear()
                if await self._flush_once():
                    backoff = 0.0
                else:
                    backoff = min(max(backoff * 2, self.interval_s, 0.01), WRITE_BEHIND_RETRY_MAX_S)
        finally:
            self._task = None

    async def _flush_once(self) -> bool:
        """Write up to ``max_rows`` pending rows; False (rows pending again) when the database failed."""
        batch = dict(itertools.islice(self._pending.items(), self.max_rows))
        for id_ in batch:
            del self._pending[id_]
        self._inflight.update(batch)
        left = dict(batch)  # rows not committed, nor refused for good
        try:
            try:
                await self._store._insert_rows(list(batch.values()))
                left.clear()
            except sa_exc.IntegrityError:
                # One row or more is refused for good: find which, one transaction per row, keep the rest.
                for id_, values in batch.items():
                    try:
                        await self._store._insert_rows([values])
                    except sa_exc.IntegrityError as exc:
                        log.warning("not recording sync invocation %s: %s", id_, _insert_error(exc, values))
                    del left[id_]
            return True
        except Exception as exc:
            log.error("could not write %d finished sync invocations (%s); they stay pending and are retried",
                      len(left), _describe(exc))
            return False
        finally:
            # Back in front of the newer rows, in one step with leaving _inflight: always readable.
            self._pending = {**left, **self._pending}
            for id_ in batch:
                self._inflight.pop(id_, None)


# ---------------------------------------------------------------- the store


class Store:
    """Functions, their versions and code, the build cache, invocations and API keys, in SQLite or PostgreSQL.

    Open one with ``await Store.open(url)``, which also brings the schema up to date; ``await store.close()``
    when done. Every method is a coroutine and safe to call from many tasks of one event loop at once.
    """

    def __init__(self, engine: AsyncEngine, *, write_behind_ms: float = DEFAULT_WRITE_BEHIND_MS,
                 write_behind_rows: int = INSERT_BATCH_MAX, function_cache_s: float = FUNCTION_CACHE_S) -> None:
        """Wrap an engine made by ``Store.open``; use that instead, it migrates and configures SQLite."""
        self._engine = engine
        self._function_cache_s = function_cache_s
        self._functions: dict[tuple[str, str], tuple[float, FunctionRecord]] = {}
        self._usage: dict[str, list] = {}  # tenant -> [stored bytes, when measured (monotonic)]
        self.dialect: str = engine.dialect.name
        """``sqlite`` or ``postgresql``."""
        if self.dialect == "sqlite":
            self._autocommit = engine  # emits no BEGIN: see _configure_sqlite
            self._writer = engine.execution_options(**{_WRITE_OPTION: True})
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
            self._upsert = sqlite.insert
        else:
            self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            self._writer = engine
            self._write_lock = None
            self._upsert = postgresql.insert
        self._inserts = _InsertBatcher(self)
        # None: write-through (NIMBUS_WRITE_BEHIND_MS=0), and after close.
        self._behind = (_WriteBehind(self, write_behind_ms / 1000, write_behind_rows)
                        if write_behind_ms > 0 else None)

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, url: str | URL, *, function_cache_s: float = FUNCTION_CACHE_S,
                   write_behind_ms: float = DEFAULT_WRITE_BEHIND_MS,
                   write_behind_rows: int = INSERT_BATCH_MAX) -> "Store":
        """Connect to ``url`` and apply any migrations it lacks (creating the SQLite file and its folder).

        ``write_behind_ms``: how long ``record_invocation`` may keep a finished sync invocation in memory
        before writing it (0: write it before returning); ``write_behind_rows``: at most this many rows
        per flush, and a flush starts at once when they are pending.
        """
        target = normalise_url(url)
        shown = target.render_as_string(hide_password=True)
        with _boundary(f"open the database {shown}"):
            engine = _create_engine(target)
        store = cls(engine, write_behind_ms=write_behind_ms, write_behind_rows=write_behind_rows,
                    function_cache_s=function_cache_s)
        try:
            if store.dialect == "sqlite":
                await store._use_incremental_vacuum(shown)
                await store._use_wal(shown)
            await store._migrate(shown)
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def close(self) -> None:
        """Finish pending writes (write-behind rows included) and close every pooled connection.

        Safe to call twice. Rows written behind that still fail after ``WRITE_BEHIND_CLOSE_TIMEOUT_S``
        of retries are logged by id and lost.
        """
        behind, self._behind = self._behind, None  # from here on, sync rows are written through
        try:
            if behind is not None:
                await behind.close(WRITE_BEHIND_CLOSE_TIMEOUT_S)
            await self._inserts.drain()
        finally:
            await self._engine.dispose()

    async def flush(self, timeout: float | None = None) -> bool:
        """Write every finished sync invocation kept by the write-behind now, retrying while the database
        fails, for up to ``timeout`` s (None: until done). Whether all were written; the rest stay pending.
        """
        if self._behind is None:
            return True
        try:
            await asyncio.wait_for(self._behind.flush(), timeout)
        except TimeoutError:
            log.warning("%d finished sync invocations are still unwritten after %g s", self._behind.backlog, timeout)
            return False
        return True

    @property
    def unwritten(self) -> int:
        """Finished sync invocations kept in memory, not committed yet."""
        return 0 if self._behind is None else self._behind.backlog

    async def __aenter__(self) -> "Store":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Store {self._engine.url.render_as_string(hide_password=True)}>"

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            async with self._read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            log.warning("store ping failed: %s", _describe(exc))
            return False
        return True

    async def _use_incremental_vacuum(self, shown: str) -> None:
        """A new SQLite file gives pages freed by deletes back to the file system (``vacuum``), so it
        shrinks after a retention sweep. The mode can only be chosen before the first table exists: a
        file made by an older Nimbus keeps reusing its free pages without shrinking (until a ``VACUUM``)."""
        with _boundary(f"open the database {shown}"):
            async with self._autocommit.connect() as conn:
                if (await conn.exec_driver_sql("PRAGMA auto_vacuum")).scalar() == SQLITE_INCREMENTAL:
                    return
                if (await conn.exec_driver_sql("SELECT count(*) FROM sqlite_master")).scalar():
                    log.info("%s was made without incremental auto-vacuum: it reuses the space of deleted "
                             "invocations but does not shrink (a VACUUM with auto_vacuum=INCREMENTAL converts it)",
                             shown)
                    return
                await conn.exec_driver_sql("PRAGMA auto_vacuum = INCREMENTAL")

    async def _use_wal(self, shown: str) -> None:
        """Put the SQLite file in WAL mode (readers beside the writer), once: the mode stays with the file.

        Switching needs the file to itself and, unlike other statements, does not wait out busy_timeout
        when another connection holds it (several nodes opening a new file together), so retry here.
        """
        deadline = asyncio.get_running_loop().time() + SQLITE_BUSY_TIMEOUT_MS / 1000
        delay = 0.005
        with _boundary(f"open the database {shown}"):
            while True:
                try:
                    async with self._autocommit.connect() as conn:
                        mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
                        if str(mode).lower() == "wal":
                            return
                        mode = (await conn.exec_driver_sql("PRAGMA journal_mode = WAL")).scalar()
                    if str(mode).lower() in ("wal", "memory"):  # an in-memory database has no WAL
                        return
                    raise StoreError(f"cannot put {shown} in WAL mode (it stays in {mode!r} mode)")
                except sa_exc.OperationalError as exc:
                    if "locked" not in str(exc.orig) or asyncio.get_running_loop().time() > deadline:
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.1)

    async def _migrate(self, shown: str) -> None:
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))

        def upgrade(connection: sa.Connection) -> None:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

        with _boundary(f"open the database {shown}"):
            try:
                async with self._write() as conn:
                    if self.dialect == "postgresql":
                        await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_MIGRATION_LOCK)))
                    await conn.run_sync(upgrade)
            except CommandError as exc:
                # Most likely a newer Nimbus migrated this database to a revision this one does not know.
                raise StoreError(f"cannot bring the schema of {shown} up to date: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction of several statements: committed when the block ends, rolled back if it raises."""
        if self._write_lock is None:
            async with self._writer.begin() as conn:
                yield conn
        else:
            async with self._write_lock, self._writer.begin() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _write_one(self) -> AsyncIterator[AsyncConnection]:
        """A connection for exactly one write statement, committed by itself (no BEGIN, no COMMIT trips)."""
        if self._write_lock is None:
            async with self._autocommit.connect() as conn:
                yield conn
        else:
            async with self._write_lock, self._autocommit.connect() as conn:
                yield conn

    async def _insert_rows(self, rows: list[dict[str, Any]]) -> None:
        """INSERT invocation rows in one transaction (one executemany); raw SQLAlchemy errors."""
        if len(rows) == 1:
            async with self._write_one() as conn:
                await conn.execute(_INSERT_INVOCATION, rows[0])
        else:
            async with self._write() as conn:
                await conn.execute(_INSERT_INVOCATION, rows)

    def _read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection for reading; each statement sees the latest committed data."""
        return self._autocommit.connect()

    # ------------------------------------------------------------ functions

    async def create_function(
        self,
        *,
        name: str,
        runtime: str,
        handler: str,
        env: dict[str, str],
        memory_mb: int,
        timeout_s: float,
        concurrency: int,
        code: bytes,
        code_kind: str,
        tenant: str = DEFAULT_TENANT,
        artifact_sha256: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        layer_sha256: str | None = None,
    ) -> FunctionRecord:
        """Create a function at version 1. ``Conflict`` if the tenant already has one with this name.

        The code is stored once per sha256: functions with identical bytes share one artifact.
        ``artifact_sha256`` (compiled runtimes) names the built artifact the machines run, and
        ``layer_sha256`` the dependency layer they mount, both already stored by ``put_build``;
        ``NotFound`` if there is no such artifact.
        """
        now = utcnow()
        sha = await _sha256(code)
        record = FunctionRecord(
            id=_new_id(), name=name, tenant=tenant, runtime=runtime, handler=handler, env=dict(env),
            memory_mb=memory_mb, timeout_s=float(timeout_s), concurrency=concurrency, version=1,
            version_id=_new_id(), code_sha256=sha, code_size=len(code), code_kind=code_kind, created_at=now,
            updated_at=now, artifact_sha256=artifact_sha256, max_retries=max_retries, layer_sha256=layer_sha256,
        )
        with _boundary(f"create function {name!r}"):
            async with self._write() as conn:
                # Checked first so a taken name does not cost an upload of the code.
                if await conn.scalar(_NAME_TAKEN, {"tenant": tenant, "key": name}) is not None:
                    raise Conflict(f"function {name!r} already exists")
                if artifact_sha256 is not None:
                    record.artifact_size = await self._hold_artifact(conn, artifact_sha256)
                if layer_sha256 is not None:
                    await self._hold_artifact(conn, layer_sha256)
                await self._put_artifact(conn, sha, runtime, code, now)
                try:
                    await conn.execute(
                        _f.insert(),
                        {"id": record.id, "tenant": tenant, "name": name, "version": 1, "created_at": now,
                         "updated_at": now},
                    )
                except sa_exc.IntegrityError as exc:
                    if _integrity_kind(exc) == "unique":  # created by someone else since the check
                        raise Conflict(f"function {name!r} already exists") from None
                    raise
                await conn.execute(_v.insert(), _version_row(record))
        return record

    async def update_function(
        self,
        name_or_id: str,
        *,
        tenant: str = DEFAULT_TENANT,
        code: bytes | None = None,
        code_kind: str | None = None,
        runtime: str | None = None,
        handler: str | None = None,
        env: dict[str, str] | None = None,
        memory_mb: int | None = None,
        timeout_s: float | None = None,
        concurrency: int | None = None,
        artifact_sha256: str | None = None,
        max_retries: int | None = None,
        layer_sha256: str | None = None,
    ) -> FunctionRecord:
        """Make version N+1 from the latest, with the given code and settings changed. ``NotFound``.

        The built artifact goes with the code: new code runs ``artifact_sha256`` (None: it is interpreted),
        no new code keeps the latest version's artifact, unless ``artifact_sha256`` names a new one (the
        same source rebuilt, say for another toolchain). The dependency layer goes with the code the same
        way. A named artifact or layer must exist (``put_build``), else ``NotFound``.
        """
        now = utcnow()
        sha = await _sha256(code) if code is not None else None
        with _boundary(f"update function {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                current = _function((await conn.execute(_FUNCTION_BY_ID, {"key": function_id})).one())
                if artifact_sha256 is not None:
                    built: tuple[str | None, int | None] = (
                        artifact_sha256, await self._hold_artifact(conn, artifact_sha256))
                elif code is not None:
                    built = (None, None)
                else:
                    # Nothing to lock: the current version references it, and we hold the function's lock.
                    built = (current.artifact_sha256, current.artifact_size)
                if layer_sha256 is not None:
                    await self._hold_artifact(conn, layer_sha256)
                    layer = layer_sha256
                else:
                    layer = None if code is not None else current.layer_sha256
                record = FunctionRecord(
                    id=current.id, name=current.name, tenant=current.tenant,
                    runtime=runtime if runtime is not None else current.runtime,
                    handler=handler if handler is not None else current.handler,
                    env=dict(env) if env is not None else current.env,
                    memory_mb=memory_mb if memory_mb is not None else current.memory_mb,
                    timeout_s=float(timeout_s) if timeout_s is not None else current.timeout_s,
                    concurrency=concurrency if concurrency is not None else current.concurrency,
                    version=current.version + 1, version_id=_new_id(),
                    code_sha256=sha if sha is not None else current.code_sha256,
                    code_size=len(code) if code is not None else current.code_size,
                    code_kind=code_kind if code_kind is not None else current.code_kind,
                    created_at=current.created_at, updated_at=now,
                    artifact_sha256=built[0], artifact_size=built[1],
                    max_retries=max_retries if max_retries is not None else current.max_retries,
                    layer_sha256=layer,
                )
                if code is not None:
                    await self._put_artifact(conn, record.code_sha256, record.runtime, code, now)
                await conn.execute(_v.insert(), _version_row(record))
                await conn.execute(
                    _f.update().where(_f.c.id == record.id).values(version=record.version, updated_at=now)
                )
        self._functions.clear()  # this node sees its own change at once
        return record

    async def get_function(self, name_or_id: str, tenant: str = DEFAULT_TENANT) -> FunctionRecord:
        """The function (at its latest version) by name or id. ``NotFound``."""
        with _boundary(f"read function {name_or_id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(_GET_FUNCTION, {"key": name_or_id, "tenant": tenant})).first()
        if row is None:
            raise _not_found(name_or_id)
        return _function(row)

    async def lookup_function(self, name_or_id: str, tenant: str = DEFAULT_TENANT) -> FunctionRecord:
        """``get_function`` through a short-lived cache, for the invoke path: the look-up was the biggest
        share of a warm call's CPU. Writes through this store clear it at once; a change made by another
        node is seen within ``function_cache_s``. The record is shared: callers must not change it."""
        key = (tenant, name_or_id)
        hit = self._functions.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        fn = await self.get_function(name_or_id, tenant)
        if self._function_cache_s > 0:
            if len(self._functions) >= FUNCTION_CACHE_MAX:
                self._functions.clear()
            self._functions[key] = (now + self._function_cache_s, fn)
        return fn

    async def list_functions(
        self,
        *,
        tenant: str = DEFAULT_TENANT,
        runtime: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        offset: int = 0,
    ) -> tuple[list[FunctionRecord], int]:
        """One page of the tenant's functions ordered by name, and how many there are in all."""
        where = [_f.c.tenant == tenant]
        if runtime is not None:
            where.append(_v.c.runtime == runtime)
        with _boundary("list functions"):
            async with self._read() as conn:
                rows = (await conn.execute(
                    _SELECT_LATEST.where(*where).order_by(_f.c.name).limit(max(limit, 0)).offset(max(offset, 0))
                )).all()
                total = await conn.scalar(sa.select(sa.func.count()).select_from(_LATEST).where(*where))
        return [_function(row) for row in rows], int(total or 0)

    async def delete_function(self, name_or_id: str, tenant: str = DEFAULT_TENANT) -> FunctionRecord:
        """Delete a function, its versions and invocations, and any artifact nothing else uses.

        Returns the function as it was. ``NotFound``.
        """
        with _boundary(f"delete function {name_or_id!r}"):
            async with self._write() as conn:
                function_id = await self._lock_function(conn, name_or_id, tenant)
                if self._behind is not None:
                    # Rows not sent yet go with it; one in a flush now either commits first (and is
                    # deleted here) or finds the function gone and is dropped.
                    self._behind.forget_function(function_id)
                record = _function((await conn.execute(_FUNCTION_BY_ID, {"key": function_id})).one())
                rows = (await conn.execute(
                    sa.select(_v.c.code_sha256, _v.c.artifact_sha256, _v.c.layer_sha256)
                    .where(_v.c.function_id == function_id)
                )).all()
                shas = sorted({sha for row in rows for sha in row if sha is not None})
                await conn.execute(_i.delete().where(_i.c.function_id == function_id))
                await conn.execute(_v.delete().where(_v.c.function_id == function_id))
                await conn.execute(_f.delete().where(_f.c.id == function_id))
                # Lock the candidates first, in a statement of its own: a concurrent create or put_build
                # that is about to reference one holds FOR KEY SHARE on it, so this waits for it to commit,
                # and the DELETE below (a new snapshot) then sees its row and keeps the artifact.
                await conn.execute(sa.select(_a.c.sha256).where(_a.c.sha256.in_(shas)).with_for_update())
                # A build row keeps its artifact too: the cache outlives the function (`nimbus gc` prunes it).
                await conn.execute(_a.delete().where(_a.c.sha256.in_(shas), ~_STILL_USED))
        self._functions.clear()  # this node sees its own change at once
        return record

    async def get_version(self, version_id: str) -> VersionRecord:
        """One version by its id (what an invocation records). ``NotFound``."""
        with _boundary(f"read version {version_id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(_GET_VERSION, {"key": version_id})).first()
        if row is None:
            raise NotFound(f"version {version_id!r} not found")
        return _version(row)

    async def get_code(self, sha256: str) -> bytes:
        """The code bytes stored under this hash. ``NotFound``."""
        with _boundary(f"read artifact {sha256!r}"):
            async with self._read() as conn:
                content = await conn.scalar(_GET_CODE, {"key": sha256})
        if content is None:
            raise NotFound(f"artifact {sha256!r} not found")
        return bytes(content)

    # ------------------------------------------------------------ the build cache

    async def put_build(
        self,
        *,
        key: str,
        runtime: str,
        toolchain: str,
        source_sha256: str,
        artifact: bytes,
        log: str,
        duration_ms: float,
        kind: str = "artifact",
    ) -> BuildRecord:
        """Store a build's artifact (shared with any identical bytes) and its cache row, in one transaction.

        Idempotent: if ``key`` is already there (stored before, or by a concurrent put on any node), that
        row is returned unchanged and nothing new is kept, so the first build of a key is the one every
        deploy gets.
        """
        _check_sha256("key", key)
        _check_sha256("source_sha256", source_sha256)
        if len(toolchain) > tables.TOOLCHAIN:
            raise ValueError(f"toolchain is {len(toolchain)} characters; at most {tables.TOOLCHAIN} are kept")
        now = utcnow()
        record = BuildRecord(
            key=key, runtime=runtime, toolchain=toolchain, source_sha256=source_sha256,
            artifact_sha256=await _sha256(artifact), artifact_size=len(artifact), log=log,
            duration_ms=float(duration_ms), created_at=now, kind=kind,
        )
        insert = self._upsert(_b).values(
            key=key, runtime=runtime, toolchain=toolchain, source_sha256=source_sha256,
            artifact_sha256=record.artifact_sha256, log=log, duration_ms=record.duration_ms, created_at=now,
            kind=kind,
        ).on_conflict_do_nothing(index_elements=[_b.c.key])
        with _boundary(f"store build {key!r}"):
            try:
                async with self._write() as conn:
                    row = (await conn.execute(_GET_BUILD, {"key": key})).first()
                    if row is not None:
                        return _build(row)
                    await self._put_artifact(conn, record.artifact_sha256, runtime, artifact, now)
                    if (await conn.execute(insert)).rowcount == 0:
                        # PostgreSQL: a concurrent put of this key committed while we waited on it. Roll
                        # back, so an artifact only our losing build produced is not left behind unused.
                        raise _LostRace
            except _LostRace:
                async with self._read() as conn:
                    row = (await conn.execute(_GET_BUILD, {"key": key})).first()
                if row is None:  # the winner's row was pruned in between: nothing sensible to return
                    raise StoreError(f"build {key!r} was removed while being stored; try again") from None
                return _build(row)
        return record

    async def get_build(self, key: str) -> BuildRecord | None:
        """The cached build under ``key``, or None: a miss is the normal answer, not an error."""
        with _boundary(f"read build {key!r}"):
            async with self._read() as conn:
                row = (await conn.execute(_GET_BUILD, {"key": key})).first()
        return None if row is None else _build(row)

    async def claim_build(self, key: str, tenant: str, duration_ms: float) -> float | None:
        """Note that ``tenant`` asked for build ``key`` (its request took ``duration_ms``).

        None when this is the tenant's first request for it (recorded now); otherwise the duration of
        that first request. The build cache is shared by every tenant; whether a tenant had it already
        is only ever told to that tenant (``cached``), so a hit never confirms what another deployed.
        """
        _check_sha256("key", key)
        insert = self._upsert(_t).values(
            key=key, tenant=tenant, duration_ms=float(duration_ms), created_at=utcnow(),
        ).on_conflict_do_nothing(index_elements=[_t.c.key, _t.c.tenant])
        with _boundary(f"record build {key!r} for tenant {tenant!r}"):
            async with self._write() as conn:
                if (await conn.execute(insert)).rowcount:
                    return None
                return float(await conn.scalar(
                    sa.select(_t.c.duration_ms).where(_t.c.key == key, _t.c.tenant == tenant)))

    # ------------------------------------------------------------ layers and garbage

    async def list_layers(self, tenant: str | None = DEFAULT_TENANT) -> list[LayerRecord]:
        """Dependency layers, newest first, each with the names of ``tenant``'s functions that mount it.

        A tenant sees the layers its own functions use; ``tenant=None`` (an admin) sees every layer, the
        unused ones too, with every tenant's function names as ``tenant/name``. A tenant sees its own first
        request's time and duration (``claim_build``), not the build's, which another tenant may have run.
        """
        with _boundary("list layers"):
            async with self._read() as conn:
                rows = (await conn.execute(_LIST_LAYERS)).all()
                users = (await conn.execute(_LAYER_USERS)).all()
                asks = {} if tenant is None else {
                    row.artifact_sha256: row for row in (await conn.execute(_LAYER_ASKS)).all()
                    if row.tenant == tenant}
        names: dict[str, set[str]] = {}
        for sha, name, owner in users:
            if tenant is None:
                names.setdefault(sha, set()).add(name if owner == DEFAULT_TENANT else f"{owner}/{name}")
            elif owner == tenant:
                names.setdefault(sha, set()).add(name)
        layers = []
        for row in rows:
            if tenant is not None and row.artifact_sha256 not in names:
                continue
            own = asks.get(row.artifact_sha256, row)
            layers.append(LayerRecord(
                sha256=row.artifact_sha256, key=row.key, runtime=row.runtime, platform=row.toolchain, size=row.size,
                log=row.log, duration_ms=own.duration_ms, created_at=own.created_at,
                functions=sorted(names.get(row.artifact_sha256, ()))))
        return layers

    async def collect_garbage(self, *, grace_s: float = 0.0) -> dict[str, int]:
        """Remove build-cache rows (compiled artifacts and layers) that no version uses, then every artifact
        nothing references; only what is older than ``grace_s``, so a deploy between its build and its
        version insert keeps what it just stored. Returns counts of builds, layers, artifacts and bytes freed.
        """
        cutoff = utcnow() - timedelta(seconds=max(0.0, grace_s))
        used = sa.or_(
            sa.select(_v.c.id).where(_v.c.code_sha256 == _b.c.artifact_sha256).exists(),
            sa.select(_v.c.id).where(_v.c.artifact_sha256 == _b.c.artifact_sha256).exists(),
            sa.select(_v.c.id).where(_v.c.layer_sha256 == _b.c.artifact_sha256).exists(),
        )
        with _boundary("collect garbage"):
            async with self._write() as conn:
                stale = (await conn.execute(
                    sa.select(_b.c.key, _b.c.kind).where(_b.c.created_at < cutoff, ~used)
                )).all()
                keys = [row.key for row in stale]
                if keys:
                    await conn.execute(_b.delete().where(_b.c.key.in_(keys), ~used))
                candidates = sa.select(_a.c.sha256).where(_a.c.created_at < cutoff, ~_STILL_USED)
                # Lock first (a deploy about to reference one holds FOR KEY SHARE: wait for it), then delete
                # in a statement of its own, which sees what that deploy committed.
                shas = list((await conn.scalars(candidates.with_for_update())).all())
                freed = 0
                if shas:
                    freed = int(await conn.scalar(
                        sa.select(sa.func.coalesce(sa.func.sum(_a.c.size), 0)).where(_a.c.sha256.in_(shas))) or 0)
                    result = await conn.execute(_a.delete().where(_a.c.sha256.in_(shas), ~_STILL_USED))
                    removed = result.rowcount
                else:
                    removed = 0
        return {"builds": sum(row.kind != "layer" for row in stale), "layers": sum(row.kind == "layer" for row in stale),
                "artifacts": removed, "bytes": freed}

    async def layer_shas(self) -> set[str]:
        """The sha256 of every layer the store still holds (a node keeps only these unpacked)."""
        with _boundary("list layers"):
            async with self._read() as conn:
                rows = await conn.scalars(
                    sa.select(_v.c.layer_sha256).where(_v.c.layer_sha256.is_not(None))
                    .union(sa.select(_b.c.artifact_sha256).where(_b.c.kind == "layer"))
                )
                return set(rows.all())

    # ------------------------------------------------------------ helpers

    async def _hold_artifact(self, conn: AsyncConnection, sha: str) -> int:
        """The size of a stored artifact a new row is about to reference, kept from deletion until commit.

        ``NotFound`` if it is not stored: the caller must ``put_build`` it first.
        """
        size = await conn.scalar(_ARTIFACT_SIZE, {"key": sha})
        if size is None:
            raise NotFound(f"artifact {sha!r} not found: store the build with put_build first")
        return int(size)

    async def _lock_function(self, conn: AsyncConnection, key: str, tenant: str) -> str:
        """The id of the function ``key`` names, locked for this transaction (PostgreSQL). ``NotFound``."""
        function_id = await conn.scalar(_LOCK_FUNCTION, {"key": key, "tenant": tenant})
        if function_id is None:
            raise _not_found(key)
        return function_id

    async def _put_artifact(self, conn: AsyncConnection, sha: str, runtime: str, code: bytes, now: datetime) -> None:
        """Make sure the artifact exists and stays until this transaction commits.

        If a concurrent delete collected it between our look and our insert, we look again.
        """
        insert = self._upsert(_a).values(
            sha256=sha, runtime=runtime, size=len(code), content=code, created_at=now
        ).on_conflict_do_nothing(index_elements=[_a.c.sha256])
        for _ in range(ARTIFACT_PUT_TRIES):
            if await conn.scalar(_ARTIFACT_PRESENT, {"key": sha}) is not None:
                return
            if (await conn.execute(insert)).rowcount == 1:
                return
        raise StoreError(f"artifact {sha} kept disappearing while being stored; try again")

    # ------------------------------------------------------------ invocations

    async def insert_invocation(self, inv: InvocationRecord) -> None:
        """Record an invocation as it stands (a finished sync call, or a queued async one).

        Returns once the row is committed. ``NotFound`` if its function no longer exists; ``Conflict``
        if the id is taken.
        """
        await self._inserts.insert({name: getattr(inv, name) for name in _INVOCATION_FIELDS})
        self._count_usage(inv.tenant, _size(inv.event, inv.output, inv.logs))

    async def record_invocation(self, inv: InvocationRecord) -> None:
        """Record a finished sync invocation, written behind: kept in memory and committed with the
        others of the next few milliseconds in one INSERT; readable on this node meanwhile.

        Only for rows nothing updates later (a plain sync call): async and idempotent calls must be
        in the store before they run, through ``insert_invocation``/``insert_idempotent``. Write-through
        when write-behind is off or the store is closed. A backlog past ``WRITE_BEHIND_MAX_PENDING``
        (a failing database) makes the caller wait for it, instead of growing without bound.
        """
        if inv.status not in FINISHED_STATUSES:
            raise ValueError(f"only a finished invocation is written behind, not one {inv.status!r}")
        values = {name: getattr(inv, name) for name in _INVOCATION_FIELDS}
        self._count_usage(inv.tenant, _size(inv.event, inv.output, inv.logs))
        behind = self._behind
        if behind is None:
            await self._inserts.insert(values)
            return
        if behind.backlog >= WRITE_BEHIND_MAX_PENDING:
            await behind.flush()
        behind.put(values)

    async def insert_idempotent(self, inv: InvocationRecord) -> tuple[InvocationRecord, bool]:
        """Record ``inv`` unless its tenant already has an invocation with its ``idempotency_key``.

        Returns ``(record, created)``: ``inv`` itself and True, or the first invocation recorded under
        the key and False. Concurrent inserts of one key, on any node, resolve to one row through the
        unique index on (tenant, idempotency_key): the losers find the winner's row.
        """
        if inv.idempotency_key is None:
            await self.insert_invocation(inv)
            return inv, True
        existing = await self.get_by_idempotency_key(inv.tenant, inv.idempotency_key)
        if existing is not None:
            return existing, False
        try:
            await self.insert_invocation(inv)
        except Conflict:
            existing = await self.get_by_idempotency_key(inv.tenant, inv.idempotency_key)
            if existing is None:  # the id, not the key, was taken: not ours to explain away
                raise
            return existing, False
        return inv, True

    async def get_by_idempotency_key(self, tenant: str, key: str) -> InvocationRecord | None:
        """The tenant's invocation recorded under this ``Idempotency-Key``, or None."""
        with _boundary("look up an idempotency key"):
            async with self._read() as conn:
                row = (await conn.execute(_BY_IDEMPOTENCY_KEY, {"tenant": tenant, "key": key})).first()
        return None if row is None else _invocation(row)

    async def finish_invocation(
        self,
        id: str,  # noqa: A002 - the record's own field name
        *,
        status: str,
        start: str | None,
        output: bytes | None,
        error: dict | None,
        logs: str,
        logs_truncated: bool,
        duration_ms: float | None,
        finished_at: datetime,
        token: str | None = None,
        callback: bool = False,
        started_at: datetime | None = None,
        restored: bool = False,
        tenant: str | None = None,
    ) -> bool:
        """Record the outcome of a call and drop its lease.

        Without ``token``: unconditional; ``NotFound`` if the invocation is gone. With the lease token a
        claim handed out (``lease_owner`` of the claimed record): fenced, it writes only while that lease
        still holds the row, and returns False when it no longer does (the lease ran out and the work was
        claimed again, or was handed back). ``callback`` marks the result for delivery to the
        invocation's ``callback_url``; ``started_at`` records when the call began; ``restored`` that its
        machine came from a snapshot; ``tenant`` (when given) has the output and logs counted in its usage.
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(f"{status!r} is not a finished status ({', '.join(sorted(FINISHED_STATUSES))})")
        values = {
            "status": status, "start": start, "restored": restored, "output": output, "error": error,
            "logs": logs, "logs_truncated": logs_truncated, "duration_ms": duration_ms, "finished_at": finished_at,
            "lease_owner": None, "lease_expires_at": None, "not_before": None,
        }
        if started_at is not None:
            values["started_at"] = started_at
        if callback:
            values["callback_status"] = "pending"
        with _boundary(f"finish invocation {id!r}"):
            if token is None:
                async with self._write_one() as conn:
                    result = await conn.execute(_UPDATE_INVOCATION, {"key": id, **values})
                if result.rowcount == 0:
                    raise NotFound(f"invocation {id!r} not found")
                if tenant is not None:
                    self._count_usage(tenant, _size(output, logs))
                return True
            async with self._write_one() as conn:
                result = await conn.execute(_FENCED_UPDATE.values(**values), {"key": id, "token": token})
        if result.rowcount == 1 and tenant is not None:
            self._count_usage(tenant, _size(output, logs))
        return result.rowcount == 1

    async def start_attempt(self, id: str, token: str) -> bool:  # noqa: A002
        """Count an attempt: the claimed call is about to reach a machine. Fenced by the lease token.

        Attempts are counted here, not at the claim, so work a node had claimed but not started when it
        died (or was stopped) is not charged an attempt it never made.
        """
        with _boundary(f"start invocation {id!r}"):
            async with self._write_one() as conn:
                result = await conn.execute(_FENCED_UPDATE.values(attempts=_i.c.attempts + 1, started_at=utcnow()),
                                            {"key": id, "token": token})
        return result.rowcount == 1

    async def retry_later(
        self,
        id: str,  # noqa: A002
        *,
        token: str,
        not_before: datetime,
        error: dict | None,
        start: str | None,
        logs: str,
        logs_truncated: bool,
        duration_ms: float | None,
        restored: bool = False,
    ) -> bool:
        """Put a failed attempt back in the queue, not to be claimed before ``not_before`` (its backoff).

        The failed attempt's outcome stays visible meanwhile (``error``, ``logs``…) under status
        ``queued``. Fenced like ``finish_invocation``; False when the lease is no longer this one.
        """
        values = {
            "status": "queued", "lease_owner": None, "lease_expires_at": None, "not_before": not_before,
            "error": error, "start": start, "restored": restored, "logs": logs, "logs_truncated": logs_truncated,
            "duration_ms": duration_ms, "output": None,
        }
        with _boundary(f"queue invocation {id!r} for a retry"):
            async with self._write_one() as conn:
                result = await conn.execute(_FENCED_UPDATE.values(**values), {"key": id, "token": token})
        return result.rowcount == 1

    async def release(self, leases: dict[str, str]) -> int:
        """Hand back leased async work at once (graceful shutdown): queued again, claimable by anyone.

        ``leases`` maps invocation id to its lease token. Returns how many rows were handed back.
        """
        if not leases:
            return 0
        statement = _FENCED_UPDATE.values(status="queued", lease_owner=None, lease_expires_at=None)
        with _boundary("hand back leases"):
            async with self._write() as conn:
                count = 0
                for id_, token in leases.items():  # executemany's rowcount is not reliable on every driver
                    count += (await conn.execute(statement, {"key": id_, "token": token})).rowcount
        return count

    async def renew_leases(self, leases: dict[str, str], lease_s: float) -> set[str]:
        """Extend these leases (invocation id → lease token); the ids whose lease still holds."""
        if not leases:
            return set()
        statement = (
            _i.update()
            .where(_i.c.id.in_(list(leases)), _i.c.lease_owner.in_(set(leases.values())), _i.c.status == "running")
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            .returning(_i.c.id, _i.c.lease_owner)
        )
        with _boundary("renew leases"):
            async with self._write_one() as conn:
                rows = (await conn.execute(statement)).all()
        return {id_ for id_, token in rows if leases.get(id_) == token}

    # ------------------------------------------------------------ result callbacks

    async def claim_callbacks(self, owner: str, *, limit: int, lease_s: float) -> list[InvocationRecord]:
        """Take up to ``limit`` pending result deliveries, each leased to ``owner`` for ``lease_s``.

        A finished invocation has no lease of its own, so its lease columns hold the delivery's, and
        ``not_before`` the delivery's backoff. ``callback_attempts`` counts the claim. No event loaded.
        """
        if limit <= 0:
            return []
        now = utcnow()
        params = {"now": now, "limit": limit, "owner": owner, "expires": now + timedelta(seconds=lease_s)}
        with _boundary("claim result callbacks"):
            async with self._write_one() as conn:
                rows = (await conn.execute(_CLAIM_CALLBACKS, params)).all()
        return [_invocation(row) for row in rows]

    async def callback_done(self, id: str, *, owner: str, attempt: int, status: str,  # noqa: A002
                            not_before: datetime | None = None) -> bool:
        """Record a delivery's outcome: ``delivered``, ``failed`` (gave up), or ``pending`` again after
        ``not_before``. Fenced by the delivery's lease; False when it is no longer this one."""
        if status not in ("pending", "delivered", "failed"):
            raise ValueError(f"{status!r} is not a callback status")
        values = {"callback_status": status, "lease_owner": None, "lease_expires_at": None, "not_before": not_before}
        with _boundary(f"record the callback of {id!r}"):
            async with self._write_one() as conn:
                result = await conn.execute(_CALLBACK_DONE.values(**values),
                                            {"key": id, "owner": owner, "attempt": attempt})
        return result.rowcount == 1

    async def get_invocation(self, id: str, tenant: str = DEFAULT_TENANT) -> InvocationRecord:  # noqa: A002
        """One invocation, with its event, output and logs (written behind or committed). ``NotFound``."""
        if self._behind is not None:
            values = self._behind.get(id)
            if values is not None and values["tenant"] == tenant:
                return InvocationRecord(**values)
        with _boundary(f"read invocation {id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(_GET_INVOCATION, {"key": id, "tenant": tenant})).first()
        if row is None:
            raise NotFound(f"invocation {id!r} not found")
        return _invocation(row)

    async def list_invocations(self, function_id: str, *, limit: int = DEFAULT_LIST_LIMIT) -> list[InvocationRecord]:
        """A function's most recent invocations, newest first, those written behind included. Their
        ``event`` is not loaded (None)."""
        return (await self.list_invocations_page(function_id, limit=limit))[0]

    async def list_invocations_page(self, function_id: str, *, limit: int = DEFAULT_LIST_LIMIT,
                                    max_bytes: int | None = None) -> tuple[list[InvocationRecord], bool]:
        """``list_invocations``, stopping before the rows' outputs and logs pass ``max_bytes`` (the first
        row is always loaded); the flag says whether it stopped early.

        The API lists up to 1,000 rows; at 6 MiB of output each, an unbounded page is gigabytes of node memory.
        """
        limit, truncated = max(limit, 0), False
        with _boundary("list invocations"):
            async with self._read() as conn:
                if max_bytes is None:
                    rows = (await conn.execute(_LIST_INVOCATIONS, {"key": function_id, "limit": limit})).all()
                else:
                    sizes = (await conn.execute(_LIST_SIZES, {"key": function_id, "limit": limit})).all()
                    ids, total = [], 0
                    for id_, size in sizes:
                        total += size
                        if ids and total > max_bytes:
                            truncated = True
                            break
                        ids.append(id_)
                    rows = (await conn.execute(_LIST_BY_IDS, {"ids": ids})).all() if ids else []
                    rows.sort(key=lambda row: (row.created_at, row.id), reverse=True)
                    limit = len(ids) if truncated else limit
        listed = [_invocation(row) for row in rows]
        return self._with_unwritten(function_id, listed, limit), truncated

    def _with_unwritten(self, function_id: str, listed: list[InvocationRecord], limit: int) -> list[InvocationRecord]:
        """``listed`` with the function's rows still waiting in the write-behind buffer, newest ``limit`` first."""
        unwritten = self._behind.of_function(function_id) if self._behind is not None else []
        if not unwritten:
            return listed
        merged = {inv.id: inv for inv in listed}  # a row committed while we read is in both
        merged.update((values["id"], InvocationRecord(**{**values, "event": None})) for values in unwritten)
        return sorted(merged.values(), key=lambda inv: (inv.created_at, inv.id), reverse=True)[: max(limit, 0)]

    async def claim_async(self, owner: str, *, limit: int, lease_s: float,
                          busy: Mapping[str, int] | None = None) -> list[InvocationRecord]:
        """Take up to ``limit`` async invocations to run, leased to ``owner`` for ``lease_s``.

        Fair, so one tenant's backlog cannot hold up everyone else's calls: of each function at most as
        many as it can start now, its version's ``concurrency`` less ``busy[function_id]`` (the calls the
        claiming node already runs or holds for it); oldest first within a function, functions in turn
        (each one's oldest, then each one's second…) and tenants in turn above them.

        Claimable: ``queued`` and past its ``not_before``, or ``running`` under a lease that has run out
        (its node died). Each claimed row becomes ``running``; its ``lease_owner`` is the lease token
        ``"<owner>:<nonce>"``, new with every claim, which fences every later write of this attempt
        (``start_attempt``, ``finish_invocation``, ``retry_later``, ``release``). ``attempts`` is not
        changed: ``start_attempt`` counts it. No two claimers ever get the same row: on PostgreSQL the
        picks are locked ``FOR UPDATE SKIP LOCKED`` and checked to be claimable again (a row another node
        took meanwhile is skipped); on SQLite the pick and the update are one statement, run under the
        write lock that SQLite holds for a whole statement (in-process, the store's own lock serialises
        writers too). Returned oldest first.
        """
        if limit <= 0:
            return []
        now = utcnow()
        params = {"now": now, "limit": limit, "owner": f"{owner}:{uuid.uuid4().hex[:12]}",
                  "expires": now + timedelta(seconds=lease_s)}
        statement = _claim_statement({key: n for key, n in (busy or {}).items() if n > 0},
                                     lock=self.dialect == "postgresql")
        with _boundary("claim async invocations"):
            async with self._write_one() as conn:
                rows = (await conn.execute(statement, params)).all()
        # RETURNING promises no order.
        return sorted((_invocation(row) for row in rows), key=lambda inv: (inv.created_at, inv.id))

    async def release_owned(self, owner: str) -> int:
        """Put back in the queue the async invocations node ``owner`` was running; how many.

        A node restarting after a crash hands back its own work at once instead of waiting for its
        leases to run out. An interrupted attempt that had started stays counted. Its pending result
        deliveries are freed too, and its idempotent sync calls, which nobody can finish now, are
        marked failed.
        """
        like = owner.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params = {"owner": owner, "owner_like": f"{like}:%"}
        with _boundary(f"release the leases of {owner!r}"):
            async with self._write() as conn:
                result = await conn.execute(_RELEASE_OWNED, params)
                await conn.execute(_ABANDON_OWNED_SYNC, {**params, "now": utcnow()})
                await conn.execute(_RELEASE_OWNED_CALLBACKS, params)
        return result.rowcount

    async def renew_lease(self, id: str, owner: str, lease_s: float) -> bool:  # noqa: A002
        """Extend the lease ``owner`` (a lease token) holds on a running invocation; False if it no longer does."""
        params = {"key": id, "owner": owner, "expires": utcnow() + timedelta(seconds=lease_s)}
        with _boundary(f"renew the lease on {id!r}"):
            async with self._write_one() as conn:
                result = await conn.execute(_RENEW_LEASE, params)
        return result.rowcount == 1

    async def count_invocations(self, function_id: str | None = None, status: str | None = None) -> int:
        """How many invocations there are, of one function and/or in one status (written-behind rows
        are flushed first, so they count)."""
        await self.flush()
        query = sa.select(sa.func.count()).select_from(_i)
        if function_id is not None:
            query = query.where(_i.c.function_id == function_id)
        if status is not None:
            query = query.where(_i.c.status == status)
        with _boundary("count invocations"):
            async with self._read() as conn:
                return int(await conn.scalar(query) or 0)

    # ------------------------------------------------------------ retention and byte budgets

    async def sweep_invocations(self, *, max_age_s: float = 0, keep: int = 0, batch: int = SWEEP_BATCH) -> int:
        """Delete finished invocations older than ``max_age_s``, and all but the newest ``keep`` finished
        ones of each function (0: no such limit); how many were deleted.

        Never a queued or running one (an async call not yet done, an idempotent sync call in flight), nor
        one whose result is still to be posted to its callback. At most ``batch`` rows per transaction, so
        writers are not held up for long; safe beside sweeps on other nodes (on PostgreSQL each deletes
        rows the others have not locked; on SQLite deleting a row twice deletes nothing).
        """
        deleted = 0
        if max_age_s > 0:
            cutoff = utcnow() - timedelta(seconds=max_age_s)
            deleted += await self._delete_batches(
                sa.select(_i.c.id).where(_i.c.created_at < cutoff, *_SWEEPABLE).limit(batch), batch)
        if keep > 0:
            with _boundary("find functions with too many invocations"):
                async with self._read() as conn:
                    crowded = (await conn.execute(
                        sa.select(_i.c.function_id).group_by(_i.c.function_id).having(sa.func.count() > keep)
                    )).scalars().all()
            for function_id in crowded:
                deleted += await self._delete_batches(
                    sa.select(_i.c.id).where(_i.c.function_id == function_id, *_SWEEPABLE)
                    .order_by(_i.c.created_at.desc(), _i.c.id.desc()).offset(keep).limit(batch), batch)
        if deleted:
            self._usage.clear()
        return deleted

    async def _delete_batches(self, picks: sa.Select, batch: int) -> int:
        if self.dialect == "postgresql":
            picks = picks.with_for_update(skip_locked=True)
        statement = _i.delete().where(_i.c.id.in_(picks))
        total = 0
        with _boundary("delete old invocations"):
            while True:
                async with self._write_one() as conn:
                    count = (await conn.execute(statement)).rowcount
                total += count
                if count < batch:
                    return total

    async def vacuum(self) -> int:
        """Give the pages of deleted rows back to the file system (SQLite made with incremental
        auto-vacuum), a few thousand per write transaction; how many. PostgreSQL's autovacuum does its own."""
        if self.dialect != "sqlite":
            return 0
        freed = 0
        with _boundary("vacuum the database"):
            while True:
                async with self._write_one() as conn:
                    if (await conn.exec_driver_sql("PRAGMA auto_vacuum")).scalar() != SQLITE_INCREMENTAL:
                        return 0
                    free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar() or 0
                    if not free:
                        return freed
                    # Run as a script: stepped once, as execute does, the pragma frees a single page.
                    raw = await conn.get_raw_connection()
                    await raw.driver_connection.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})")
                freed += min(free, VACUUM_STEP_PAGES)

    async def tenant_usage(self, tenant: str, *, max_age_s: float = USAGE_FRESH_S) -> int:
        """Bytes the tenant's stored invocations hold (events, outputs, logs), read again when the known
        figure is older than ``max_age_s``; what this node stores meanwhile is added to it as it goes."""
        known = self._usage.get(tenant)
        if known is not None and time.monotonic() - known[1] <= max_age_s:
            return known[0]
        with _boundary("measure the tenant's stored invocations"):
            async with self._read() as conn:
                used = int(await conn.scalar(_TENANT_USAGE, {"tenant": tenant}) or 0)
        self._usage[tenant] = [used, time.monotonic()]
        return used

    def known_usage(self, tenant: str) -> int | None:
        """The tenant's bytes as last measured (plus this node's writes since), without asking the database;
        None when not measured yet."""
        known = self._usage.get(tenant)
        return None if known is None else known[0]

    async def measure_usage(self) -> dict[str, int]:
        """Measure every tenant's stored bytes at once (the retention sweep does, so ``known_usage`` stays current)."""
        with _boundary("measure stored invocations"):
            async with self._read() as conn:
                rows = (await conn.execute(
                    sa.select(_i.c.tenant, sa.func.sum(_STORED_BYTES)).group_by(_i.c.tenant))).all()
        now = time.monotonic()
        self._usage = {tenant: [int(used or 0), now] for tenant, used in rows}
        return {tenant: known[0] for tenant, known in self._usage.items()}

    def _count_usage(self, tenant: str, size: int) -> None:
        known = self._usage.get(tenant)
        if known is not None:
            known[0] += size

    # ------------------------------------------------------------ API keys

    async def create_api_key(self, *, tenant: str, name: str, key_hash: str, admin: bool = False,
                             prefix: str = "") -> ApiKeyRecord:
        """Store a new key by its hash and display prefix (the key itself is never stored).

        ``Conflict`` if the hash exists.
        """
        record = ApiKeyRecord(id=_new_id(), tenant=tenant, name=name, key_hash=key_hash, created_at=utcnow(),
                              admin=admin, prefix=prefix)
        with _boundary(f"create API key {name!r}"):
            async with self._write() as conn:
                try:
                    await conn.execute(
                        _k.insert(),
                        {"id": record.id, "tenant": tenant, "name": name, "key_hash": key_hash,
                         "created_at": record.created_at, "revoked_at": None, "admin": admin, "prefix": prefix},
                    )
                except sa_exc.IntegrityError as exc:
                    if _integrity_kind(exc) == "unique":
                        raise Conflict("an API key with this hash already exists") from None
                    raise
        return record

    async def get_api_key_by_hash(self, key_hash: str) -> ApiKeyRecord:
        """The live key with this hash. ``NotFound`` if there is none or it was revoked."""
        with _boundary("look up an API key"):
            async with self._read() as conn:
                row = (await conn.execute(
                    sa.select(_k).where(_k.c.key_hash == key_hash, _k.c.revoked_at.is_(None))
                )).first()
        if row is None:
            raise NotFound("no such API key")
        return _api_key(row)

    async def get_api_key(self, id: str) -> ApiKeyRecord:  # noqa: A002
        """One key by id, revoked or not. ``NotFound``."""
        with _boundary(f"get API key {id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(sa.select(_k).where(_k.c.id == id))).first()
        if row is None:
            raise NotFound(f"API key {id!r} not found")
        return _api_key(row)

    async def list_api_keys(self, *, tenant: str | None = None, admin: bool | None = None, live: bool = False,
                            limit: int | None = None) -> list[ApiKeyRecord]:
        """Keys oldest first: of one tenant or all, admin or not or both, revoked ones unless ``live``."""
        query = sa.select(_k).order_by(_k.c.created_at, _k.c.id)
        if tenant is not None:
            query = query.where(_k.c.tenant == tenant)
        if admin is not None:
            query = query.where(_k.c.admin == admin)
        if live:
            query = query.where(_k.c.revoked_at.is_(None))
        if limit is not None:
            query = query.limit(limit)
        with _boundary("list API keys"):
            async with self._read() as conn:
                rows = (await conn.execute(query)).all()
        return [_api_key(row) for row in rows]

    async def revoke_api_key(self, id: str) -> ApiKeyRecord:  # noqa: A002
        """Revoke a key (revoking twice keeps the first time). Returns it. ``NotFound``."""
        with _boundary(f"revoke API key {id!r}"):
            async with self._write() as conn:
                await conn.execute(
                    _k.update().where(_k.c.id == id, _k.c.revoked_at.is_(None)).values(revoked_at=utcnow())
                )
                row = (await conn.execute(sa.select(_k).where(_k.c.id == id))).first()
        if row is None:
            raise NotFound(f"API key {id!r} not found")
        return _api_key(row)


def _version_row(record: FunctionRecord) -> dict[str, Any]:
    """The function_versions row of a record's latest version."""
    return {
        "id": record.version_id, "function_id": record.id, "version": record.version, "runtime": record.runtime,
        "handler": record.handler, "env": record.env, "memory_mb": record.memory_mb,
        "timeout_s": record.timeout_s, "concurrency": record.concurrency, "code_sha256": record.code_sha256,
        "code_size": record.code_size, "code_kind": record.code_kind, "created_at": record.updated_at,
        "artifact_sha256": record.artifact_sha256, "max_retries": record.max_retries,
        "layer_sha256": record.layer_sha256,
    }
