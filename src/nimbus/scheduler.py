"""Admission, limits and dispatch: every invocation, sync or async, runs through ``Scheduler``.

Why no fixed worker tasks reading one queue: a worker blocked on a busy function would stall calls to
every other function behind it. Instead each admitted call runs in its own task and waits, in order,
for its function's concurrency slot and then a node-wide worker slot. The "queue" is the set of
admitted calls not yet running; when it is full, calls are refused with 429 rather than piling up.

A plain sync call costs one store write: its finished row, written behind (``Store.record_invocation``;
the caller already has its answer). A sync call with an Idempotency-Key is recorded before it runs.
Async invocations are written to the store before their 202 and reach a machine only through
``claim_async``: a restart (or another node on PostgreSQL) finds them there. A claim takes no more of a
function's calls than the function can start now on this node (its concurrency less the calls of it this
node already runs or holds), and takes tenants and functions in turn: a backlog of one function holds
neither worker slots nor anyone else's calls. A call that ends wakes the dispatcher, so a function's
backlog still runs back to back. Durability rules:

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
"""

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime, timedelta

import orjson

from nimbus import callbacks, packages, protocol
from nimbus.errors import (
    Conflict,
    InitFailed,
    InvalidRequest,
    MachineDied,
    MachineTimeout,
    NotFound,
    OverBudget,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    Unavailable,
)
from nimbus.metrics import Metrics
from nimbus.pool import Deployment, Pool, error_of
from nimbus.store import InvocationRecord, Store
from nimbus.store.records import FINISHED_STATUSES as FINISHED

log = logging.getLogger("nimbus.scheduler")

RESULT_MAX = 6 << 20  # Lambda's synchronous response limit
LOGS_MAX = 64 << 10  # log tail kept per invocation
MAX_TIMEOUT_S = 900.0
CODE_CACHE_BYTES = 256 << 20  # the code cache's default budget (the code_cache_mb setting)
DRAIN_TIMEOUT_S = 30.0
# Runtimes that enforce the deadline themselves (wasm's epoch interruption) answer at it with a
# TimeoutError and keep their machine's state clean; the host kills a machine this much later.
TIMEOUT_GRACE_S = 0.5
IDEMPOTENCY_KEY_MAX = 256
IDEMPOTENT_POLL_S = 0.05  # how often a repeated sync key looks whether the first call has finished
# A repeated sync key waits for the first call at most its timeout plus this (acquiring, init, recording).
IDEMPOTENT_WAIT_EXTRA_S = 60.0
DEFAULT_TENANT_BUDGET = 1 << 30  # bytes of events, outputs and logs a tenant's stored invocations may hold
# What a plain sync call's record keeps instead of its output and logs when its tenant is over budget.
NOT_KEPT = ("[nimbus] the output and logs of this call were not kept: this tenant's stored invocations fill "
            "its storage budget")


class _Held:
    """An async invocation this node has claimed: its lease token and whether it is going to a machine."""

    __slots__ = ("token", "started", "task")

    def __init__(self, token: str) -> None:
        self.token = token
        self.started = False
        self.task: asyncio.Task | None = None


class _LeaseLost(Exception):  # noqa: N818 - control flow inside the scheduler
    """The claim's lease no longer holds the invocation: another claim took it."""


class Scheduler:
    def __init__(
        self,
        store: Store,
        pool: Pool,
        metrics: Metrics,
        *,
        node_id: str,
        queue_size: int = 1024,
        workers: int = 64,
        async_poll_s: float = 1.0,
        async_lease_s: float = 60.0,
        async_retry_base_s: float = 1.0,
        callback_allow: callbacks.AllowList | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        tenant_budget: int = DEFAULT_TENANT_BUDGET,
        budget_retry_s: float = 60.0,
        tenant_queue_share: float = 0.5,
    ) -> None:
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.node_id = node_id
        self.queue_size = queue_size
        self.workers = workers
        self.async_poll_s = async_poll_s
        self.async_lease_s = async_lease_s
        self.async_retry_base_s = async_retry_base_s
        self.drain_timeout_s = drain_timeout_s
        self.tenant_budget = tenant_budget
        self.budget_retry_s = budget_retry_s
        self.callback_allow = callback_allow if callback_allow is not None else callbacks.AllowList()
        self.callbacks = callbacks.Deliverer(store, self.callback_allow, node_id, poll_s=async_poll_s,
                                             base_s=async_retry_base_s)
        self._held: dict[str, _Held] = {}
        self._renewer: asyncio.Task | None = None
        self._leases_valid_until = 0.0
        self._worker_slots = asyncio.Semaphore(workers)
        self._function_slots: dict[str, tuple[int, asyncio.Semaphore]] = {}
        # Calls of each function this node runs or holds (sync and async, waiting or running): a claim
        # takes no more of a function's async calls than its concurrency leaves free.
        self._in_use: dict[str, int] = {}
        # Functions the last claim found busy: a slot of theirs coming free wakes the dispatcher.
        self._capped: set[str] = set()
        self._admitted = 0
        self._running = 0
        # Sync calls each tenant has in this node, waiting or running (see _admit).
        self._tenant_calls: dict[str, int] = {}
        self.tenant_calls_max = max(1, int((queue_size + workers) * tenant_queue_share))
        self._closing = False
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._async_tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        released = await self.store.release_owned(self.node_id)
        if released:
            log.info("re-queued %d async invocations this node held before it stopped", released)
        await self.callbacks.start()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="async-dispatch")
        self._renewer = asyncio.create_task(self._renew_loop(), name="async-leases")
        self._wakeup.set()

    def stop_claiming(self) -> None:
        """Take no more async work (the first step of a graceful shutdown; safe from a signal handler)."""
        self._closing = True

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking work and hand back what has not started; let running calls finish (up to
        ``timeout``), then cancel them and hand them back too, so another node or a restart takes them
        at once rather than when their leases run out.
        """
        timeout = self.drain_timeout_s if timeout is None else timeout
        self._closing = True
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

    @property
    def queue_depth(self) -> int:
        """Admitted calls still waiting for a machine."""
        return self._admitted - self._running

    # ---------------------------------------------------------------- entry points

    async def invoke(self, fn, event: bytes, *, idempotency_key: str | None = None) -> InvocationRecord:
        """Run a call now and return its finished record: one store write, at the end, written behind
        (the caller has its answer; see ``Store.record_invocation``).

        With ``idempotency_key`` the call is recorded as running first, so a repeat of the key (on any
        node, even concurrent) finds it and gets its result instead of running it again.
        """
        if idempotency_key is not None:
            return await self._invoke_once(fn, event, idempotency_key)
        self._admit(fn.tenant)
        try:
            dep = deployment_of(fn)
            inv = self._sync_record(fn, dep)
            await self._execute_sync(dep, inv, event)
            try:
                await self.store.record_invocation(self._as_kept(inv))
            except Exception:
                log.exception("could not record invocation %s", inv.id)
            return inv
        finally:
            self._leave(fn.tenant)

    @staticmethod
    def _sync_record(fn, dep: Deployment, **extra) -> InvocationRecord:
        return InvocationRecord(
            id=new_id(), function_id=dep.function_id, function_name=dep.function_name, tenant=fn.tenant,
            version=dep.version, version_id=dep.version_id, mode="sync", status="running", created_at=_now(),
            attempts=1, **extra,
        )

    async def _invoke_once(self, fn, event: bytes, key: str) -> InvocationRecord:
        key = check_idempotency_key(key)
        existing = await self.store.get_by_idempotency_key(fn.tenant, key)
        if existing is not None:
            return await self._first_result(existing, fn, "sync")
        await self._check_budget(fn.tenant, 0)
        self._admit(fn.tenant)
        try:
            dep = deployment_of(fn)
            inv = self._sync_record(fn, dep, idempotency_key=key, lease_owner=self.node_id)
            stored, created = await self.store.insert_idempotent(inv)
        except BaseException:
            self._leave(fn.tenant)
            raise
        if not created:
            self._leave(fn.tenant)
            return await self._first_result(stored, fn, "sync")
        try:
            await self._execute_sync(dep, inv, event)
            try:
                await self.store.finish_invocation(
                    inv.id, status=inv.status, start=inv.start, output=inv.output, error=inv.error, logs=inv.logs,
                    logs_truncated=inv.logs_truncated, duration_ms=inv.duration_ms,
                    finished_at=inv.finished_at or _now(), started_at=inv.started_at, restored=inv.restored,
                    tenant=inv.tenant,
                )
            except Exception:
                log.exception("could not record invocation %s", inv.id)
            return inv
        finally:
            self._leave(fn.tenant)

    async def _first_result(self, first: InvocationRecord, fn, mode: str) -> InvocationRecord:
        """The invocation a repeated Idempotency-Key names; a sync repeat waits for it to finish."""
        if first.function_id != fn.id or first.mode != mode:
            raise Conflict(f"this Idempotency-Key was first used for a {first.mode} call of "
                           f"{first.function_name!r}; use a new key for another request")
        if mode == "async":
            return first
        deadline = time.monotonic() + float(fn.timeout_s) + IDEMPOTENT_WAIT_EXTRA_S
        while first.status not in FINISHED:
            if time.monotonic() > deadline:
                raise Unavailable(f"the first call with this Idempotency-Key ({first.id}) has not finished yet")
            await asyncio.sleep(IDEMPOTENT_POLL_S)
            first = await self.store.get_invocation(first.id, first.tenant)
        return first

    async def submit_async(self, fn, event: bytes, *, callback_url: str | None = None,
                           idempotency_key: str | None = None) -> InvocationRecord:
        """Record an async call as queued (before the 202 goes out) and wake the dispatcher.

        A repeated ``idempotency_key`` returns the first invocation instead. ``callback_url`` must be
        allowed by ``NIMBUS_CALLBACK_ALLOW`` (``InvalidRequest`` otherwise).
        """
        if self._closing:
            raise Unavailable("the node is shutting down")
        if idempotency_key is not None:
            idempotency_key = check_idempotency_key(idempotency_key)
            existing = await self.store.get_by_idempotency_key(fn.tenant, idempotency_key)
            if existing is not None:  # a repeat gets its first invocation, budget or not
                return await self._first_result(existing, fn, "async")
        if callback_url is not None:
            callback_url = self.callback_allow.check(callback_url)
        await self._check_budget(fn.tenant, len(event))
        inv = InvocationRecord(
            id=new_id(), function_id=fn.id, function_name=fn.name, tenant=fn.tenant, version=fn.version,
            version_id=fn.version_id, mode="async", status="queued", event=event, created_at=_now(),
            callback_url=callback_url, idempotency_key=idempotency_key,
        )
        stored, created = await self.store.insert_idempotent(inv)
        if not created:
            return await self._first_result(stored, fn, "async")
        self._wakeup.set()
        return inv

    async def _check_budget(self, tenant: str, size: int) -> None:
        """Refuse a call whose row is stored before it runs (async, idempotent sync) when the tenant's
        stored invocations, with its ``size`` bytes of event, would pass the tenant's budget.

        A soft limit: checked against the bytes measured a few seconds ago plus this node's writes since,
        and a call's result, written when it ends, is not known yet."""
        if size > self.tenant_budget:
            raise PayloadTooLarge(f"the event is {size} bytes; a tenant's stored invocations may hold at most "
                                  f"{self.tenant_budget} bytes")
        used = await self.store.tenant_usage(tenant)
        if used + size > self.tenant_budget:
            raise OverBudget(
                f"this tenant's stored invocations hold {used} bytes; with this event they would pass the "
                f"tenant's budget of {self.tenant_budget} bytes. Finished invocations are deleted after the "
                "node's retention period (and beyond its count per function), or with their function",
                retry_after=self.budget_retry_s)

    def _as_kept(self, inv: InvocationRecord) -> InvocationRecord:
        """The record a plain sync call leaves: the call itself (the caller has its answer) but, when the
        tenant is over its budget as last measured, without output and logs, and saying so."""
        used = self.store.known_usage(inv.tenant)
        if used is None or used + len(inv.output or b"") + len(inv.logs) <= self.tenant_budget:
            return inv
        return dataclasses.replace(inv, output=None, logs=NOT_KEPT, logs_truncated=True)

    # ---------------------------------------------------------------- running one call

    def _admit(self, tenant: str) -> None:
        """Take a sync call in, or refuse it (429): the node's queue is full, or this tenant holds its share.

        The share keeps one tenant's flood of calls to a slow function from filling the queue that
        every other tenant's calls need.
        """
        if self._closing:
            raise Unavailable("the node is shutting down")
        if self.queue_depth >= self.queue_size:
            self.metrics.rejected.inc()
            raise Overloaded(f"the invocation queue is full ({self.queue_size} waiting); retry shortly")
        held = self._tenant_calls.get(tenant, 0)
        if held >= self.tenant_calls_max:
            self.metrics.rejected.inc()
            raise Overloaded(f"this tenant has {held} calls in this node, its share of the queue; retry shortly")
        self._tenant_calls[tenant] = held + 1
        self._admitted += 1

    def _leave(self, tenant: str) -> None:
        """A sync call taken in by ``_admit`` is over."""
        self._admitted -= 1
        left = self._tenant_calls[tenant] - 1
        if left:
            self._tenant_calls[tenant] = left
        else:
            del self._tenant_calls[tenant]

    def _use(self, function_id: str) -> None:
        self._in_use[function_id] = self._in_use.get(function_id, 0) + 1

    def _done_with(self, function_id: str, concurrency: int | None = None) -> None:
        """One call of the function is over. The dispatcher is woken when that frees a slot the last
        claim could not use (``concurrency`` None: always, after an async call, whose function may
        have more queued)."""
        left = self._in_use[function_id] - 1
        if left:
            self._in_use[function_id] = left
        else:
            del self._in_use[function_id]
        if concurrency is None or (function_id in self._capped and left < concurrency):
            self._capped.discard(function_id)
            self._wakeup.set()

    async def _execute_sync(self, dep: Deployment, inv: InvocationRecord, event: bytes) -> None:
        self._use(dep.function_id)
        try:
            await self._execute(dep, inv, event)
        finally:
            self._done_with(dep.function_id, dep.concurrency)

    def _function_slot(self, dep: Deployment) -> asyncio.Semaphore:
        entry = self._function_slots.get(dep.function_id)
        if entry is None or entry[0] != dep.concurrency:
            entry = (dep.concurrency, asyncio.Semaphore(dep.concurrency))
            self._function_slots[dep.function_id] = entry
        return entry[1]

    async def _execute(self, dep: Deployment, inv: InvocationRecord, event: bytes, on_start=None) -> None:
        """Acquire a machine, run the event, fill ``inv`` with the outcome. Never raises for function faults.

        ``on_start`` is awaited once the call holds its slots, just before it asks for a machine.
        """
        async with self._function_slot(dep), self._worker_slots:
            if on_start is not None:
                await on_start()
            self._running += 1
            began = time.perf_counter()
            inv.started_at = _now()
            try:
                await self._run_on_machine(dep, inv, event)
            finally:
                self._running -= 1
                inv.finished_at = _now()
                self.metrics.observe(dep.function_name, inv.status, inv.start, time.perf_counter() - began)

    async def _run_on_machine(self, dep: Deployment, inv: InvocationRecord, event: bytes) -> None:
        try:
            lease = await self.pool.acquire(dep)
        except InitFailed as exc:
            inv.status, inv.start, inv.error = "failed", exc.start, exc.error
            return
        inv.start = lease.start
        # A snapshot-restored machine (firecracker) is marked on the call that loaded code into it.
        inv.restored = lease.start != "hot" and getattr(lease.machine, "restored", False)
        healthy = False  # unless the machine answers cleanly, it is not trusted again
        header = {"type": protocol.EXEC, "invocation_id": inv.id, "deadline_ms": int(dep.timeout_s * 1000)}
        began = time.perf_counter()
        try:
            reply, blob = await lease.machine.request(header, event, timeout=dep.timeout_s + TIMEOUT_GRACE_S)
            inv.duration_ms = round((time.perf_counter() - began) * 1000, 3)
            healthy = self._read_reply(inv, reply, blob)
        except MachineTimeout:
            inv.duration_ms = round((time.perf_counter() - began) * 1000, 3)
            inv.status = "timed_out"
            inv.error = {"type": "TimeoutError", "message": f"the function ran past its {dep.timeout_s:g} s timeout",
                         "stack": ""}
        except MachineDied as exc:
            inv.duration_ms = round((time.perf_counter() - began) * 1000, 3)
            inv.status = "failed"
            inv.error = {"type": "RuntimeExit", "message": f"the function's machine died: {exc}", "stack": ""}
        except ProtocolError as exc:  # the machine (code in it) broke the guest protocol: it was killed
            inv.duration_ms = round((time.perf_counter() - began) * 1000, 3)
            inv.status = "failed"
            inv.error = {"type": "ProtocolViolation", "message": f"the function's machine broke the protocol: {exc}",
                         "stack": ""}
        finally:
            self.pool.release(lease, healthy=healthy)

    def _read_reply(self, inv: InvocationRecord, reply: dict, blob: bytes) -> bool:
        """Fill ``inv`` from the agent's reply; True when the machine may serve again."""
        logs = reply.get("logs")
        logs = logs if isinstance(logs, str) else ""
        inv.logs_truncated = bool(reply.get("logs_truncated")) or len(logs) > LOGS_MAX
        inv.logs = logs[-LOGS_MAX:]
        if reply.get("type") == protocol.RESULT:
            if len(blob) > RESULT_MAX:
                inv.status = "failed"
                inv.error = {"type": "ResultTooLarge",
                             "message": f"the result is {len(blob)} bytes; the limit is {RESULT_MAX}", "stack": ""}
                return True
            try:
                orjson.loads(blob or b"null")
            except orjson.JSONDecodeError:
                inv.status = "failed"
                inv.error = {"type": "InvalidResult", "message": "the runtime returned a result that is not JSON",
                             "stack": ""}
                return False
            inv.status, inv.output = "succeeded", blob or b"null"
            return True
        if reply.get("type") == protocol.ERROR:
            inv.error = error_of(reply)
            # A guest that enforced the deadline itself says so with a fatal TimeoutError.
            timed_out = reply.get("fatal") and inv.error["type"] == "TimeoutError"
            inv.status = "timed_out" if timed_out else "failed"
            return not reply.get("fatal")
        inv.status = "failed"
        inv.error = {"type": "ProtocolError", "message": f"unexpected reply {reply.get('type')!r}", "stack": ""}
        return False

    # ---------------------------------------------------------------- async dispatch

    async def _dispatch_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):  # not wait_for: see Pool._prewarm_loop
                async with asyncio.timeout(self.async_poll_s):
                    await self._wakeup.wait()
            self._wakeup.clear()
            free = self.workers - self._admitted
            if free <= 0 or self._closing:
                continue
            busy = dict(self._in_use)
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
                self._admitted += 1
                self._use(inv.function_id)
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
            self._admitted -= 1
            self._done_with(inv.function_id)

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
            await self._execute(deployment_of(version), inv, inv.event or b"null", on_start=start)
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


class CodeCache:
    """An LRU of what Init sends, in front of the store: every warm and cold start needs the code.

    Bounded by bytes, not entries: a package may be tens of MiB, so 128 of them could hold GiBs. One
    bigger than the whole budget is loaded for each start and never kept. A package is kept as
    ``packages.to_machine`` makes it (a small one's tree, a big one's zip), converted once per version;
    starts that miss the cache together share one load.
    """

    def __init__(self, store: Store, max_bytes: int = CODE_CACHE_BYTES) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.size = 0
        self._code: OrderedDict[str, bytes] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._code)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._code

    async def load(self, dep: Deployment) -> bytes:
        key = dep.code_sha256
        code = self._code.get(key)
        if code is not None:
            self._code.move_to_end(key)
            return code
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._fetch(dep))
            loading.add_done_callback(lambda done: self._loaded(key, done))
        return await asyncio.shield(loading)  # a cancelled start leaves the load to the others

    def _loaded(self, key: str, loading: asyncio.Future) -> None:
        del self._loading[key]
        if not loading.cancelled():
            loading.exception()  # retrieved: each start that waited has raised it already

    async def _fetch(self, dep: Deployment) -> bytes:
        code = await self.store.get_code(dep.code_sha256)
        if dep.package:
            code = await asyncio.to_thread(packages.to_machine, code)
        if len(code) <= self.max_bytes and dep.code_sha256 not in self._code:
            self._code[dep.code_sha256] = code
            self.size += len(code)
            while self.size > self.max_bytes:
                _, evicted = self._code.popitem(last=False)
                self.size -= len(evicted)
        return code


def deployment_of(record) -> Deployment:
    """A Deployment from a FunctionRecord (latest version) or a VersionRecord."""
    is_function = hasattr(record, "version_id")
    return Deployment(
        version_id=record.version_id if is_function else record.id,
        function_id=record.id if is_function else record.function_id,
        function_name=record.name if is_function else record.function_name,
        version=record.version,
        runtime=record.runtime,
        handler=record.handler,
        env=dict(record.env),
        memory_mb=record.memory_mb,
        timeout_s=float(record.timeout_s),
        concurrency=record.concurrency,
        # Compiled runtimes run their built artifact; interpreted ones their code.
        code_sha256=record.artifact_sha256 or record.code_sha256,
        package=record.code_kind == "zip",
        layer_sha256=record.layer_sha256,
    )


def check_idempotency_key(key: str) -> str:
    """An ``Idempotency-Key`` as given, if it is 1..256 printable ASCII characters; else ``InvalidRequest``."""
    if not key.strip() or len(key) > IDEMPOTENCY_KEY_MAX or not all(" " <= ch <= "~" for ch in key):
        raise InvalidRequest(f"the Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters")
    return key


def new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)
