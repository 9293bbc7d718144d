"""The tick loop: one task per node that turns due schedule ticks into queued async invocations.

Every node runs one; they race for each tick through ``Store.claim_tick``, which lets exactly one win.
The clock is injectable (a callable returning an aware UTC datetime) so tests can run hundreds of
one-minute ticks in seconds without a seconds grammar EventBridge does not have.
"""

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

import orjson

from nimbus.errors import NimbusError, NotFound
from nimbus.store.records import InvocationRecord, utcnow
from nimbus.store.schedules import ScheduleRecord
from nimbus.store.statements import new_id
from nimbus.triggers.expressions import parse, scheduled_event

log = logging.getLogger("nimbus.triggers")
DEFAULT_POLL_S = 1.0
DUE_BATCH = 100


class TickLoop:
    """Poll the store for due schedules every ``poll_s`` and fire each one's latest due tick."""

    def __init__(self, store, *, region: str, account_id: str, poll_s: float = DEFAULT_POLL_S,
                 clock: Callable[[], datetime] = utcnow, on_fire: Callable[[], None] | None = None) -> None:
        self.store = store
        self.region = region
        self.account_id = account_id
        self.poll_s = poll_s
        self.clock = clock
        self.on_fire = on_fire  # e.g. wake this node's async worker
        self.fired = 0
        self.lost = 0  # ticks another node claimed first
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nimbus-schedule-ticks")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failing database must not end the loop: try again next poll
                log.exception("schedule tick failed")
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> int:
        """Fire every schedule due now; how many ticks this node won."""
        now = self.clock()
        won = 0
        for schedule in await self.store.due_schedules(now, limit=DUE_BATCH):
            if await self._fire(schedule, now):
                won += 1
        self.fired += won
        if won and self.on_fire is not None:
            self.on_fire()
        return won

    async def _fire(self, schedule: ScheduleRecord, now: datetime) -> bool:
        assert schedule.next_fire_at is not None
        try:
            expression = parse(schedule.expression)
        except NimbusError:  # stored before a grammar change: never fire it, say so once per poll
            log.warning("schedule %r of %r has an invalid expression %r", schedule.name, schedule.function_name,
                        schedule.expression)
            return False
        fire_time = expression.latest_due(schedule.next_fire_at, now)
        following = expression.next_after(fire_time)
        invocation = await self._invocation(schedule, fire_time)
        if await self.store.claim_tick(schedule, fire_time, following, invocation):
            return True
        self.lost += 1
        return False

    async def _invocation(self, schedule: ScheduleRecord, fire_time: datetime) -> InvocationRecord | None:
        try:
            fn, executed_version = await self.store.lookup_qualified(schedule.function_id, schedule.tenant,
                                                                     schedule.qualifier)
        except NotFound:  # its alias or version was deleted: the tick passes without a call
            log.warning("schedule %r of %r: %r names nothing now; tick skipped", schedule.name,
                        schedule.function_name, schedule.qualifier)
            return None
        if schedule.input is not None:
            event = schedule.input.encode()
        else:
            event = orjson.dumps(scheduled_event(fire_time=fire_time, function_name=schedule.function_name,
                                                 schedule_name=schedule.name, region=self.region,
                                                 account_id=self.account_id))
        return InvocationRecord(
            id=new_id(), function_id=fn.id, function_name=fn.name, tenant=fn.tenant, version=fn.version,
            version_id=fn.version_id, mode="async", status="queued", event=event, created_at=utcnow(),
            executed_version=executed_version, trigger="schedule",
        )
