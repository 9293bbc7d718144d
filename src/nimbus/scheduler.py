"""Admission, limits and dispatch: every invocation, sync or async, runs through ``Scheduler``.

Why no fixed worker tasks reading one queue: a worker blocked on a busy function would stall calls to
every other function behind it. Instead each admitted call runs in its own task and waits, in order,
for its function's concurrency slot and then a node-wide worker slot. The "queue" is the set of
admitted calls not yet running; when it is full, calls are refused with 429 rather than piling up.

Async invocations are written to the store before their 202 and reach a machine only through
``claim_async``: a restart (or another node on PostgreSQL) finds them there.
"""

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime

import orjson

from nimbus import protocol
from nimbus.errors import InitFailed, MachineDied, MachineTimeout, NotFound, Overloaded, ProtocolError, Unavailable
from nimbus.metrics import Metrics
from nimbus.pool import Deployment, Pool, error_of
from nimbus.store import InvocationRecord, Store

log = logging.getLogger("nimbus.scheduler")

RESULT_MAX = 6 << 20  # Lambda's synchronous response limit
LOGS_MAX = 64 << 10  # log tail kept per invocation
MAX_TIMEOUT_S = 900.0
CODE_CACHE_ENTRIES = 128
DRAIN_TIMEOUT_S = 30.0
# Runtimes that enforce the deadline themselves (wasm's epoch interruption) answer at it with a
# TimeoutError and keep their machine's state clean; the host kills a machine this much later.
TIMEOUT_GRACE_S = 0.5


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
    ) -> None:
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.node_id = node_id
        self.queue_size = queue_size
        self.workers = workers
        self.async_poll_s = async_poll_s
        self.async_lease_s = async_lease_s
        self._worker_slots = asyncio.Semaphore(workers)
        self._function_slots: dict[str, tuple[int, asyncio.Semaphore]] = {}
        self._admitted = 0
        self._running = 0
        self._closing = False
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._async_tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        released = await self.store.release_owned(self.node_id)
        if released:
            log.info("re-queued %d async invocations this node held before it stopped", released)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="async-dispatch")
        self._wakeup.set()

    async def close(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Stop taking work, let running calls finish (up to ``timeout``), then cancel the rest.

        A cancelled async invocation keeps its lease in the store; this node hands it back at its next start.
        """
        self._closing = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._async_tasks:
            _, pending = await asyncio.wait(list(self._async_tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def queue_depth(self) -> int:
        """Admitted calls still waiting for a machine."""
        return self._admitted - self._running

    # ---------------------------------------------------------------- entry points

    async def invoke(self, fn, event: bytes) -> InvocationRecord:
        """Run a call now and return its finished record (written to the store once, at the end)."""
        self._admit()
        try:
            dep = deployment_of(fn)
            inv = InvocationRecord(
                id=new_id(), function_id=dep.function_id, function_name=dep.function_name, tenant=fn.tenant,
                version=dep.version, version_id=dep.version_id, mode="sync", status="running",
                created_at=_now(), attempts=1,
            )
            await self._execute(dep, inv, event)
            try:
                await self.store.insert_invocation(inv)
            except Exception:
                log.exception("could not record invocation %s", inv.id)
            return inv
        finally:
            self._admitted -= 1

    async def submit_async(self, fn, event: bytes) -> InvocationRecord:
        """Record an async call as queued (before the 202 goes out) and wake the dispatcher."""
        if self._closing:
            raise Unavailable("the node is shutting down")
        inv = InvocationRecord(
            id=new_id(), function_id=fn.id, function_name=fn.name, tenant=fn.tenant, version=fn.version,
            version_id=fn.version_id, mode="async", status="queued", event=event, created_at=_now(),
        )
        await self.store.insert_invocation(inv)
        self._wakeup.set()
        return inv

    # ---------------------------------------------------------------- running one call

    def _admit(self) -> None:
        if self._closing:
            raise Unavailable("the node is shutting down")
        if self.queue_depth >= self.queue_size:
            self.metrics.rejected.inc()
            raise Overloaded(f"the invocation queue is full ({self.queue_size} waiting); retry shortly")
        self._admitted += 1

    def _function_slot(self, dep: Deployment) -> asyncio.Semaphore:
        entry = self._function_slots.get(dep.function_id)
        if entry is None or entry[0] != dep.concurrency:
            entry = (dep.concurrency, asyncio.Semaphore(dep.concurrency))
            self._function_slots[dep.function_id] = entry
        return entry[1]

    async def _execute(self, dep: Deployment, inv: InvocationRecord, event: bytes) -> None:
        """Acquire a machine, run the event, fill ``inv`` with the outcome. Never raises for function faults."""
        async with self._function_slot(dep), self._worker_slots:
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
        except (MachineDied, ProtocolError) as exc:
            inv.duration_ms = round((time.perf_counter() - began) * 1000, 3)
            inv.status = "failed"
            inv.error = {"type": "RuntimeExit", "message": f"the function's machine died: {exc}", "stack": ""}
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
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.async_poll_s)
            except TimeoutError:
                pass
            self._wakeup.clear()
            free = self.workers - self._admitted
            if free <= 0:
                continue
            try:
                claimed = await self.store.claim_async(
                    self.node_id, limit=free, lease_s=MAX_TIMEOUT_S + self.async_lease_s
                )
            except Exception:
                log.exception("claiming async invocations failed")
                continue
            for inv in claimed:
                self._admitted += 1
                task = asyncio.create_task(self._run_async(inv), name=f"async-{inv.id}")
                self._async_tasks.add(task)
                task.add_done_callback(self._async_tasks.discard)
            if len(claimed) == free:
                self._wakeup.set()  # there may be more waiting

    async def _run_async(self, inv: InvocationRecord) -> None:
        try:
            try:
                version = await self.store.get_version(inv.version_id)
            except NotFound:
                return  # the function was deleted, and its invocations with it
            await self._execute(deployment_of(version), inv, inv.event or b"null")
            await self._finish(inv)
        except asyncio.CancelledError:
            raise
        except Unavailable as exc:
            inv.status, inv.start, inv.output, inv.logs, inv.duration_ms = "failed", None, None, "", None
            inv.error = {"type": "Unavailable", "message": f"no machine could run the call: {exc}", "stack": ""}
            await self._finish(inv)
        except Exception:
            log.exception("async invocation %s failed in the platform; its lease will expire and it will be retried",
                          inv.id)
        finally:
            self._admitted -= 1

    async def _finish(self, inv: InvocationRecord) -> None:
        try:
            await self.store.finish_invocation(
                inv.id, status=inv.status, start=inv.start, output=inv.output, error=inv.error, logs=inv.logs,
                logs_truncated=inv.logs_truncated, duration_ms=inv.duration_ms, finished_at=inv.finished_at or _now(),
            )
        except NotFound:
            pass  # the function was deleted while the call ran, and its invocations with it


class CodeCache:
    """A small LRU of code bytes in front of the store: Init needs the code on every warm and cold start."""

    def __init__(self, store: Store, entries: int = CODE_CACHE_ENTRIES) -> None:
        self.store = store
        self.entries = entries
        self._code: OrderedDict[str, bytes] = OrderedDict()

    async def load(self, dep: Deployment) -> bytes:
        code = self._code.get(dep.code_sha256)
        if code is None:
            code = await self.store.get_code(dep.code_sha256)
            self._code[dep.code_sha256] = code
            if len(self._code) > self.entries:
                self._code.popitem(last=False)
        else:
            self._code.move_to_end(dep.code_sha256)
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
    )


def new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)
