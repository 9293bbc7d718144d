"""Changes announced to every node sharing the database: PostgreSQL ``LISTEN/NOTIFY``.

A node that changes a function, a version, an alias, a URL or a key clears its own look-up caches at once
and, on PostgreSQL, sends a notification after the write has committed; every other node's ``Listener``
hands it to the node (``nimbus.cluster.changes``), which clears its caches, retires machines and forgets
revoked keys. New async work is announced too, so idle workers elsewhere claim it at once rather than at
their next poll. Notifications are a shortcut, not the truth: one lost (a listener reconnecting, a node
that crashed between commit and notify) costs at most the caches' ``function_cache_s`` and the workers'
``async_poll_s``, as on SQLite, where there are none. A listener that reconnects reports ``resync``, since
it may have missed some.

Payloads are small JSON objects: ``k`` (the kind), ``o`` (the sending store, so a node ignores its own)
and the kind's fields. Only nodes holding the database's credentials can send them.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import orjson
import sqlalchemy as sa

from nimbus.store.database import Database, describe
from nimbus.store.lookups import LookupCache

log = logging.getLogger("nimbus.store")

CHANNEL = "nimbus_changes"
RECONNECT_MAX_S = 5.0
KEEPALIVE_S = 5.0  # how often an idle listening connection is checked: a dead TCP peer says nothing
CONNECT_TIMEOUT_S = 10.0


class ChangesMixin(Database):
    """Announcing changes: local caches first, then (PostgreSQL) one NOTIFY."""

    _functions: LookupCache  # store.functions

    def _init_changes(self, notify: bool) -> None:
        self.origin = os.urandom(8).hex()
        """Which store sent a notification: its own come back to it, and are ignored."""
        self._notifying = notify and self.dialect == "postgresql"
        self._work_task: asyncio.Task | None = None
        self._work_again = False

    def clear_caches(self) -> None:
        """Forget every cached look-up: the next call reads the store (mixins with caches of their own add theirs)."""
        self._functions.clear()

    async def _announce(self, kind: str, **fields: object) -> None:
        """This node saw a change it made: clear the caches, tell the other nodes. Never raises: a lost
        notification only delays the others until their caches expire."""
        self.clear_caches()
        if self._notifying:
            await self._notify(kind, fields)

    def _announce_work(self) -> None:
        """Async work became claimable: wake the other nodes' workers. Notifications asked for while one is
        being sent are merged into one more, so a burst of async calls costs two round trips, not one each."""
        if not self._notifying:
            return
        self._work_again = True
        if self._work_task is None:
            self._work_task = asyncio.create_task(self._send_work(), name="notify-work")

    async def _send_work(self) -> None:
        try:
            while self._work_again:
                self._work_again = False
                await self._notify("work", {})
        finally:
            self._work_task = None

    async def _notify(self, kind: str, fields: dict) -> None:
        payload = orjson.dumps({"k": kind, "o": self.origin, **fields}).decode()
        try:
            async with self._write_one() as conn:
                await conn.execute(sa.select(sa.func.pg_notify(CHANNEL, payload)))
        except Exception as exc:
            log.warning("could not tell other nodes of a change (%s): %s", kind, describe(exc))

    async def _close_changes(self) -> None:
        task = self._work_task
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    def listener(self, handler: Callable[[dict], None]) -> "Listener | None":
        """A listener handing every other node's notifications to ``handler``, after this store has dropped
        its cached look-ups for any but ``work`` (None on SQLite or when notifications are off). Start it
        with ``start()``; ``close()`` it before the store."""
        if not self._notifying:
            return None

        def received(change: dict) -> None:
            if change.get("k") != "work":
                self.clear_caches()
            handler(change)

        return Listener(self._driver_dsn(), self.origin, received)


class Listener:
    """One connection of its own LISTENing on the channel, reconnected with back-off when it drops."""

    def __init__(self, dsn: str, origin: str, handler: Callable[[dict], None]) -> None:
        self._dsn = dsn
        self._origin = origin
        self._handler = handler
        self._task: asyncio.Task | None = None
        self.listening = asyncio.Event()
        """Set while the connection listens (tests and start-up wait for it)."""

    async def start(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Start listening; waits up to ``timeout`` for the first connection (then goes on retrying)."""
        self._task = asyncio.create_task(self._run(), name="listen-changes")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.listening.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _received(self, _conn, _pid, _channel, payload: str) -> None:
        try:
            change = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(change, dict) and change.get("o") != self._origin:
            self._deliver(change)

    def _deliver(self, change: dict) -> None:
        try:
            self._handler(change)
        except Exception:
            log.exception("applying a change from another node failed: %r", change)

    async def _run(self) -> None:
        import asyncpg

        delay = 0.25
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._received)
                self.listening.set()
                self._deliver({"k": "resync"})  # whatever was sent while nobody listened is unknown
                delay = 0.25
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(KEEPALIVE_S):
                            await lost.wait()
                    if not lost.is_set():
                        async with asyncio.timeout(KEEPALIVE_S):
                            await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listening for other nodes' changes failed (%s); retrying in %.2g s",
                            describe(exc), delay)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
