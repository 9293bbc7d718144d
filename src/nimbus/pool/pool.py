"""The warm pool: blank machines per runtime, idle initialised machines per function version.

``acquire`` prefers, in order: an idle machine already initialised with this version (*hot*), a fork of
the version's function template (*forked*: ``snapshots.py``), a pre-booted blank machine of the runtime
that is then initialised (*warm*), a new machine (*cold*). A ``per-call`` version's machines serve one
call each and are destroyed after it.
A machine that has loaded one version's code serves only that version until it is destroyed: the
rule that keeps one function from ever seeing another's memory, files or environment. A version here is
a revision *as* a version (``$LATEST`` or a published number, ``Deployment.executed_version``): the same
revision run as ``$LATEST`` and as ``1`` has machines of each, since the function sees which it is.

Two loops run beside the calls: the pre-warm loop keeps each runtime's *target* of blank machines
booted (and destroys the surplus), and the health loop pings idle machines and retires the old, the
unhealthy and the long idle (``idle_ttl_s``). How many blank machines to keep: ``demand.py``.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nimbus.deployment import LATEST, PER_CALL, Deployment
from nimbus.errors import MachineError, Unavailable
from nimbus.machines.base import DEFAULT_MEMORY_MB, Driver, Machine, MachineSpec
from nimbus.pool import loading, snapshots
from nimbus.pool.demand import Demand

log = logging.getLogger("nimbus.pool")

PREWARM_INTERVAL_S = 1.0
PREWARM_BACKOFF_MAX_S = 30.0
DEFAULT_MAX_WARM = 8
DEFAULT_AUTOSCALE_WINDOW_S = 30.0
PING_WAIT_S = 0.1  # how long a call waits for its idle machine to come back from a health ping


Key = tuple[str, str]  # (version_id, executed_version): which machines may serve a deployment


def key_of(dep: Deployment) -> Key:
    return (dep.version_id, dep.executed_version)


@dataclass(slots=True, eq=False)
class Lease:
    """A machine handed out for one call; give it back with ``Pool.release``."""

    machine: Machine
    deployment: Deployment
    start: str  # "cold" | "warm" | "forked" | "hot"
    idle_since: float = 0.0


CodeLoader = Callable[[Deployment], Awaitable[bytes]]  # a package as ``packages.to_machine`` makes it
LayerPath = Callable[[str], Awaitable[str]]  # a layer's sha256 → its unpacked directory on this host


async def _no_layers(sha256: str) -> str:
    raise Unavailable(f"this node cannot mount dependency layers (layer {sha256[:12]})")


class Pool:
    """Owns every machine on the node and decides which one serves a call."""

    def __init__(
        self,
        driver: Driver,
        code_loader: CodeLoader,
        *,
        runtimes: list[str],
        min_warm: int = 1,
        max_warm: int | None = None,
        autoscale_window_s: float = DEFAULT_AUTOSCALE_WINDOW_S,
        max_machines: int = 64,
        max_age_s: float = 3600.0,
        max_uses: int = 10_000,
        idle_ttl_s: float = 300.0,
        health_interval_s: float = 10.0,
        blank_memory_mb: int = DEFAULT_MEMORY_MB,
        prewarm_interval_s: float = PREWARM_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        layer_path: LayerPath = _no_layers,
        account_id: str = "000000000000",
        region: str = "us-east-1",
        sdk: dict[str, str] | None = None,
        use_snapshots: bool = True,
        eager_snapshots: bool = False,
        snapshot_min_init_ms: float = snapshots.DEFAULT_MIN_INIT_MS,
        max_snapshots: int = snapshots.DEFAULT_MAX_COUNT,
        snapshot_spares: int = snapshots.DEFAULT_SPARES,
    ) -> None:
        """``max_warm`` defaults to ``max(min_warm, DEFAULT_MAX_WARM)``; ``clock`` drives the demand estimate;
        ``layer_path`` finds (unpacking if need be) the directory of a function's dependency layer; ``sdk``:
        runtime → where its machines see the bundled AWS SDK (the driver mounts it), named in their Init;
        ``use_snapshots`` and the three after it: function templates, as ``snapshots.py`` says."""
        if max_warm is None:
            max_warm = max(min_warm, DEFAULT_MAX_WARM)
        if not 0 <= min_warm <= max_warm:
            raise ValueError(f"need 0 <= min_warm ({min_warm}) <= max_warm ({max_warm})")
        if autoscale_window_s <= 0:
            raise ValueError("autoscale_window_s must be positive")
        self.driver = driver
        self._code_loader = code_loader
        self.account_id = account_id  # what functions see in their ARN and AWS_REGION
        self.region = region
        self._layer_path = layer_path
        self._sdk = dict(sdk or {})
        self.runtimes = list(runtimes)
        self.min_warm = min_warm
        self.max_warm = max_warm
        self.autoscale_window_s = autoscale_window_s
        self.prewarm_interval_s = prewarm_interval_s
        self._clock = clock
        self.max_machines = max_machines
        self.max_age_s = max_age_s
        self.max_uses = max_uses
        self.idle_ttl_s = idle_ttl_s
        self.health_interval_s = health_interval_s
        self.blank_memory_mb = blank_memory_mb

        self._blank: dict[str, deque[Machine]] = {rt: deque() for rt in self.runtimes}
        self._demand: dict[str, Demand] = {rt: Demand(min_warm, clock()) for rt in self.runtimes}
        self._idle: dict[Key, deque[Lease]] = {}  # key -> leases, most recently used on the right
        self._booting: dict[str, int] = dict.fromkeys(self.runtimes, 0)
        self._pinging: dict[str, int] = dict.fromkeys(self.runtimes, 0)  # blanks out of their deque for a ping
        self._idle_pinging: dict[Key, int] = {}  # key → its idle machines out for a ping
        self._pings_done: asyncio.Future[None] | None = None  # resolved when the running health round ends
        self._busy: dict[str, int] = {}  # runtime -> machines serving a call
        # function_id -> (the version id still allowed, if any; whether only $LATEST machines are retired)
        self._retired: dict[str, tuple[str | None, bool]] = {}
        self._count = 0  # machines alive or booting: the figure max_machines bounds
        self._waiters: deque[asyncio.Future] = deque()
        self._refill = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._boots: set[asyncio.Task] = set()
        self._boot_failures = 0  # consecutive failed pre-warm boots: the loop backs off
        self._reaping: set[asyncio.Task] = set()
        self._closing = False
        self.starts = {"cold": 0, "warm": 0, "forked": 0, "hot": 0}
        self.snapshots = snapshots.Snapshots(self, self._load, enabled=use_snapshots, eager=eager_snapshots,
                                             min_init_ms=snapshot_min_init_ms, max_count=max_snapshots,
                                             spares=snapshot_spares)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._prewarm_loop(), name="pool-prewarm"),
            asyncio.create_task(self._health_loop(), name="pool-health"),
        ]
        self._refill.set()

    async def close(self) -> None:
        """Stop the loops and destroy every machine not in use; busy ones die on release."""
        self._closing = True
        tasks = [*self._loops, *self._boots]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.snapshots.close()
        for blanks in self._blank.values():
            while blanks:
                self._discard(blanks.popleft())
        for leases in self._idle.values():
            while leases:
                self._discard(leases.pop().machine)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(Unavailable("the node is shutting down"))
        await self.drain_reaping()

    async def drain_reaping(self) -> None:
        """Wait until every machine handed to the reaper is gone."""
        while self._reaping:
            await asyncio.gather(*list(self._reaping), return_exceptions=True)

    # ---------------------------------------------------------------- calls

    async def acquire(self, dep: Deployment) -> Lease:
        """A machine initialised with ``dep``: hot if one is idle, else forked, else warm, else cold.

        Raises ``InitFailed`` when the function's code does not load (the call fails, the machine is
        destroyed), ``Unavailable`` when no machine can be started.
        """
        waited_for_ping = False
        while True:
            if self._closing:
                raise Unavailable("the node is shutting down")
            lease = self._take_idle(dep)
            if lease is not None:
                self.starts["hot"] += 1
                return lease
            key = key_of(dep)  # past the hot path: a hot start allocates nothing
            if self._idle_pinging.get(key) and self._pings_done is not None and not waited_for_ping:
                # Its idle machine is out for a health ping (well under a millisecond when healthy):
                # waiting for it is cheaper than any start. Once, and bounded, for a ping that hangs.
                waited_for_ping = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._pings_done), PING_WAIT_S)
                continue
            template = self.snapshots.ready(key)
            if template is not None:
                spare = self.snapshots.take_spare(key)
                if spare is not None:
                    return self._forked(spare, dep)
            else:
                machine = self._take_blank(dep)
                if machine is not None:
                    return await self._initialise(machine, dep, "warm")
            if self._reserve_slot():
                break
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if template is not None:
            try:
                return self._forked(await template.fork(), dep)
            except MachineError as exc:  # the template is broken: boot this one, and make another later
                log.warning("forking %s from its template failed: %s", dep.function_name, exc)
                self.snapshots.retire(lambda k, _: k == key)
            except BaseException:
                self._slot_freed()
                raise
        began = self._clock()
        try:
            layer = await self._layer_path(dep.layer_sha256) if dep.layer_sha256 else None
            machine = await self.driver.create(MachineSpec(runtime=dep.runtime, memory_mb=dep.memory_mb, layer=layer))
        except MachineError as exc:
            self._slot_freed()
            raise Unavailable(f"could not start a {dep.runtime} machine: {exc}") from exc
        except BaseException:
            self._slot_freed()
            raise
        demand = self._demand.get(dep.runtime)
        if demand is not None and layer is None:
            demand.booted(self._clock() - began)
        return await self._initialise(machine, dep, "cold")

    def _forked(self, machine: Machine, dep: Deployment) -> Lease:
        self._busy[dep.runtime] = self._busy.get(dep.runtime, 0) + 1
        self.starts["forked"] += 1
        return Lease(machine, dep, "forked")

    def release(self, lease: Lease, *, healthy: bool = True) -> None:
        """Give a machine back: kept idle for its version, or destroyed when it should not serve again.

        The lease is the caller's no longer: a hot start hands the same object out again.
        """
        machine, dep = lease.machine, lease.deployment
        self._busy[dep.runtime] -= 1
        now = time.monotonic()
        if (
            not healthy
            or dep.isolation == PER_CALL
            or self._closing
            or not machine.alive
            or machine.uses >= self.max_uses
            or now - machine.created_at >= self.max_age_s
            or self._is_retired(dep)
        ):
            self._discard(machine)
            return
        lease.idle_since = now
        self._idle.setdefault(key_of(dep), deque()).append(lease)
        self._wake_one()  # a caller waiting for capacity may now evict or reuse this machine

    def prepare(self, dep: Deployment) -> None:
        """A version was just deployed: with eager function templates, make its template now (in the
        background), not after its first start."""
        if self.snapshots.eager:
            self.snapshots.consider(dep, float("inf"))

    def retire_function(self, function_id: str, keep_version_id: str | None = None, *,
                        latest_only: bool = False) -> int:
        """Destroy a function's idle machines (all, or all but one revision's); busy ones die on release.

        ``latest_only`` (an update of ``$LATEST``): only machines serving ``$LATEST`` go; published
        versions keep theirs, since their code did not change.
        """
        self._retired[function_id] = (keep_version_id, latest_only)
        self.snapshots.retire(lambda key, dep: dep.function_id == function_id and key[0] != keep_version_id and (
            not latest_only or key[1] == LATEST))
        destroyed = 0
        for key, leases in list(self._idle.items()):
            if leases and leases[0].deployment.function_id == function_id and key[0] != keep_version_id and (
                    not latest_only or key[1] == LATEST):
                while leases:
                    self._discard(leases.pop().machine)
                    destroyed += 1
                del self._idle[key]
        return destroyed

    def retire_version(self, version_id: str, executed_version: str) -> int:
        """Destroy the idle machines of one revision run as ``executed_version`` (a deleted published
        version); a busy one goes idle after its call and is reaped after ``idle_ttl_s``."""
        self.snapshots.retire(lambda key, _: key == (version_id, executed_version))
        leases = self._idle.pop((version_id, executed_version), None) or deque()
        for lease in leases:
            self._discard(lease.machine)
        return len(leases)

    def idle_count(self, version_id: str, executed_version: str = LATEST) -> int:
        """Idle machines kept for one revision run as ``executed_version``, those out for a health ping
        included (a health round takes them off the idle list while it pings them)."""
        key = (version_id, executed_version)
        return len(self._idle.get(key, ())) + self._idle_pinging.get(key, 0)

    def stats(self) -> dict[str, dict[str, int]]:
        """Machines by runtime and state, and ``target`` (blank machines aimed at), for /health, /metrics, tests."""
        out: dict[str, dict[str, int]] = {}
        for rt in set(self.runtimes) | set(self._busy):
            out[rt] = {"blank": len(self._blank.get(rt, ())), "booting": self._booting.get(rt, 0), "idle": 0,
                       "busy": self._busy.get(rt, 0)}
            if rt in self._demand:
                out[rt]["target"] = self._demand[rt].target
        for leases in self._idle.values():
            if leases:
                rt = leases[0].deployment.runtime
                out.setdefault(rt, {"blank": 0, "booting": 0, "idle": 0, "busy": 0})["idle"] += len(leases)
        for rt, counts in self.snapshots.stats().items():
            out.setdefault(rt, {"blank": 0, "booting": 0, "idle": 0, "busy": 0}).update(counts)
        return out

    @property
    def total(self) -> int:
        return self._count

    def autoscale(self) -> dict[str, int]:
        """Fold the starts seen since the last round into each runtime's rate; the new blank targets.

        The pre-warm loop calls this every round; tests call it with an injected clock.
        """
        now = self._clock()
        return {rt: demand.update(now, self.autoscale_window_s, self.min_warm, self.max_warm)
                for rt, demand in self._demand.items()}

    # ---------------------------------------------------------------- internals

    def _is_retired(self, dep: Deployment) -> bool:
        retired = self._retired.get(dep.function_id)
        if retired is None:
            return False
        keep, latest_only = retired
        if latest_only and dep.executed_version != LATEST:
            return False
        return keep != dep.version_id

    def _fresh(self, machine: Machine, now: float) -> bool:
        return machine.alive and now - machine.created_at < self.max_age_s and machine.uses < self.max_uses

    def _take_idle(self, dep: Deployment) -> Lease | None:
        leases = self._idle.get((dep.version_id, dep.executed_version))
        now = time.monotonic()
        while leases:
            lease = leases.pop()
            if self._fresh(lease.machine, now):
                self._busy[dep.runtime] = self._busy.get(dep.runtime, 0) + 1
                lease.deployment, lease.start = dep, "hot"  # reused: no allocation on the hot path
                return lease
            self._discard(lease.machine)
        return None

    def _take_blank(self, dep: Deployment) -> Machine | None:
        if dep.memory_mb != self.blank_memory_mb or dep.layer_sha256:
            return None  # blank machines are booted with the default limits and no layer; others start cold
        blanks = self._blank.get(dep.runtime)
        now = time.monotonic()
        while blanks:
            machine = blanks.popleft()
            self._refill.set()
            if self._fresh(machine, now):
                return machine
            self._discard(machine)
        return None

    def _reserve_slot(self) -> bool:
        """Count a new machine against max_machines, evicting a spare one if the node is full."""
        if self._count >= self.max_machines:
            victim = self._pick_victim()
            if victim is not None:
                self._discard(victim)
            elif not self.snapshots.evict():  # a spare fork or an unused function template, last
                return False
        self._count += 1
        return True

    def _pick_victim(self) -> Machine | None:
        """The least recently used idle machine, else a blank one."""
        oldest: tuple[float, Key] | None = None
        for key, leases in self._idle.items():
            if leases and (oldest is None or leases[0].idle_since < oldest[0]):
                oldest = (leases[0].idle_since, key)
        if oldest is not None:
            return self._idle[oldest[1]].popleft().machine
        for blanks in self._blank.values():
            if blanks:
                return blanks.popleft()
        return None

    async def _initialise(self, machine: Machine, dep: Deployment, start: str) -> Lease:
        if dep.memory_mb == self.blank_memory_mb and not dep.layer_sha256:  # a blank could serve it: demand
            demand = self._demand.get(dep.runtime)
            if demand is not None:
                demand.arrivals += 1
        self._busy[dep.runtime] = self._busy.get(dep.runtime, 0) + 1
        try:
            reply = await self._load(machine, dep, start)
        except BaseException:
            self._failed_init(machine, dep)
            raise
        self.starts[start] += 1
        duration = reply.get("duration_ms")
        self.snapshots.consider(dep, float(duration) if isinstance(duration, int | float) else 0.0)
        return Lease(machine, dep, start)

    async def _load(self, machine: Machine, dep: Deployment, start: str = "cold") -> dict:
        """Send ``dep``'s Init to ``machine``; its ``init_ok`` reply, or ``InitFailed`` (the caller ends it)."""
        code = await self._code_loader(dep)
        return await loading.initialise(machine, dep, code, start, account_id=self.account_id, region=self.region,
                                        sdk=self._sdk.get(dep.runtime))

    def _failed_init(self, machine: Machine, dep: Deployment) -> None:
        self._busy[dep.runtime] -= 1
        self._discard(machine)

    def _discard(self, machine: Machine) -> None:
        """Forget a machine now (its slot is free at once) and destroy it in the background."""
        self._slot_freed()
        task = asyncio.create_task(_destroy(machine), name=f"reap-{machine.id}")
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
        self._refill.set()

    def _slot_freed(self) -> None:
        self._count -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ---------------------------------------------------------------- loops

    async def _prewarm_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as the event
            # is set, and close() then waits for this loop for ever (a unit test caught it).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.prewarm_interval_s):
                    await self._refill.wait()
            if self._boot_failures:  # the driver is failing: back off rather than hammer it
                await asyncio.sleep(min(PREWARM_BACKOFF_MAX_S, 0.5 * 2 ** min(self._boot_failures, 8)))
            self._refill.clear()
            self._rebalance()

    def _rebalance(self) -> None:
        """One pre-warm round: new targets, then destroy surplus blanks or start boots for the deficit.

        Boots run as tasks of their own, so a replacement starts as soon as a blank is taken, not after
        the previous batch: the lead time the sizing rule assumes is one boot.
        """
        self.autoscale()
        for rt in self.runtimes:
            blanks = self._blank[rt]
            surplus = len(blanks) + self._booting[rt] + self._pinging[rt] - self._demand[rt].target
            while surplus > 0 and blanks:
                self._discard(blanks.popleft())  # the oldest: nearest to max_age
                surplus -= 1
            while surplus < 0 and self._count < self.max_machines and not self._closing:
                self._count += 1
                self._booting[rt] += 1
                task = asyncio.create_task(self._boot_blank(rt), name=f"prewarm-{rt}")
                self._boots.add(task)
                task.add_done_callback(self._boots.discard)
                surplus += 1

    async def _boot_blank(self, runtime: str) -> None:
        began = self._clock()
        try:
            machine = await self.driver.create(MachineSpec(runtime=runtime, memory_mb=self.blank_memory_mb))
        except asyncio.CancelledError:
            self._booting[runtime] -= 1
            self._slot_freed()
            raise
        except Exception as exc:
            self._booting[runtime] -= 1
            self._boot_failures += 1
            self._slot_freed()
            log.warning("pre-warming a %s machine failed: %s", runtime, exc)
            return
        self._booting[runtime] -= 1
        self._boot_failures = 0
        self._demand[runtime].booted(self._clock() - began)
        if self._closing:
            self._discard(machine)
            return
        self._blank[runtime].append(machine)
        self._wake_one()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.check_health()
            except Exception:  # the loop must outlive any one bad round
                log.exception("pool health round failed")

    async def check_health(self) -> int:
        """One health round: retire expired machines, ping the rest. Returns how many were destroyed."""
        now = time.monotonic()
        destroyed = 0
        checks: list[tuple[str, Any, Any]] = []  # (kind, runtime or key, a Machine or a Lease)
        for rt, blanks in self._blank.items():
            for machine in list(blanks):
                blanks.remove(machine)
                if self._fresh(machine, now):
                    checks.append(("blank", rt, machine))
                    self._pinging[rt] += 1
                else:
                    self._discard(machine)
                    destroyed += 1
        for key, leases in list(self._idle.items()):
            for lease in list(leases):
                leases.remove(lease)
                if self._fresh(lease.machine, now) and now - lease.idle_since < self.idle_ttl_s:
                    checks.append(("idle", key, lease))
                    self._idle_pinging[key] = self._idle_pinging.get(key, 0) + 1
                else:  # past its idle TTL: whatever version it serves holds no machine once unused that long
                    self._discard(lease.machine)
                    destroyed += 1
            if not leases:
                self._idle.pop(key, None)
        machines = [item[2] if item[0] == "blank" else item[2].machine for item in checks]
        done = self._pings_done = asyncio.get_running_loop().create_future()
        try:
            answers = await asyncio.gather(*(m.ping() for m in machines), return_exceptions=True)
        finally:
            for kind, key, _ in checks:
                if kind == "blank":
                    self._pinging[key] -= 1
                elif self._idle_pinging[key] > 1:
                    self._idle_pinging[key] -= 1
                else:
                    del self._idle_pinging[key]
        for (kind, key, item), machine, ok in zip(checks, machines, answers, strict=True):
            if ok is not True or self._closing:
                self._discard(machine)
                destroyed += 1
            elif kind == "blank":
                self._blank[key].append(item)
            else:
                self._idle.setdefault(key, deque()).appendleft(item)
        destroyed += self.snapshots.expire(self.idle_ttl_s)
        if self._pings_done is done:
            self._pings_done = None
        done.set_result(None)  # callers that found their idle machine out for a ping look again
        if destroyed:
            self._refill.set()
        return destroyed


async def _destroy(machine: Machine) -> None:
    try:
        await machine.stop()
    except Exception:
        log.exception("destroying machine %s failed", machine.id)
        try:
            await machine.kill()
        except Exception:
            pass
