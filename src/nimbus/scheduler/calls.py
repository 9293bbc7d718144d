"""Every call comes in through the ``Scheduler``: admission, sync calls (plain and idempotent), queuing
async ones, and running one call on a machine. The async worker (``worker.py``) runs the queued ones.

Why no fixed worker tasks reading one queue: a worker blocked on a busy function would stall calls to
every other function behind it. Instead each admitted call runs in its own task and waits, in order,
for its function's concurrency slot and then a node-wide worker slot. The "queue" is the set of
admitted calls not yet running; when it is full, calls are refused with 429 rather than piling up.

A plain sync call costs one store write: its finished row, written behind (``Store.record_invocation``;
the caller already has its answer). A sync call with an Idempotency-Key is recorded before it runs.
Async invocations are written to the store before their 202; the worker claims them from there.
"""

import asyncio
import dataclasses
import logging
import os
import time

import orjson

from nimbus import callbacks, protocol
from nimbus.agent.contract import LOG_TAIL_MAX, RESULT_MAX
from nimbus.deployment import LATEST, Deployment
from nimbus.errors import (
    Conflict,
    InitFailed,
    InvalidRequest,
    MachineDied,
    MachineTimeout,
    OverBudget,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    Unavailable,
)
from nimbus.metrics import Metrics
from nimbus.pool import Pool, error_of
from nimbus.scheduler.worker import AsyncWorker
from nimbus.store import InvocationRecord, Store
from nimbus.store.records import FINISHED_STATUSES as FINISHED
from nimbus.store.records import utcnow as _now

log = logging.getLogger("nimbus.scheduler")

MAX_TIMEOUT_S = 900.0
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


class FunctionSlots:
    """Each function's concurrency limit, over all its versions at once.

    A semaphore per function cannot do it: versions may have different limits, and replacing the
    semaphore when a call of another version came (as this once did) let both sets of calls run. Here
    every call counts against its function, and waits while the function runs as many calls as the
    limit of the version it is about to run (the limit a call was given is the one it must respect).
    """

    def __init__(self) -> None:
        self._entries: dict[str, list] = {}  # function id → [calls running, calls wanting in, Condition]

    def slot(self, function_id: str, limit: int) -> "_Slot":
        """``async with`` it to run one call of the function under ``limit``."""
        return _Slot(self._entries, function_id, limit)

    def running(self, function_id: str) -> int:
        entry = self._entries.get(function_id)
        return entry[0] if entry else 0


class Scheduler:
    """Admits every call, sync or async, and runs each on a machine; owns the async worker."""

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
        self.drain_timeout_s = drain_timeout_s
        self.tenant_budget = tenant_budget
        self.budget_retry_s = budget_retry_s
        self.callback_allow = callback_allow if callback_allow is not None else callbacks.AllowList()
        self._worker_slots = asyncio.Semaphore(workers)
        self._function_slots = FunctionSlots()
        # Calls of each function this node runs or holds (sync and async, waiting or running): a claim
        # takes no more of a function's async calls than its concurrency leaves free.
        self._in_use: dict[str, int] = {}
        self._admitted = 0
        self._running = 0
        # Sync calls each tenant has in this node, waiting or running (see _admit).
        self._tenant_calls: dict[str, int] = {}
        self.tenant_calls_max = max(1, int((queue_size + workers) * tenant_queue_share))
        self.closing = False
        self.claiming = True  # async work is claimed (False once the node drains or closes)
        self.async_worker = AsyncWorker(self, store, node_id=node_id, poll_s=async_poll_s, lease_s=async_lease_s,
                                  retry_base_s=async_retry_base_s, callback_allow=self.callback_allow)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self.async_worker.start()

    def stop_claiming(self) -> None:
        """Take no more async work (the first step of a graceful shutdown; safe from a signal handler)."""
        self.claiming = False
        self.closing = True

    def drain(self) -> None:
        """Claim no more async work but go on serving calls (a draining node, still behind the balancer)."""
        self.claiming = False

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking work and hand back what has not started; let running calls finish (up to
        ``timeout``), then cancel them and hand them back too, so another node or a restart takes them
        at once rather than when their leases run out.
        """
        timeout = self.drain_timeout_s if timeout is None else timeout
        self.closing = True
        await self.async_worker.close(timeout)

    @property
    def in_flight(self) -> int:
        """Calls admitted on this node, waiting or running (async ones it claimed included)."""
        return self._admitted

    @property
    def queue_depth(self) -> int:
        """Admitted calls still waiting for a machine."""
        return self._admitted - self._running

    # ---------------------------------------------------------------- entry points

    async def invoke(self, fn, event: bytes, *, idempotency_key: str | None = None,
                     executed_version: str = LATEST, call_context: dict | None = None,
                     trigger: str = "api", invocation_id: str | None = None) -> InvocationRecord:
        """Run a call now and return its finished record: one store write, at the end, written behind
        (the caller has its answer; see ``Store.record_invocation``).

        ``fn`` is the revision to run and ``executed_version`` what it runs as (``Store.lookup_qualified``
        gives both): ``$LATEST`` or a published number, on machines of that version only.

        With ``idempotency_key`` the call is recorded as running first, so a repeat of the key (on any
        node, even concurrent) finds it and gets its result instead of running it again.

        ``call_context`` is what this call alone tells the function (:func:`protocol.call_fields`): the qualifier
        it was invoked with (its ARN's suffix) and a Lambda client context. Sync calls only, as on Lambda.
        """
        if idempotency_key is not None:
            return await self._invoke_once(fn, event, idempotency_key, executed_version, call_context)
        self._admit(fn.tenant)
        try:
            dep = fn.deployment(executed_version)
            inv = self._sync_record(fn, dep, trigger=trigger)
            if invocation_id is not None:  # a function URL's event already names it (requestContext.requestId)
                inv.id = invocation_id
            await self._execute_sync(dep, inv, event, call_context)
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
            attempts=1, executed_version=dep.executed_version, **extra,
        )

    async def _invoke_once(self, fn, event: bytes, key: str, executed_version: str,
                           call_context: dict | None) -> InvocationRecord:
        key = check_idempotency_key(key)
        existing = await self.store.get_by_idempotency_key(fn.tenant, key)
        if existing is not None:
            return await self._first_result(existing, fn, "sync")
        await self._check_budget(fn.tenant, 0)
        self._admit(fn.tenant)
        try:
            dep = fn.deployment(executed_version)
            inv = self._sync_record(fn, dep, idempotency_key=key, lease_owner=self.node_id)
            stored, created = await self.store.insert_idempotent(inv)
        except BaseException:
            self._leave(fn.tenant)
            raise
        if not created:
            self._leave(fn.tenant)
            return await self._first_result(stored, fn, "sync")
        try:
            await self._execute_sync(dep, inv, event, call_context)
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
                           idempotency_key: str | None = None, executed_version: str = LATEST) -> InvocationRecord:
        """Record an async call as queued (before the 202 goes out) and wake the dispatcher. It runs the
        revision ``fn`` names as ``executed_version``, even if ``$LATEST`` or an alias moves meanwhile.

        A repeated ``idempotency_key`` returns the first invocation instead. ``callback_url`` must be
        allowed by ``NIMBUS_CALLBACK_ALLOW`` (``InvalidRequest`` otherwise).
        """
        if self.closing:
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
            callback_url=callback_url, idempotency_key=idempotency_key, executed_version=executed_version,
        )
        stored, created = await self.store.insert_idempotent(inv)
        if not created:
            return await self._first_result(stored, fn, "async")
        self.async_worker.wake()
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
        if self.closing:
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
        """One call of the function is over; the worker decides whether that wakes its dispatcher
        (``concurrency`` None: an async call)."""
        left = self._in_use[function_id] - 1
        if left:
            self._in_use[function_id] = left
        else:
            del self._in_use[function_id]
        self.async_worker.freed(function_id, left, concurrency)

    async def _execute_sync(self, dep: Deployment, inv: InvocationRecord, event: bytes,
                            call_context: dict | None) -> None:
        self._use(dep.function_id)
        try:
            await self.execute(dep, inv, event, call_context=call_context)
        finally:
            self._done_with(dep.function_id, dep.concurrency)

    async def execute(self, dep: Deployment, inv: InvocationRecord, event: bytes, on_start=None,
                      call_context: dict | None = None) -> None:
        """Acquire a machine, run the event, fill ``inv`` with the outcome. Never raises for function faults.

        ``on_start`` is awaited once the call holds its slots, just before it asks for a machine.
        """
        async with self._function_slots.slot(dep.function_id, dep.concurrency), self._worker_slots:
            if on_start is not None:
                await on_start()
            self._running += 1
            began = time.perf_counter()
            inv.started_at = _now()
            try:
                await self._run_on_machine(dep, inv, event, call_context)
            finally:
                self._running -= 1
                inv.finished_at = _now()
                self.metrics.observe(dep.function_name, inv.status, inv.start, time.perf_counter() - began)

    async def _run_on_machine(self, dep: Deployment, inv: InvocationRecord, event: bytes,
                              call_context: dict | None = None) -> None:
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
        if call_context:
            header.update(call_context)
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
        inv.logs_truncated = bool(reply.get("logs_truncated")) or len(logs) > LOG_TAIL_MAX
        inv.logs = logs[-LOG_TAIL_MAX:]
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

    # ---------------------------------------------------------------- the worker's view of the counts

    @property
    def free_workers(self) -> int:
        """Worker slots no admitted call holds: how many async calls a claim may take."""
        return self.workers - self._admitted

    def busy(self) -> dict[str, int]:
        """Calls of each function this node runs or holds, as a claim must leave room for them."""
        return dict(self._in_use)

    def admit_claimed(self, function_id: str) -> None:
        """A claimed async call is taken in: it counts as admitted until ``leave_claimed``."""
        self._admitted += 1
        self._use(function_id)

    def leave_claimed(self, function_id: str) -> None:
        self._admitted -= 1
        self._done_with(function_id)


class _Slot:
    """One call's hold on its function's slots. A plain class, not a generator context manager: it is
    entered on every call. When the function is under the limit and nobody waits, no lock is taken
    (the loop runs one task at a time, so the count cannot change under us); a caller only ever
    passes ahead of nobody."""

    __slots__ = ("_entries", "_function_id", "_limit", "_entry")

    def __init__(self, entries: dict[str, list], function_id: str, limit: int) -> None:
        self._entries, self._function_id, self._limit = entries, function_id, limit

    async def __aenter__(self) -> None:
        entry = self._entries.get(self._function_id)
        if entry is None:
            entry = self._entries[self._function_id] = [0, 0, None]
        self._entry = entry
        if not entry[1] and entry[0] < self._limit:
            entry[0] += 1
            return
        if entry[2] is None:
            entry[2] = asyncio.Condition()
        cond, limit = entry[2], self._limit
        entry[1] += 1  # counted before the first await, so the entry cannot be dropped under this call
        try:
            async with cond:
                await cond.wait_for(lambda: entry[0] < limit)
                entry[0] += 1
        finally:
            entry[1] -= 1

    async def __aexit__(self, *exc_info: object) -> None:
        entry = self._entry
        entry[0] -= 1
        if entry[1]:
            cond = entry[2]
            async with cond:
                cond.notify_all()  # waiters of different limits: each checks its own
        elif not entry[0]:
            del self._entries[self._function_id]  # idle: functions that ran once hold nothing


def check_idempotency_key(key: str) -> str:
    """An ``Idempotency-Key`` as given, if it is 1..256 printable ASCII characters; else ``InvalidRequest``."""
    if not key.strip() or len(key) > IDEMPOTENCY_KEY_MAX or not all(" " <= ch <= "~" for ch in key):
        raise InvalidRequest(f"the Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters")
    return key


def new_id() -> str:
    """32 random hex digits, as ``uuid4().hex`` but without building a UUID on every call."""
    return os.urandom(16).hex()

