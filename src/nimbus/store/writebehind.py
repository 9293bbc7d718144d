"""Write-behind and group commit of invocation rows: how recording every call stays off the hot path.

- **Group commit** (``InsertBatcher``, behind ``insert_invocation``): rows arriving while a write is in
  flight are committed together in the next transaction, each caller still waiting for its own row.
- **Finished sync invocations are written behind** (``WriteBehind``, behind ``record_invocation``): the
  caller already has its answer, so its row waits in memory for a few milliseconds and goes out with the
  others of that interval in one multi-row INSERT. Reads on this node see it meanwhile; ``close`` writes
  it out; a crash loses at most the last interval's (plus, while the database is failing, the unwritten
  backlog's). Async invocations and idempotent sync calls are never written behind: their rows must
  exist first.

Both only hold rows and decide when to write them; the INSERT itself is the store's (``insert_rows``).
"""

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import exc as sa_exc

from nimbus.errors import Conflict, NotFound, StoreError
from nimbus.store.database import describe, integrity_kind

log = logging.getLogger("nimbus.store")

INSERT_BATCH_MAX = 256  # invocation rows per group-committed transaction
DEFAULT_WRITE_BEHIND_MS = 5.0  # how long a finished sync invocation may wait in memory for its INSERT
WRITE_BEHIND_MAX_PENDING = 10_000  # at this backlog (a failing or slow database), callers wait until it is below
WRITE_BEHIND_RETRY_MAX_S = 1.0  # a failing flush is retried with backoff, doubling up to this
WRITE_BEHIND_CLOSE_TIMEOUT_S = 30.0  # how long close keeps retrying before it gives up on the rows (logged)

# INSERTs invocation rows in one transaction; raises SQLAlchemy's own errors.
InsertRows = Callable[[list[dict[str, Any]]], Awaitable[None]]


def _insert_error(exc: BaseException, values: dict[str, Any]) -> BaseException:
    """What ``insert_invocation`` raises for ``exc``."""
    if isinstance(exc, sa_exc.IntegrityError):
        kind = integrity_kind(exc)
        if kind == "foreign_key":
            return NotFound(f"function {values['function_name'] or values['function_id']!r} not found")
        if kind == "unique":
            return Conflict(f"invocation {values['id']!r} already exists")
    if isinstance(exc, (sa_exc.SQLAlchemyError, OSError)):
        return StoreError(f"could not record invocation {values['id']!r}: {describe(exc)}")
    return exc


class InsertBatcher:
    """Group commit for ``insert_invocation``: calls that arrive while a write is in flight go together
    in the next transaction, one multi-row INSERT, so recording every call does not cap the node at one
    transaction per call. Each caller still returns only once its own row is committed, and still gets
    its own error: a batch that fails is retried row by row to find out whose row it was.
    """

    def __init__(self, insert_rows: InsertRows) -> None:
        self._insert_rows = insert_rows
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
            await self._insert_rows([values for values, _ in batch])
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


class WriteBehind:
    """Write-behind of finished sync invocations: ``put`` keeps the row and returns at once; a flusher
    task commits what is pending every ``interval_s``, or as soon as ``max_rows`` are pending, as one
    multi-row INSERT in one transaction.

    Why: the caller of a sync call already has its answer, so making it wait for its own commit (or
    paying one transaction per call) only costs latency and caps throughput. Rows stay readable here
    until committed (``get``, ``of_function``), so this node reads its own writes. A flush that fails
    is retried with backoff and logged; the rows stay pending meanwhile. A row is dropped only when the
    database refuses it for good (its function was deleted, or the id is stored already), with a log line.
    """

    def __init__(self, insert_rows: InsertRows, interval_s: float, max_rows: int) -> None:
        self._insert_rows = insert_rows
        self.interval_s = interval_s
        self.max_rows = max_rows
        self._pending: dict[str, dict[str, Any]] = {}  # id → row, oldest first
        self._inflight: dict[str, dict[str, Any]] = {}  # in a flush not yet committed
        self._wake = asyncio.Event()  # flush before the interval is up: enough rows, or flush() asked
        self._hurry = 0  # flush() calls waiting: skip the interval until they are done
        self._flushed = asyncio.Event()  # set after each write attempt, for wait_below()
        self._oldest = 0.0  # loop time the first row put into an empty buffer came (rows put since are newer)
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Rows not committed yet."""
        return len(self._pending) + len(self._inflight)

    def put(self, values: dict[str, Any]) -> None:
        if not self._pending:
            self._oldest = asyncio.get_running_loop().time()
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

    async def wait_below(self, limit: int) -> None:
        """Return once fewer than ``limit`` rows are unwritten: a caller over the bound waits for the
        flushes that make room, not for the whole backlog to drain while others keep adding to it."""
        while self.backlog >= limit:
            if self._task is None:
                self._task = asyncio.create_task(self._run(), name="nimbus-store-write-behind")
            self._wake.set()
            self._flushed.clear()
            await self._flushed.wait()

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
                    # Until the oldest row has waited the interval: rows that came during a slow flush
                    # are written at once, not after another interval of doing nothing.
                    due = self._oldest + self.interval_s - asyncio.get_running_loop().time()
                    if due > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), due)
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
                await self._insert_rows(list(batch.values()))
                left.clear()
            except sa_exc.IntegrityError:
                # One row or more is refused for good: find which, one transaction per row, keep the rest.
                for id_, values in batch.items():
                    try:
                        await self._insert_rows([values])
                    except sa_exc.IntegrityError as exc:
                        log.warning("not recording sync invocation %s: %s", id_, _insert_error(exc, values))
                    del left[id_]
            return True
        except Exception as exc:
            log.error("could not write %d finished sync invocations (%s); they stay pending and are retried",
                      len(left), describe(exc))
            return False
        finally:
            # Back in front of the newer rows, in one step with leaving _inflight: always readable.
            self._pending = {**left, **self._pending}
            for id_ in batch:
                self._inflight.pop(id_, None)
            self._flushed.set()
