"""The retention sweep: what the store keeps of finished invocations is bounded by age and by count.

Every node runs it (``Retention.start``), every ``interval_s``: it deletes finished invocations past the
age or beyond the newest ``max_count`` of their function (never a queued or running one), gives the freed
pages back to the file system (SQLite), and measures each tenant's stored bytes for the budget checks.
Sweeps on several nodes sharing a database do not get in each other's way (``Store.sweep_invocations``).
"""

import asyncio
import contextlib
import logging

from nimbus.store import Store

log = logging.getLogger("nimbus.retention")


class Retention:
    def __init__(self, store: Store, *, max_age_s: float, max_count: int, interval_s: float) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.max_count = max_count
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="retention-sweep")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep(self) -> int:
        """One sweep; how many invocations it deleted."""
        deleted = await self.store.sweep_invocations(max_age_s=self.max_age_s, keep=self.max_count)
        if deleted:
            pages = await self.store.vacuum()
            log.info("retention: deleted %d finished invocations%s", deleted,
                     f", gave {pages} pages back to the file system" if pages else "")
        await self.store.measure_usage()
        return deleted

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # a database that fails now may answer at the next sweep
                log.exception("the retention sweep failed; trying again in %g s", self.interval_s)
            await asyncio.sleep(self.interval_s)
