"""The database layer: the only module that talks to SQLAlchemy's engines and the drivers under them.

URLs, engines, SQLite's pragmas, WAL and incremental auto-vacuum, the migrations, and the three ways the
verb modules reach the database (``_read``, ``_write``, ``_write_one``). How the two backends are kept honest:

- **Writes on SQLite** are serialised in-process by an ``asyncio.Lock``. A transaction of several
  statements starts with ``BEGIN IMMEDIATE``, so it never has to upgrade a read lock to a write lock
  halfway (which SQLite refuses with "database is locked" no matter the busy timeout); a lone statement
  runs in autocommit mode, atomic by itself. Another process, or another ``Store`` on the same file,
  waits out ``busy_timeout``. WAL mode lets readers run beside the one writer.
- **Round trips** are what a call costs (each one a hop to aiosqlite's thread, or a packet to
  PostgreSQL), so reads and lone write statements open no transaction.
- **Writes on PostgreSQL** run concurrently from a pool; rows that must not change under a transaction
  are locked explicitly (``FOR UPDATE``, ``FOR KEY SHARE``) by the statements that need it.
- **Errors** from SQLAlchemy and the drivers never leave the store raw: a name taken becomes
  ``Conflict``, a missing row ``NotFound``, anything else ``StoreError`` with what was being done
  (``boundary``).
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from nimbus.errors import NimbusError, StoreError
from nimbus.home import private_file

log = logging.getLogger("nimbus.store")

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for another process's transaction
SQLITE_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
VACUUM_STEP_PAGES = 2048  # pages given back per write transaction: other writers get the lock in between
PG_POOL_SIZE = 10
PG_MAX_OVERFLOW = 10
# pg_advisory_xact_lock key held while migrating, so nodes starting together migrate one at a time.
PG_MIGRATION_LOCK = 0x4E494D42  # "NIMB"
ERROR_DETAIL_MAX = 500

# Execution option that makes the SQLite "begin" hook emit BEGIN IMMEDIATE (readers emit no BEGIN).
_WRITE_OPTION = "nimbus_write"


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
        # A batch of rows (the write-behind flush) goes out as multi-row INSERT statements, not as
        # executemany: sqlite3's executemany takes the GIL back after every row, and with the event loop
        # busy each take may wait the switch interval (5 ms). Under load at c=32 the flushes fell behind
        # the calls until the backlog reached its bound (the p99.9; see writebehind.py).
        engine.dialect.use_insertmanyvalues_wo_returning = True
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


def upsert_for(dialect: str) -> Callable[..., Any]:
    """The dialect's own INSERT: the one with ``on_conflict_do_nothing``."""
    return sqlite.insert if dialect == "sqlite" else postgresql.insert


# ---------------------------------------------------------------- errors at the boundary


@contextlib.contextmanager
def boundary(action: str) -> Iterator[None]:
    """Let Nimbus's own errors through; turn database and connection errors into ``StoreError``."""
    try:
        yield
    except NimbusError:
        raise
    except (sa_exc.SQLAlchemyError, OSError) as exc:
        raise StoreError(f"could not {action}: {describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    # The driver's own message, without the SQL and parameters SQLAlchemy adds (they may hold code or events).
    orig = getattr(exc, "orig", None)
    cause = orig if orig is not None else exc
    text = f"{type(cause).__name__}: {cause}".strip()
    text = " ".join(text.split())
    return text if len(text) <= ERROR_DETAIL_MAX else text[: ERROR_DETAIL_MAX - 1] + "…"


def integrity_kind(exc: sa_exc.IntegrityError) -> str:
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

# ---------------------------------------------------------------- the connection helpers


class Database:
    """One engine, opened, configured and migrated, and the connection helpers every verb goes through.

    The store's verbs (``nimbus.store.Store``) are subclasses of this; nothing outside this module sees
    an engine.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.dialect: str = engine.dialect.name
        """``sqlite`` or ``postgresql``."""
        self._upsert = upsert_for(self.dialect)
        if self.dialect == "sqlite":
            self._autocommit = engine  # emits no BEGIN: see _configure_sqlite
            self._writer = engine.execution_options(**{_WRITE_OPTION: True})
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
        else:
            self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            self._writer = engine
            self._write_lock = None

    @classmethod
    async def _open(cls, url: str | URL, **options: Any) -> Self:
        """Connect to ``url`` and apply any migrations it lacks (creating the SQLite file and its folder);
        ``options`` go to the constructor."""
        target = normalise_url(url)
        shown = target.render_as_string(hide_password=True)
        with boundary(f"open the database {shown}"):
            engine = _create_engine(target)
        database = cls(engine, **options)
        try:
            if database.dialect == "sqlite":
                await database._use_incremental_vacuum(shown)
                await database._use_wal(shown)
            await database._migrate(shown)
        except BaseException:
            await engine.dispose()
            raise
        return database

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._engine.url.render_as_string(hide_password=True)}>"

    def _driver_dsn(self) -> str:
        """The URL as the bare driver takes it (the change listener's own asyncpg connection)."""
        return self._engine.url.set(drivername=self._engine.url.get_backend_name()).render_as_string(
            hide_password=False)

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            async with self._read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except (sa_exc.SQLAlchemyError, OSError) as exc:
            log.warning("store ping failed: %s", describe(exc))
            return False
        return True

    async def _use_incremental_vacuum(self, shown: str) -> None:
        """A new SQLite file gives pages freed by deletes back to the file system (``vacuum``), so it
        shrinks after a retention sweep. The mode can only be chosen before the first table exists: a
        file made by an older Nimbus keeps reusing its free pages without shrinking (until a ``VACUUM``)."""
        with boundary(f"open the database {shown}"):
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
        with boundary(f"open the database {shown}"):
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

        with boundary(f"open the database {shown}"):
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

    def _read(self) -> contextlib.AbstractAsyncContextManager[AsyncConnection]:
        """A connection for reading; each statement sees the latest committed data."""
        return self._autocommit.connect()

    async def vacuum(self) -> int:
        """Give the pages of deleted rows back to the file system (SQLite made with incremental
        auto-vacuum), a few thousand per write transaction; how many. PostgreSQL's autovacuum does its own."""
        if self.dialect != "sqlite":
            return 0
        freed = 0
        with boundary("vacuum the database"):
            while True:
                async with self._write_one() as conn:
                    if (await conn.exec_driver_sql("PRAGMA auto_vacuum")).scalar() != SQLITE_INCREMENTAL:
                        return 0
                    free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar() or 0
                    if not free:
                        return freed
                    # Run as a script: stepped once, as execute does, the pragma frees a single page.
                    raw = (await conn.get_raw_connection()).driver_connection
                    assert raw is not None  # a checked-out connection always has its driver's
                    await raw.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})")
                freed += min(free, VACUUM_STEP_PAGES)
