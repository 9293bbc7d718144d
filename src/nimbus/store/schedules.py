"""Schedules, and the claim that makes each of their ticks fire exactly once across every node.

A due tick is claimed in one transaction that (1) INSERTs its ``schedule_ticks`` row, whose primary key
(schedule_id, fire_time) no second node can insert again, on SQLite or PostgreSQL; (2) moves the
schedule's ``next_fire_at`` on, only if it still holds the value the claimer read (a compare-and-set, so a
node that read a stale or since-disabled schedule claims nothing); (3) queues the async invocation. Either
all three happen or none. Tick rows older than ``TICK_KEEP`` are deleted in the same transaction, so the
table holds at most a day of ticks per schedule. No leader is elected anywhere.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from nimbus.errors import Conflict, NotFound
from nimbus.store import tables
from nimbus.store.changes import ChangesMixin
from nimbus.store.database import boundary, integrity_kind
from nimbus.store.records import InvocationRecord, utcnow
from nimbus.store.statements import INSERT_INVOCATION, INVOCATION_FIELDS, new_id

TICK_KEEP = timedelta(days=1)  # how long a fired tick's claim row is kept
SCHEDULES_MAX = 100  # per function

_s = tables.schedules
_t = tables.schedule_ticks
_f = tables.functions


@dataclass(slots=True, kw_only=True)
class ScheduleRecord:
    id: str
    function_id: str
    function_name: str
    tenant: str
    name: str
    qualifier: str
    expression: str
    input: str | None
    """A fixed JSON event; None: the EventBridge Scheduled Event."""
    enabled: bool
    next_fire_at: datetime | None
    created_at: datetime
    updated_at: datetime


class _Lost(Exception):
    """Another node claimed the tick first (or changed the schedule): roll the claim back."""


_SELECT = sa.select(*_s.c, _f.c.name.label("function_name")).select_from(_s.join(_f, _f.c.id == _s.c.function_id))


def _record(row: sa.Row) -> ScheduleRecord:
    return ScheduleRecord(**row._mapping)


class SchedulesMixin(ChangesMixin):
    """Schedules per function, and claiming their due ticks."""


    async def _schedule_function_id(self, conn, function: str, tenant: str) -> str:
        key = await conn.scalar(sa.select(_f.c.id).where(sa.or_(_f.c.name == function, _f.c.id == function),
                                                          _f.c.tenant == tenant))
        if key is None:
            raise NotFound(f"function {function!r} not found")
        return key

    async def create_schedule(self, function: str, tenant: str, *, name: str, qualifier: str, expression: str,
                              input: str | None, enabled: bool, next_fire_at: datetime | None) -> ScheduleRecord:  # noqa: A002
        """Add a schedule to ``function``; ``Conflict`` if it has one of this name (or too many)."""
        now = utcnow()
        with boundary(f"create schedule {name!r}"):
            try:
                async with self._write() as conn:
                    function_id = await self._schedule_function_id(conn, function, tenant)
                    count = await conn.scalar(sa.select(sa.func.count()).where(_s.c.function_id == function_id))
                    if (count or 0) >= SCHEDULES_MAX:
                        raise Conflict(f"function {function!r} has {SCHEDULES_MAX} schedules, the most it may have")
                    await conn.execute(_s.insert().values(
                        id=new_id(), function_id=function_id, tenant=tenant, name=name, qualifier=qualifier,
                        expression=expression, input=input, enabled=enabled, next_fire_at=next_fire_at,
                        created_at=now, updated_at=now))
            except sa_exc.IntegrityError as exc:
                if integrity_kind(exc) == "unique":
                    raise Conflict(f"function {function!r} already has a schedule named {name!r}") from None
                raise
        return await self.get_schedule(function, tenant, name)

    async def get_schedule(self, function: str, tenant: str, name: str) -> ScheduleRecord:
        with boundary(f"read schedule {name!r}"):
            async with self._read() as conn:
                function_id = await self._schedule_function_id(conn, function, tenant)
                row = (await conn.execute(_SELECT.where(_s.c.function_id == function_id, _s.c.name == name))).first()
        if row is None:
            raise NotFound(f"function {function!r} has no schedule named {name!r}")
        return _record(row)

    async def list_schedules(self, function: str, tenant: str) -> list[ScheduleRecord]:
        with boundary(f"list the schedules of {function!r}"):
            async with self._read() as conn:
                function_id = await self._schedule_function_id(conn, function, tenant)
                rows = (await conn.execute(_SELECT.where(_s.c.function_id == function_id).order_by(_s.c.name))).all()
        return [_record(row) for row in rows]

    async def update_schedule(self, function: str, tenant: str, name: str, **values) -> ScheduleRecord:
        """Change some of ``qualifier``, ``expression``, ``input``, ``enabled``, ``next_fire_at``."""
        with boundary(f"update schedule {name!r}"):
            async with self._write() as conn:
                function_id = await self._schedule_function_id(conn, function, tenant)
                result = await conn.execute(_s.update().where(_s.c.function_id == function_id, _s.c.name == name)
                                            .values(**values, updated_at=utcnow()))
                if result.rowcount != 1:
                    raise NotFound(f"function {function!r} has no schedule named {name!r}")
        return await self.get_schedule(function, tenant, name)

    async def delete_schedule(self, function: str, tenant: str, name: str) -> None:
        with boundary(f"delete schedule {name!r}"):
            async with self._write() as conn:
                function_id = await self._schedule_function_id(conn, function, tenant)
                result = await conn.execute(_s.delete().where(_s.c.function_id == function_id, _s.c.name == name))
                if result.rowcount != 1:
                    raise NotFound(f"function {function!r} has no schedule named {name!r}")

    async def due_schedules(self, now: datetime, *, limit: int = 100) -> list[ScheduleRecord]:
        """Enabled schedules whose next tick is at or before ``now``, the most overdue first."""
        statement = (_SELECT.where(_s.c.enabled.is_(True), _s.c.next_fire_at <= now)
                     .order_by(_s.c.next_fire_at).limit(limit))
        with boundary("read due schedules"):
            async with self._read() as conn:
                rows = (await conn.execute(statement)).all()
        return [_record(row) for row in rows]

    async def claim_tick(self, schedule: ScheduleRecord, fire_time: datetime, next_fire_at: datetime | None,
                         invocation: InvocationRecord | None) -> bool:
        """Fire ``schedule``'s tick at ``fire_time`` once: whether this caller won it (module docstring).

        ``schedule`` is as the caller read it; its ``next_fire_at`` must still be in the database.
        ``invocation``: the queued async call to record (None: advance without running anything).
        """
        now = utcnow()
        insert_tick = self._upsert(_t).values(
            schedule_id=schedule.id, fire_time=fire_time, created_at=now,
            invocation_id=invocation.id if invocation is not None else None,
        ).on_conflict_do_nothing()
        advance = (_s.update().where(_s.c.id == schedule.id, _s.c.enabled.is_(True),
                                     _s.c.next_fire_at == schedule.next_fire_at)
                   .values(next_fire_at=next_fire_at))
        try:
            with boundary(f"fire schedule {schedule.name!r}"):
                async with self._write() as conn:
                    if (await conn.execute(insert_tick)).rowcount != 1:
                        raise _Lost
                    if (await conn.execute(advance)).rowcount != 1:
                        raise _Lost
                    if invocation is not None:
                        await conn.execute(INSERT_INVOCATION, {f: getattr(invocation, f) for f in INVOCATION_FIELDS})
                    await conn.execute(_t.delete().where(_t.c.schedule_id == schedule.id,
                                                         _t.c.fire_time < fire_time - TICK_KEEP))
        except _Lost:
            return False
        if invocation is not None:
            self._announce_work()
        return True

    async def count_ticks(self, schedule_id: str) -> int:
        """Claim rows kept for a schedule (at most ``TICK_KEEP`` of ticks)."""
        with boundary("count ticks"):
            async with self._read() as conn:
                return await conn.scalar(sa.select(sa.func.count()).where(_t.c.schedule_id == schedule_id)) or 0
