"""Invocations as records: insert (group-committed), record (written behind), idempotency, finish, read,
list; and what bounds them: the retention sweep and each tenant's stored bytes.

The async queue's verbs (claims, leases, retries) are in ``nimbus.store.queue``.
"""

import time
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from nimbus.errors import Conflict, NotFound
from nimbus.store import tables
from nimbus.store.changes import ChangesMixin
from nimbus.store.database import boundary
from nimbus.store.records import (
    DEFAULT_TENANT,
    FINISHED_STATUSES,
    InvocationRecord,
    utcnow,
)
from nimbus.store.statements import (
    BY_IDEMPOTENCY_KEY,
    DEFAULT_LIST_LIMIT,
    FENCED_UPDATE,
    GET_INVOCATION,
    INSERT_INVOCATION,
    INVOCATION_FIELDS,
    LIST_BY_IDS,
    LIST_INVOCATIONS,
    LIST_SIZES,
    STORED_BYTES,
    SWEEPABLE,
    TENANT_USAGE,
    UPDATE_INVOCATION,
    as_invocation,
)
from nimbus.store.writebehind import (
    WRITE_BEHIND_MAX_PENDING,
    InsertBatcher,
    WriteBehind,
)

SWEEP_BATCH = 500  # invocation rows deleted per write transaction by the retention sweep
USAGE_FRESH_S = 5.0  # how old a tenant's measured bytes may be when an async call is checked against them

_i = tables.invocations


def _size(*values: bytes | str | None) -> int:
    """Bytes (characters, for text) of what an invocation row keeps, as ``STORED_BYTES`` counts them."""
    return sum(len(value) for value in values if value)


class InvocationsMixin(ChangesMixin):
    """Invocation records, their retention and the tenants' stored bytes."""

    _inserts: InsertBatcher
    _behind: WriteBehind | None  # None: write-through
    _usage: dict[str, list]  # tenant -> [stored bytes, when measured (monotonic)]

    async def _insert_rows(self, rows: list[dict[str, Any]]) -> None:
        """INSERT invocation rows in one transaction (one executemany); raw SQLAlchemy errors."""
        if len(rows) == 1:
            async with self._write_one() as conn:
                await conn.execute(INSERT_INVOCATION, rows[0])
        else:
            async with self._write() as conn:
                await conn.execute(INSERT_INVOCATION, rows)

    async def insert_invocation(self, inv: InvocationRecord) -> None:
        """Record an invocation as it stands (a finished sync call, or a queued async one).

        Returns once the row is committed. ``NotFound`` if its function no longer exists; ``Conflict``
        if the id is taken.
        """
        await self._inserts.insert({name: getattr(inv, name) for name in INVOCATION_FIELDS})
        self._count_usage(inv.tenant, _size(inv.event, inv.output, inv.logs))
        if inv.status == "queued":
            self._announce_work()

    async def record_invocation(self, inv: InvocationRecord) -> None:
        """Record a finished sync invocation, written behind: kept in memory and committed with the
        others of the next few milliseconds in one INSERT; readable on this node meanwhile.

        Only for rows nothing updates later (a plain sync call): async and idempotent calls must be
        in the store before they run, through ``insert_invocation``/``insert_idempotent``. Write-through
        when write-behind is off or the store is closed. A backlog at ``WRITE_BEHIND_MAX_PENDING``
        (a failing database) makes the caller wait for it, instead of growing without bound.
        """
        if inv.status not in FINISHED_STATUSES:
            raise ValueError(f"only a finished invocation is written behind, not one {inv.status!r}")
        values = {name: getattr(inv, name) for name in INVOCATION_FIELDS}
        self._count_usage(inv.tenant, _size(inv.event, inv.output, inv.logs))
        behind = self._behind
        if behind is None:
            await self._inserts.insert(values)
            return
        if behind.backlog >= WRITE_BEHIND_MAX_PENDING:
            await behind.wait_below(WRITE_BEHIND_MAX_PENDING)
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
        with boundary("look up an idempotency key"):
            async with self._read() as conn:
                row = (await conn.execute(BY_IDEMPOTENCY_KEY, {"tenant": tenant, "key": key})).first()
        return None if row is None else as_invocation(row)

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
        with boundary(f"finish invocation {id!r}"):
            if token is None:
                async with self._write_one() as conn:
                    result = await conn.execute(UPDATE_INVOCATION, {"key": id, **values})
                if result.rowcount == 0:
                    raise NotFound(f"invocation {id!r} not found")
                if tenant is not None:
                    self._count_usage(tenant, _size(output, logs))
                return True
            async with self._write_one() as conn:
                result = await conn.execute(FENCED_UPDATE.values(**values), {"key": id, "token": token})
        if result.rowcount == 1 and tenant is not None:
            self._count_usage(tenant, _size(output, logs))
        return result.rowcount == 1

    async def get_invocation(self, id: str, tenant: str = DEFAULT_TENANT) -> InvocationRecord:  # noqa: A002
        """One invocation, with its event, output and logs (written behind or committed). ``NotFound``."""
        if self._behind is not None:
            values = self._behind.get(id)
            if values is not None and values["tenant"] == tenant:
                return InvocationRecord(**values)
        with boundary(f"read invocation {id!r}"):
            async with self._read() as conn:
                row = (await conn.execute(GET_INVOCATION, {"key": id, "tenant": tenant})).first()
        if row is None:
            raise NotFound(f"invocation {id!r} not found")
        return as_invocation(row)

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
        # The unwritten rows first: one flushed while the database is read would otherwise be in neither.
        unwritten = self._behind.of_function(function_id) if self._behind is not None else []
        with boundary("list invocations"):
            async with self._read() as conn:
                if max_bytes is None:
                    rows = (await conn.execute(LIST_INVOCATIONS, {"key": function_id, "limit": limit})).all()
                else:
                    sizes = (await conn.execute(LIST_SIZES, {"key": function_id, "limit": limit})).all()
                    ids: list[str] = []
                    total = 0
                    for id_, size in sizes:
                        total += size
                        if ids and total > max_bytes:
                            truncated = True
                            break
                        ids.append(id_)
                    rows = list((await conn.execute(LIST_BY_IDS, {"ids": ids})).all()) if ids else []
                    rows.sort(key=lambda row: (row.created_at, row.id), reverse=True)
                    limit = len(ids) if truncated else limit
        listed = [as_invocation(row) for row in rows]
        return _with_unwritten(unwritten, listed, limit), truncated

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
                sa.select(_i.c.id).where(_i.c.created_at < cutoff, *SWEEPABLE).limit(batch), batch)
        if keep > 0:
            with boundary("find functions with too many invocations"):
                async with self._read() as conn:
                    crowded = (await conn.execute(
                        sa.select(_i.c.function_id).group_by(_i.c.function_id).having(sa.func.count() > keep)
                    )).scalars().all()
            for function_id in crowded:
                deleted += await self._delete_batches(
                    sa.select(_i.c.id).where(_i.c.function_id == function_id, *SWEEPABLE)
                    .order_by(_i.c.created_at.desc(), _i.c.id.desc()).offset(keep).limit(batch), batch)
        if deleted:
            self._usage.clear()
        return deleted

    async def _delete_batches(self, picks: sa.Select, batch: int) -> int:
        if self.dialect == "postgresql":
            picks = picks.with_for_update(skip_locked=True)
        statement = _i.delete().where(_i.c.id.in_(picks))
        total = 0
        with boundary("delete old invocations"):
            while True:
                async with self._write_one() as conn:
                    count = (await conn.execute(statement)).rowcount
                total += count
                if count < batch:
                    return total

    async def tenant_usage(self, tenant: str, *, max_age_s: float = USAGE_FRESH_S) -> int:
        """Bytes the tenant's stored invocations hold (events, outputs, logs), read again when the known
        figure is older than ``max_age_s``; what this node stores meanwhile is added to it as it goes."""
        known = self._usage.get(tenant)
        if known is not None and time.monotonic() - known[1] <= max_age_s:
            return known[0]
        with boundary("measure the tenant's stored invocations"):
            async with self._read() as conn:
                used = int(await conn.scalar(TENANT_USAGE, {"tenant": tenant}) or 0)
        self._usage[tenant] = [used, time.monotonic()]
        return used

    def known_usage(self, tenant: str) -> int | None:
        """The tenant's bytes as last measured (plus this node's writes since), without asking the database;
        None when not measured yet."""
        known = self._usage.get(tenant)
        return None if known is None else known[0]

    async def measure_usage(self) -> dict[str, int]:
        """Measure every tenant's stored bytes at once (the retention sweep does, so ``known_usage`` stays current)."""
        with boundary("measure stored invocations"):
            async with self._read() as conn:
                rows = (await conn.execute(
                    sa.select(_i.c.tenant, sa.func.sum(STORED_BYTES)).group_by(_i.c.tenant))).all()
        now = time.monotonic()
        self._usage = {tenant: [int(used or 0), now] for tenant, used in rows}
        return {tenant: known[0] for tenant, known in self._usage.items()}

    def _count_usage(self, tenant: str, size: int) -> None:
        known = self._usage.get(tenant)
        if known is not None:
            known[0] += size


def _with_unwritten(unwritten: list[dict], listed: list[InvocationRecord], limit: int) -> list[InvocationRecord]:
    """``listed`` with the rows that were in the write-behind buffer before the read, newest ``limit`` first."""
    if not unwritten:
        return listed
    merged = {inv.id: inv for inv in listed}  # a row committed while we read is in both
    merged.update((values["id"], InvocationRecord(**{**values, "event": None})) for values in unwritten)
    return sorted(merged.values(), key=lambda inv: (inv.created_at, inv.id), reverse=True)[: max(limit, 0)]
