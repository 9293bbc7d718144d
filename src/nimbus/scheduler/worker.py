"""The async worker: claims queued invocations, keeps their leases, runs, retries and finishes them.

Async invocations reach a machine only through ``claim_async``: a restart (or another node on
PostgreSQL) finds them in the store. A claim takes no more of a function's calls than the function can
start now on this node (its concurrency less the calls of it this node already runs or holds), and
takes tenants and functions in turn: a backlog of one function holds neither worker slots nor anyone
else's calls. A call that ends wakes the dispatcher, so a function's backlog still runs back to back.
Durability rules:

- A claim is a lease whose token (``"<node id>:<nonce>"``, new with every claim) fences every later
  write of that attempt; it is renewed while the call waits and runs. A task whose lease was lost (or
  could not be renewed in time) is cancelled, killing its machine: an invocation never runs on two
  machines at once, and a late finish never overwrites a newer attempt.
- Every unsuccessful attempt is retried, as Lambda does for async calls: function errors, timeouts, a
  machine that died, no machine to be had, and a node that crashed mid-call (its lease ran out, or it
  restarted). An attempt counts when the call reaches a machine, not when it is claimed. Up to the
  version's ``max_retries`` retries, after ``base * 2^(n-1)`` seconds of backoff (``not_before``);
  then the invocation is ``failed``, its error saying why and after how many attempts.
- Shutdown stops claiming, hands back claimed calls that have not reached a machine, lets running ones
  finish for a while, then hands back the rest.

The worker runs calls through the ``Scheduler`` that owns it: its admission counts, slots and machines
are the ones sync calls use.
"""

import asyncio
import contextlib
import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from nimbus import callbacks, protocol
from nimbus.deployment import LATEST
from nimbus.errors import NotFound, Unavailable
from nimbus.store import InvocationRecord, Store
from nimbus.store.records import utcnow as _now

if TYPE_CHECKING:
    from nimbus.scheduler.calls import Scheduler

log = logging.getLogger("nimbus.scheduler")


class _Held:
    """An async invocation this node has claimed: its lease token and whether it is going to a machine."""

    __slots__ = ("token", "started", "task")

    def __init__(self, token: str) -> None:
        self.token = token
        self.started = False
        self.task: asyncio.Task | None = None


class _LeaseLost(Exception):
    """The claim's lease no longer holds the invocation: another claim took it."""


class AsyncWorker:
    """The async half of a node's scheduler: the dispatch loop, the lease renewer and one task per claim."""

    def __init__(self, scheduler: "Scheduler", store: Store, *, node_id: str, poll_s: float, lease_s: float,
                 retry_base_s: float, callback_allow: callbacks.AllowList) -> None:
        self.scheduler = scheduler
        self.store = store
        self.node_id = node_id
        self.async_poll_s = poll_s
        self.async_lease_s = lease_s
        self.async_retry_base_s = retry_base_s
        self.callbacks = callbacks.Deliverer(store, callback_allow, node_id, poll_s=poll_s, base_s=retry_base_s)
        self._held: dict[str, _Held] = {}
        self._renewer: asyncio.Task | None = None
        self._leases_valid_until = 0.0
        # Functions the last claim found busy: a slot of theirs coming free wakes the dispatcher.
        self._capped: set[str] = set()
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._async_tasks: set[asyncio.Task] = set()

    @property
    def _closing(self) -> bool:
        return self.scheduler.closing or not self.scheduler.claiming

    async def start(self) -> None:
        released = await self.store.release_owned(self.node_id)
        if released:
            log.info("re-queued %d async invocations this node held before it stopped", released)
        await self.callbacks.start()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="async-dispatch")
        self._renewer = asyncio.create_task(self._renew_loop(), name="async-leases")
        self._wakeup.set()

    def wake(self) -> None:
        """Claim now rather than at the next poll: a call was queued."""
        self._wakeup.set()

    def freed(self, function_id: str, left: int, concurrency: int | None) -> None:
        """A call of the function is over and ``left`` of its calls remain on this node. The dispatcher is
        woken when that frees a slot the last claim could not use (``concurrency`` None: always, after an
        async call, whose function may have more queued)."""
        if concurrency is None or (function_id in self._capped and left < concurrency):
            self._capped.discard(function_id)
            self._wakeup.set()

    async def close(self, timeout: float) -> None:
        """Once the scheduler takes no more work: hand back what has not started; let running calls
        finish (up to ``timeout``), then cancel them and hand them back too, so another node or a restart
        takes them at once rather than when their leases run out.
        """
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        waiting = {id_: held for id_, held in self._held.items() if not held.started}
        await self._cancel([held.task for held in waiting.values()])
        await self._hand_back(waiting, "not started")
        running = [held.task for held in self._held.values() if held.task is not None]
        if running:
            log.info("waiting up to %g s for %d running async invocations", timeout, len(running))
            _, pending = await asyncio.wait(running, timeout=timeout)
            await self._cancel(list(pending))
        await self._hand_back(dict(self._held), "cut short by the shutdown")
        await self._cancel([self._renewer])
        await self.callbacks.close()
        try:
            await self.store.release_owned(self.node_id)  # whatever is left: deliveries cut short
        except Exception:
            log.exception("could not hand back this node's leases; they will run out instead")

    async def _hand_back(self, leases: dict[str, "_Held"], why: str) -> None:
        for id_ in leases:
            self._held.pop(id_, None)
        if not leases:
            return
        try:
            count = await self.store.release({id_: held.token for id_, held in leases.items()})
            log.info("handed back %d async invocations (%s)", count, why)
        except Exception:
            log.exception("could not hand back %d async invocations; their leases will run out", len(leases))

    @staticmethod
    async def _cancel(tasks: list) -> None:
        tasks = [task for task in tasks if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _dispatch_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):  # not wait_for: see Pool._prewarm_loop
                async with asyncio.timeout(self.async_poll_s):
                    await self._wakeup.wait()
            self._wakeup.clear()
            free = self.scheduler.free_workers
            if free <= 0 or self._closing:
                continue
            busy = self.scheduler.busy()
            self._capped = set(busy)  # before the claim: a slot freed while it runs wakes the next one
            try:
                began = time.monotonic()
                claimed = await self.store.claim_async(self.node_id, limit=free, lease_s=self.async_lease_s,
                                                       busy=busy)
            except Exception:
                log.exception("claiming async invocations failed")
                continue
            if self._closing:  # stop_claiming came while the claim was in flight: give them straight back
                await self.store.release({inv.id: inv.lease_owner for inv in claimed})
                break
            if claimed and not self._held:
                self._leases_valid_until = began + self.async_lease_s
            for inv in claimed:
                held = self._held[inv.id] = _Held(inv.lease_owner)
                self.scheduler.admit_claimed(inv.function_id)
                task = held.task = asyncio.create_task(self._run_async(inv, held), name=f"async-{inv.id}")
                self._async_tasks.add(task)
                task.add_done_callback(self._async_tasks.discard)
            if len(claimed) == free:
                self._wakeup.set()  # there may be more waiting

    async def _renew_loop(self) -> None:
        """Renew the leases of every claimed invocation; stop (and kill) work whose lease is gone.

        A lease is lost when the store no longer holds its token (it ran out and another claim took the
        work), or when renewals have failed for as long as a lease lasts: by then another
        node may rightly have claimed it, so running on would run the call twice at once.
        """
        interval = self.async_lease_s / 3
        while True:
            await asyncio.sleep(interval)
            snapshot = dict(self._held)
            if not snapshot:
                continue
            began = time.monotonic()
            try:
                kept = await self.store.renew_leases({id_: held.token for id_, held in snapshot.items()},
                                                     self.async_lease_s)
            except Exception:
                log.exception("renewing %d async leases failed", len(snapshot))
                if time.monotonic() >= self._leases_valid_until:
                    self._drop([id_ for id_, held in snapshot.items() if self._held.get(id_) is held],
                               "its lease could not be renewed in time")
                continue
            self._leases_valid_until = began + self.async_lease_s
            self._drop([id_ for id_, held in snapshot.items() if id_ not in kept and self._held.get(id_) is held],
                       "its lease was taken by another claim")

    def _drop(self, ids: list[str], why: str) -> None:
        for id_ in ids:
            held = self._held.pop(id_)
            log.warning("stopping async invocation %s (lease %s): %s", id_, held.token, why)
            if held.task is not None:
                held.task.cancel()

    async def _run_async(self, inv: InvocationRecord, held: _Held) -> None:
        try:
            await self._attempt(inv, held)
            self._held.pop(inv.id, None)  # written, fenced out, or its function is gone
        except asyncio.CancelledError:
            raise  # still held: close() hands it back (a lost lease was dropped already)
        except _LeaseLost:
            if self._held.get(inv.id) is held:
                del self._held[inv.id]
            log.warning("async invocation %s: lease %s lost before the call started", inv.id, held.token)
        except Exception:
            # The outcome could not be written: let the lease run out, so the call is tried again.
            if self._held.get(inv.id) is held:
                del self._held[inv.id]
            log.exception("async invocation %s failed in the platform; its lease will expire and it will be retried",
                          inv.id)
        finally:
            self.scheduler.leave_claimed(inv.function_id)

    async def _attempt(self, inv: InvocationRecord, held: _Held) -> None:
        """Run one claimed attempt and write what comes next: finished, retried later, or given up."""
        try:
            version = await self.store.get_version(inv.version_id)
        except NotFound:
            return  # the function was deleted, and its invocations with it
        if inv.attempts > version.max_retries:
            # Every attempt is used and the last one began but never ended: its node crashed (the lease
            # ran out, or the node restarted). Attempts that ended were retried or finished by their node.
            inv.status, inv.start, inv.output, inv.duration_ms = "failed", None, None, None
            inv.error = {"type": "NodeCrashed", "stack": "",
                         "message": "the node running the last attempt stopped before it finished"}
            await self._give_up(inv, held)
            return

        async def start() -> None:
            held.started = True  # from here on a shutdown lets it run rather than handing it back
            if not await self.store.start_attempt(inv.id, held.token):
                raise _LeaseLost
            inv.attempts += 1

        try:
            # The invoked qualifier is not kept with a queued call: its ARN names the version that runs.
            qualified = protocol.call_fields(None if inv.executed_version == LATEST else inv.executed_version)
            await self.scheduler.execute(version.deployment(inv.executed_version), inv, inv.event or b"null",
                                         on_start=start, call_context=qualified)
        except Unavailable as exc:
            inv.status, inv.start, inv.output, inv.logs, inv.duration_ms = "failed", None, None, "", None
            inv.finished_at = _now()
            inv.error = {"type": "Unavailable", "message": f"no machine could run the call: {exc}", "stack": ""}
        if inv.status == "succeeded":
            await self._finish(inv, held)
        elif inv.attempts <= version.max_retries:
            delay = callbacks.backoff(inv.attempts, self.async_retry_base_s)
            log.info("async invocation %s attempt %d %s; retrying in %.1f s", inv.id, inv.attempts, inv.status, delay)
            if not await self.store.retry_later(
                inv.id, token=held.token, not_before=_now() + timedelta(seconds=delay),
                error=inv.error, start=inv.start, logs=inv.logs, logs_truncated=inv.logs_truncated,
                duration_ms=inv.duration_ms, restored=inv.restored,
            ):
                log.warning("async invocation %s: its attempt ended after lease %s was lost; no retry queued",
                            inv.id, held.token)
        else:
            await self._give_up(inv, held)

    async def _give_up(self, inv: InvocationRecord, held: _Held) -> None:
        """After the last attempt: ``failed``; the error is the last attempt's (its type is the reason:
        the function's exception, ``TimeoutError``, ``RuntimeExit``, ``NodeCrashed``…), its message left
        as the function wrote it, plus ``attempts``: how often the call was tried."""
        error = dict(inv.error or {"type": "Failed", "message": f"the call ended {inv.status}", "stack": ""})
        error["attempts"] = inv.attempts
        inv.status, inv.error = "failed", error
        await self._finish(inv, held)

    async def _finish(self, inv: InvocationRecord, held: _Held) -> None:
        written = await self.store.finish_invocation(
            inv.id, status=inv.status, start=inv.start, output=inv.output, error=inv.error, logs=inv.logs,
            logs_truncated=inv.logs_truncated, duration_ms=inv.duration_ms, finished_at=inv.finished_at or _now(),
            token=held.token, callback=inv.callback_url is not None, restored=inv.restored, tenant=inv.tenant,
        )
        if not written:
            log.warning("async invocation %s: its attempt ended after lease %s was lost; the outcome is dropped",
                        inv.id, held.token)
        elif inv.callback_url is not None:
            self.callbacks.wake()
