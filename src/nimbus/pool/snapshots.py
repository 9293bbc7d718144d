"""Function templates in the pool: which versions have one, when one is made, and when one goes.

A function template (a *snapshot*: :meth:`Driver.snapshot`) is a machine of one version that ran ``Init``
and then forks, so a new machine of that version skips both the boot and the function's imports. The
pool makes one, in the background, after a start of the version whose ``Init`` took at least
``min_init_ms`` (where forking pays: a function that imports nothing loads faster than it forks), and
for every ``per-call`` version whatever its ``Init`` took (it needs a new machine for every call).

A ``per-call`` version's template also keeps ``spares`` forks made ahead, so a call takes a machine
forked before it came instead of waiting for the fork. A spare has run nothing: it is as fresh as a
machine forked on demand.

Bounds: every template and spare counts against the pool's ``max_machines``; at most ``max_count``
templates exist, the least recently used going first; a template is retired with its version (and
when unused for ``idle_ttl_s``), and ends when its last fork has ended, since forks live in its pid
namespace. A version whose template could not be made is not tried again for ``RETRY_S``. With ``eager``
(``NIMBUS_FUNCTION_TEMPLATES=eager``) every python3 version gets one as soon as it is deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nimbus.deployment import PER_CALL, Deployment
from nimbus.errors import MachineError
from nimbus.machines.base import Machine, MachineSpec, Snapshot
from nimbus.pool import loading

if TYPE_CHECKING:
    from nimbus.pool.pool import Key, Pool

log = logging.getLogger("nimbus.pool.snapshots")

FORKABLE_RUNTIMES = frozenset({"python3"})  # whose agent keeps all it loaded in one process
RETRY_S = 60.0
FAILED_KEPT = 4096  # versions remembered as failed at once
DEFAULT_MIN_INIT_MS = 20.0
DEFAULT_MAX_COUNT = 16
DEFAULT_SPARES = 2


@dataclass(eq=False)
class Entry:
    """One version's template: being made (``snapshot`` None) or ready."""

    key: Key
    dep: Deployment
    snapshot: Snapshot | None = None
    making: asyncio.Task | None = None
    last_used: float = field(default_factory=time.monotonic)
    spares: deque[Machine] = field(default_factory=deque)
    filling: int = 0  # spare forks under way


class Snapshots:
    """The pool's function templates (see the module docstring); the pool calls in, never the driver."""

    def __init__(self, pool: Pool, init: Callable[[Machine, Deployment], Awaitable[dict]], *, enabled: bool,
                 eager: bool = False, min_init_ms: float = DEFAULT_MIN_INIT_MS, max_count: int = DEFAULT_MAX_COUNT,
                 spares: int = DEFAULT_SPARES) -> None:
        self.pool = pool
        self._init = init
        driver = pool.driver
        self.enabled = enabled and bool(getattr(driver, "snapshots_on", False))
        self.eager = self.enabled and eager  # every python3 version gets one when deployed (Pool.prepare)
        self.note = getattr(driver, "snapshots_note", "this driver has no function templates")
        if not enabled:
            self.note = "off (NIMBUS_FUNCTION_TEMPLATES)"
        self.min_init_ms = min_init_ms
        self.max_count = max_count
        self.spares = spares
        self._entries: dict[Key, Entry] = {}
        self._failed: dict[Key, float] = {}
        self._tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- what the pool asks

    def ready(self, key: Key) -> Snapshot | None:
        """The version's live template, or None."""
        entry = self._entries.get(key)
        if entry is None or entry.snapshot is None:
            return None
        if not entry.snapshot.alive:
            self._drop(entry)
            return None
        entry.last_used = time.monotonic()
        return entry.snapshot

    def take_spare(self, key: Key) -> Machine | None:
        """A fork made ahead for the version (its slot stays counted: it becomes the caller's machine)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        while entry.spares:
            machine = entry.spares.popleft()
            if machine.alive:
                self._refill(entry)
                return machine
            self.pool._discard(machine)
        self._refill(entry)
        return None

    def consider(self, dep: Deployment, init_ms: float) -> None:
        """After a start of ``dep`` by boot and Init: make its template if it would pay."""
        if not self.enabled or dep.runtime not in FORKABLE_RUNTIMES:
            return
        if dep.isolation != PER_CALL and init_ms < self.min_init_ms:
            return
        key = (dep.version_id, dep.executed_version)
        if key in self._entries or time.monotonic() - self._failed.get(key, -RETRY_S) < RETRY_S:
            return
        if len(self._entries) >= self.max_count and not self._evict_template():
            return
        if not self.pool._reserve_slot():
            return
        entry = Entry(key, dep)
        self._entries[key] = entry
        entry.making = self._spawn(self._make(entry), f"template-{dep.function_name}")

    def retire(self, match: Callable[[Key, Deployment], bool]) -> int:
        """Retire every template whose (key, deployment) matches: no more forks; it ends after its last."""
        gone = [entry for key, entry in self._entries.items() if match(key, entry.dep)]
        for entry in gone:
            self._drop(entry)
        return len(gone)

    def evict(self) -> bool:
        """Free one machine slot for another use: a spare, else an unused template (LRU first)."""
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if entry.spares:
                self.pool._discard(entry.spares.pop())
                return True
        return self._evict_template()

    def expire(self, idle_ttl_s: float) -> int:
        """Retire templates unused for ``idle_ttl_s`` and those that died; the health loop calls this."""
        now = time.monotonic()
        old = [e for e in self._entries.values() if e.snapshot is not None and
               (now - e.last_used >= idle_ttl_s or not e.snapshot.alive)]
        for entry in old:
            self._drop(entry)
        return len(old)

    def stats(self) -> dict[str, dict[str, int]]:
        """runtime → {"templates", "spares"}."""
        out: dict[str, dict[str, int]] = {}
        for entry in self._entries.values():
            counts = out.setdefault(entry.dep.runtime, {"templates": 0, "spares": 0})
            counts["templates"] += entry.snapshot is not None  # made: one being made forks nothing yet
            counts["spares"] += len(entry.spares)
        return out

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in list(self._entries.values()):
            self._drop(entry, now=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---------------------------------------------------------------- internals

    def _spawn(self, work: Awaitable, name: str) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _make(self, entry: Entry) -> None:
        """Boot a forkable machine, initialise it, make it the template (its slot is already counted)."""
        dep = entry.dep
        machine = None
        try:
            layer = await self.pool._layer_path(dep.layer_sha256) if dep.layer_sha256 else None
            spec = MachineSpec(runtime=dep.runtime, memory_mb=dep.memory_mb, layer=layer)
            machine = await self.pool.driver.create(spec, forkable=True)  # type: ignore[call-arg]
            await self._init(machine, dep)
            timeout = max(loading.DEFAULT_INIT_TIMEOUT_S, dep.timeout_s)  # its before-snapshot hooks run now
            entry.snapshot = await self.pool.driver.snapshot(machine, timeout)  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            if machine is not None:
                await _quietly(machine.kill())
            self._forget(entry)
            raise
        except Exception as exc:  # a template that cannot be made is not kept (nor tried again for a while)
            log.info("no function template for %s (%s): %s", dep.function_name, dep.executed_version, exc)
            if machine is not None:
                await _quietly(machine.kill())
            self._note_failure(entry.key)
            self._forget(entry)
            return
        finally:
            entry.making = None
        if self._entries.get(entry.key) is not entry:  # retired while it was made
            await _quietly(entry.snapshot.close())
            return
        self._refill(entry)

    def _refill(self, entry: Entry) -> None:
        """Keep a per-call version's spares made ahead, as far as the node has room."""
        if entry.dep.isolation != PER_CALL or entry.snapshot is None:
            return
        while len(entry.spares) + entry.filling < self.spares and self._entries.get(entry.key) is entry:
            if self.pool.total >= self.pool.max_machines or not self.pool._reserve_slot():
                return
            entry.filling += 1
            self._spawn(self._spare(entry), f"spare-{entry.dep.function_name}")

    async def _spare(self, entry: Entry) -> None:
        try:
            assert entry.snapshot is not None
            machine = await entry.snapshot.fork()
        except (MachineError, OSError) as exc:
            entry.filling -= 1
            self.pool._slot_freed()
            log.warning("a spare fork of %s failed: %s", entry.dep.function_name, exc)
            if entry.snapshot is not None and not entry.snapshot.alive:
                self._drop(entry)
            return
        except BaseException:
            entry.filling -= 1
            self.pool._slot_freed()
            raise
        entry.filling -= 1
        if self._entries.get(entry.key) is not entry or self.pool._closing:
            self.pool._discard(machine)
            return
        entry.spares.append(machine)
        self.pool._wake_one()

    def _evict_template(self) -> bool:
        """Retire the least recently used template whose only live forks are its spares."""
        idle = [e for e in self._entries.values() if e.snapshot is not None and e.filling == 0
                and e.snapshot.children <= len(e.spares)]
        if not idle:
            return False
        self._drop(min(idle, key=lambda e: e.last_used))
        return True

    def _note_failure(self, key: Key) -> None:
        """Remember a version whose template failed, for RETRY_S; the memory kept is bounded."""
        now = time.monotonic()
        if len(self._failed) >= FAILED_KEPT:
            self._failed = {k: at for k, at in self._failed.items() if now - at < RETRY_S}
            while len(self._failed) >= FAILED_KEPT:  # that many failures within RETRY_S: the oldest goes
                del self._failed[next(iter(self._failed))]
        self._failed[key] = now

    def _forget(self, entry: Entry) -> None:
        """An entry whose template never came: its slot is free."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self.pool._slot_freed()

    def _drop(self, entry: Entry, now: bool = False) -> None:
        """Retire one template: its spares go, it forks no more, its slot is free; it ends after its last fork."""
        if self._entries.get(entry.key) is not entry:
            return
        if entry.making is not None:
            entry.making.cancel()  # _make forgets it, which frees its slot
            return
        del self._entries[entry.key]
        while entry.spares:
            self.pool._discard(entry.spares.popleft())
        self.pool._slot_freed()
        snapshot = entry.snapshot
        if snapshot is not None:
            self._spawn(snapshot.close() if now else snapshot.retire(), f"retire-{entry.dep.function_name}")


async def _quietly(work: Awaitable) -> None:
    with contextlib.suppress(Exception):
        await work
