"""Metadata storage: SQLAlchemy Core tables, one ``Store``, Alembic migrations, on SQLite or PostgreSQL.

``Store`` is the only way in; the records it returns are plain dataclasses::

    store = await Store.open("sqlite:///.nimbus/nimbus.db")   # or postgresql://…; migrates on open
    fn = await store.get_function("hello")
    await store.close()

The package, top-down (docs/architecture.md has the long story):

- ``database``: URLs, engines, pragmas, migrations and the connection helpers; the only module that
  talks to the driver.
- ``statements``: the queries, built once, and what their rows become.
- ``writebehind``: group commit and write-behind of invocation rows.
- the verbs, one module per concern: ``functions``, ``versions`` (published versions, aliases, the
  qualified look-up), ``builds`` (and layers, garbage, artifacts),
  ``invocations`` (and retention, usage), ``queue`` (claims, leases, retries, callbacks), ``keys``.
- ``tables``, ``records``, ``retention`` and ``migrations``: the schema, the dataclasses, the sweep
  loop and the schema's history.

Why ``Store`` is composed of mixins rather than of objects it delegates to: every verb group shares
one state (the engine, SQLite's write lock, the write-behind buffer, the function cache, the usage
figures), and a few verbs reach across groups (deleting a function drops its unwritten rows; recording
an invocation counts its bytes). As ``Database`` subclasses the groups share that state as they did in
one class, with no forwarding layer of ~45 one-line methods to keep in step; each module still holds one
concern, and the state each group relies on is declared at the top of its class.
"""

import asyncio
import logging
from typing import Self

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from nimbus.store.activity import ActivityMixin
from nimbus.store.builds import BuildsMixin
from nimbus.store.changes import ChangesMixin
from nimbus.store.functions import FUNCTION_CACHE_MAX, FUNCTION_CACHE_S
from nimbus.store.insights import InsightsMixin
from nimbus.store.invocations import InvocationsMixin
from nimbus.store.keys import KeysMixin
from nimbus.store.lookups import LookupCache
from nimbus.store.nodes import NodesMixin
from nimbus.store.queue import QueueMixin
from nimbus.store.records import (
    AliasRecord,
    ApiKeyRecord,
    BuildRecord,
    FunctionRecord,
    InvocationRecord,
    NodeRecord,
    VersionRecord,
)
from nimbus.store.schedules import SchedulesMixin
from nimbus.store.sessions import SessionsMixin
from nimbus.store.urls import UrlsMixin
from nimbus.store.versions import VersionsMixin
from nimbus.store.writebehind import (
    DEFAULT_WRITE_BEHIND_MS,
    INSERT_BATCH_MAX,
    WRITE_BEHIND_CLOSE_TIMEOUT_S,
    InsertBatcher,
    WriteBehind,
)

log = logging.getLogger("nimbus.store")

__all__ = ["AliasRecord", "ApiKeyRecord", "BuildRecord", "FunctionRecord", "InvocationRecord", "NodeRecord", "Store",
           "VersionRecord"]


class Store(VersionsMixin, BuildsMixin, InvocationsMixin, QueueMixin, KeysMixin, UrlsMixin, SchedulesMixin,
            NodesMixin, SessionsMixin, InsightsMixin, ActivityMixin, ChangesMixin):
    """Functions, their versions and code, the build cache, invocations and API keys, in SQLite or PostgreSQL.

    Open one with ``await Store.open(url)``, which also brings the schema up to date; ``await store.close()``
    when done. Every method is a coroutine and safe to call from many tasks of one event loop at once.
    """

    def __init__(self, engine: AsyncEngine, *, write_behind_ms: float = DEFAULT_WRITE_BEHIND_MS,
                 write_behind_rows: int = INSERT_BATCH_MAX, function_cache_s: float = FUNCTION_CACHE_S,
                 notify: bool = True) -> None:
        """Wrap an engine made by ``Store.open``; use that instead, it migrates and configures SQLite."""
        super().__init__(engine)
        self._functions = LookupCache(function_cache_s, FUNCTION_CACHE_MAX)
        self._init_changes(notify)
        self._usage = {}
        self._inserts = InsertBatcher(self._insert_rows)
        # None: write-through (NIMBUS_WRITE_BEHIND_MS=0), and after close.
        self._behind = (WriteBehind(self._insert_rows, write_behind_ms / 1000, write_behind_rows)
                        if write_behind_ms > 0 else None)

    @classmethod
    async def open(cls, url: str | URL, *, function_cache_s: float = FUNCTION_CACHE_S,
                   write_behind_ms: float = DEFAULT_WRITE_BEHIND_MS,
                   write_behind_rows: int = INSERT_BATCH_MAX, notify: bool = True) -> Self:
        """Connect to ``url`` and apply any migrations it lacks (creating the SQLite file and its folder).

        ``write_behind_ms``: how long ``record_invocation`` may keep a finished sync invocation in memory
        before writing it (0: write it before returning); ``write_behind_rows``: at most this many rows
        per flush, and a flush starts at once when they are pending. ``notify``: on PostgreSQL, announce
        changes and new async work to the other nodes (``store.changes``).
        """
        return await cls._open(url, function_cache_s=function_cache_s, write_behind_ms=write_behind_ms,
                                  write_behind_rows=write_behind_rows, notify=notify)

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
            await self._close_changes()
        finally:
            await super().close()

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
