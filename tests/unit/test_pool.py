"""The pool's decisions (hot/warm/cold, isolation per version, recycling, capacity) against an in-memory driver.

The in-memory machines below stand in for sandboxes only here, where the subject is the pool's
bookkeeping; tests/integration runs the same flows on real bwrap machines.
"""

import asyncio
import dataclasses
import itertools
import time
from types import SimpleNamespace

import orjson
import pytest

from nimbus import protocol
from nimbus.agent.contract import LAYER_DIR
from nimbus.deployment import Deployment
from nimbus.errors import InitFailed, MachineDied, MachineTimeout, Unavailable
from nimbus.machines.base import MachineSpec
from nimbus.pool import Pool, blanks_needed

_ids = itertools.count(1)


class MemoryMachine:
    def __init__(self, spec: MachineSpec, driver: "MemoryDriver") -> None:
        self.id = f"m{next(_ids)}"
        self.runtime = spec.runtime
        self.spec = spec
        self.created_at = time.monotonic()
        self.uses = 0
        self.loaded: str | None = None  # the function_name whose code is in this machine
        self.driver = driver
        self._alive = True
        self.pings = 0

    @property
    def alive(self) -> bool:
        return self._alive

    async def start(self) -> None:
        pass

    async def request(self, header, blob=b"", timeout=None):
        if not self._alive:
            raise MachineDied("dead")
        kind = header["type"]
        if kind == protocol.INIT:
            assert self.loaded is None, "a machine must be initialised once"
            if blob == b"bad":
                return {"type": protocol.ERROR, "error": {"type": "SyntaxError", "message": "bad", "stack": ""},
                        "fatal": True}, b""
            self.loaded = header["function_name"]
            self.init_header = header
            return {"type": protocol.INIT_OK}, b""
        if kind == protocol.EXEC:
            self.uses += 1
            if blob == b'"hang"':
                await self.kill()
                raise MachineTimeout("slow")
            return {"type": protocol.RESULT, "logs": ""}, orjson.dumps({"machine": self.id, "fn": self.loaded})
        raise AssertionError(kind)

    async def ping(self, timeout=1.0) -> bool:
        self.pings += 1
        await asyncio.sleep(self.driver.ping_delay)
        return self._alive and not self.driver.pings_fail

    async def stop(self) -> None:
        await self.kill()

    async def kill(self) -> None:
        if self._alive:
            self._alive = False
            self.driver.destroyed.append(self)


class FakeClock:
    """Time that moves only when the test says so; the pool's demand estimate and the driver's boots use it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def __call__(self) -> float:
        return self.now

    @property
    def sleeping(self) -> int:
        return sum(not fut.done() for _, fut in self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = [fut for at, fut in self._sleepers if at <= self.now]
        self._sleepers = [(at, fut) for at, fut in self._sleepers if at > self.now]
        for fut in due:
            if not fut.done():
                fut.set_result(None)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        fut = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, fut))
        await fut


class MemoryDriver:
    name = "memory"

    def __init__(self, clock: FakeClock | None = None, boot_s: float = 0.0) -> None:
        self.clock = clock  # with a clock, a machine takes boot_s of its time to start
        self.boot_s = boot_s
        self.created: list[MemoryMachine] = []
        self.destroyed: list[MemoryMachine] = []
        self.pings_fail = False
        self.ping_delay = 0.0
        self.fail_create = False

    async def create(self, spec: MachineSpec) -> MemoryMachine:
        await asyncio.sleep(0)
        if self.clock is not None:
            await self.clock.sleep(self.boot_s)
        if self.fail_create:
            from nimbus.errors import MachineStartError

            raise MachineStartError("no")
        machine = MemoryMachine(spec, self)
        self.created.append(machine)
        return machine

    async def close(self) -> None:
        pass


def dep(name="a", version=1, runtime="python3", memory_mb=128, code=b"ok") -> Deployment:
    return Deployment(version_id=f"{name}-v{version}", function_id=name, function_name=name, version=version,
                      runtime=runtime, handler="main.handler", env={}, memory_mb=memory_mb, timeout_s=5,
                      concurrency=10, code_sha256=code.decode())


async def load_code(d: Deployment) -> bytes:
    return d.code_sha256.encode()


@pytest.fixture
async def pool():
    driver = MemoryDriver()
    p = Pool(driver, load_code, runtimes=["python3"], min_warm=0, max_machines=4, health_interval_s=3600)
    yield p
    await p.close()


async def run(pool: Pool, d: Deployment, event=b"{}"):
    """One call; returns what the lease said (a lease is reused once released, so it is copied first)."""
    lease = await pool.acquire(d)
    seen = SimpleNamespace(start=lease.start, machine=lease.machine)
    healthy = True
    try:
        reply, blob = await lease.machine.request({"type": protocol.EXEC}, event)
        return seen, orjson.loads(blob)
    except MachineTimeout:
        healthy = False
        raise
    finally:
        pool.release(lease, healthy=healthy)


async def test_cold_then_hot_reuses_the_same_machine(pool):
    first, out1 = await run(pool, dep())
    second, out2 = await run(pool, dep())
    assert (first.start, second.start) == ("cold", "hot")
    assert out1["machine"] == out2["machine"]


async def wait_blanks(p: Pool, count: int) -> None:
    for _ in range(100):
        if p.stats()["python3"]["blank"] == count:
            return
        await asyncio.sleep(0.01)
    assert p.stats()["python3"]["blank"] == count


async def test_warm_start_takes_a_prebooted_blank_machine():
    driver = MemoryDriver()
    p = Pool(driver, load_code, runtimes=["python3"], min_warm=2, max_machines=8, health_interval_s=3600)
    await p.start()
    try:
        await wait_blanks(p, 2)
        lease, _ = await run(p, dep())
        assert lease.start == "warm"
        await wait_blanks(p, 2)  # the pre-warm loop refills what was taken
    finally:
        await p.close()
    assert all(not m.alive for m in driver.created)


async def test_a_function_with_a_layer_never_takes_a_blank_machine_and_mounts_its_own():
    driver = MemoryDriver()
    asked: list[str] = []

    async def layer_path(sha: str) -> str:
        asked.append(sha)
        return f"/layers/{sha}"

    p = Pool(driver, load_code, runtimes=["python3"], min_warm=1, max_machines=8, health_interval_s=3600,
             layer_path=layer_path)
    await p.start()
    try:
        await wait_blanks(p, 1)
        layered = dataclasses.replace(dep("lay"), layer_sha256="ab" * 32)
        first, _ = await run(p, layered)
        second, _ = await run(p, layered)
        assert (first.start, second.start) == ("cold", "hot")  # the blank machine has no layer: not used
        assert first.machine.spec.layer == f"/layers/{'ab' * 32}" and asked == ["ab" * 32]
        assert first.machine.init_header["layer"] == LAYER_DIR
        assert p.stats()["python3"]["blank"] == 1
        plain, _ = await run(p, dep("plain"))
        assert plain.start == "warm" and plain.machine.spec.layer is None
        assert "layer" not in plain.machine.init_header
    finally:
        await p.close()


async def test_a_layer_that_cannot_be_had_frees_its_slot(pool):
    layered = dataclasses.replace(dep("lay"), layer_sha256="cd" * 32)
    with pytest.raises(Unavailable, match="cannot mount dependency layers"):
        await pool.acquire(layered)  # the fixture's pool was given no layer_path
    assert pool.total == 0


async def test_a_machine_that_ran_one_function_never_serves_another(pool):
    a, out_a = await run(pool, dep("a"))
    b, out_b = await run(pool, dep("b"))
    assert out_a["machine"] != out_b["machine"]
    assert (a.start, b.start) == ("cold", "cold")
    # and the idle machine of a is still a's
    again, out = await run(pool, dep("a"))
    assert again.start == "hot" and out["fn"] == "a"


async def test_new_version_does_not_reuse_old_versions_machine(pool):
    await run(pool, dep("a", 1))
    lease, _ = await run(pool, dep("a", 2))
    assert lease.start == "cold"


async def test_retire_function_destroys_its_idle_machines(pool):
    await run(pool, dep("a", 1))
    assert pool.retire_function("a", keep_version_id="a-v2") == 1
    await pool.drain_reaping()
    assert pool.driver.destroyed and pool.total == 0


async def test_busy_machine_of_retired_function_dies_on_release(pool):
    lease = await pool.acquire(dep("a", 1))
    pool.retire_function("a")
    pool.release(lease)
    await pool.drain_reaping()
    assert not lease.machine.alive and pool.total == 0


async def test_init_failure_destroys_the_machine_and_reports_the_error(pool):
    with pytest.raises(InitFailed) as info:
        await pool.acquire(dep("a", code=b"bad"))
    assert info.value.error["type"] == "SyntaxError"
    assert info.value.start == "cold"
    await pool.drain_reaping()
    assert pool.total == 0 and pool.stats()["python3"]["busy"] == 0


async def test_unhealthy_release_destroys_and_next_call_starts_fresh(pool):
    with pytest.raises(MachineTimeout):
        await run(pool, dep(), event=b'"hang"')
    lease, _ = await run(pool, dep())
    assert lease.start == "cold"


async def test_max_uses_recycles_a_machine():
    driver = MemoryDriver()
    p = Pool(driver, load_code, runtimes=["python3"], min_warm=0, max_uses=2, health_interval_s=3600)
    try:
        starts = [(await run(p, dep()))[0].start for _ in range(3)]
        assert starts == ["cold", "hot", "cold"]
    finally:
        await p.close()


async def test_capacity_evicts_the_least_recently_used_idle_machine(pool):
    for name in "abcd":
        await run(pool, dep(name))
    assert pool.total == 4
    lease, _ = await run(pool, dep("e"))
    assert lease.start == "cold" and pool.total == 4
    await pool.drain_reaping()
    assert [m.loaded for m in pool.driver.destroyed] == ["a"]


async def test_full_node_waits_for_a_release():
    driver = MemoryDriver()
    p = Pool(driver, load_code, runtimes=["python3"], min_warm=0, max_machines=1, health_interval_s=3600)
    try:
        held = await p.acquire(dep("a"))
        waiting = asyncio.create_task(p.acquire(dep("b")))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        p.release(held)
        lease = await asyncio.wait_for(waiting, 1)
        assert lease.start == "cold" and lease.machine.loaded == "b"
        p.release(lease)
    finally:
        await p.close()


async def test_health_round_drops_failing_and_idle_expired_machines():
    driver = MemoryDriver()
    p = Pool(driver, load_code, runtimes=["python3"], min_warm=0, idle_ttl_s=0.05, health_interval_s=3600)
    try:
        await run(p, dep("a"))
        assert await p.check_health() == 0 and p.stats()["python3"]["idle"] == 1
        await asyncio.sleep(0.06)
        assert await p.check_health() == 1 and p.stats()["python3"]["idle"] == 0
        await run(p, dep("a"))
        driver.pings_fail = True
        assert await p.check_health() == 1
    finally:
        await p.close()


async def test_machine_start_failure_is_unavailable_and_frees_the_slot(pool):
    pool.driver.fail_create = True
    with pytest.raises(Unavailable):
        await pool.acquire(dep())
    assert pool.total == 0


async def test_a_call_waits_for_its_idle_machine_to_come_back_from_a_ping(pool):
    lease = await pool.acquire(dep())
    machine = lease.machine
    pool.release(lease)
    pool.driver.ping_delay = 0.02
    check = asyncio.create_task(pool.check_health())
    await asyncio.sleep(0.005)  # the round has the idle machine out for its ping
    assert pool.stats()["python3"]["idle"] == 0
    again = await pool.acquire(dep())
    assert again.start == "hot" and again.machine is machine and len(pool.driver.created) == 1
    pool.release(again)
    await check


async def test_a_ping_that_hangs_holds_a_call_back_only_briefly(pool):
    lease = await pool.acquire(dep())
    pool.release(lease)
    pool.driver.ping_delay = 30  # a machine that does not answer its ping
    check = asyncio.create_task(pool.check_health())
    await asyncio.sleep(0.005)
    other = await pool.acquire(dep())  # waits PING_WAIT_S once, then starts a machine of its own
    assert other.start == "cold" and other.machine is not lease.machine
    pool.release(other)
    check.cancel()


async def test_health_round_does_not_make_prewarm_overfill():
    driver = MemoryDriver()
    p = Pool(driver, load_code, runtimes=["python3"], min_warm=2, max_machines=8, health_interval_s=3600)
    await p.start()
    try:
        await wait_blanks(p, 2)
        driver.ping_delay = 0.02
        for _ in range(5):  # the pre-warm loop runs while blanks are out for a ping: it must not count them missing
            check = asyncio.create_task(p.check_health())
            await asyncio.sleep(0.005)
            p._refill.set()
            await check
        await asyncio.sleep(0.05)
        assert p.stats()["python3"]["blank"] == 2 and len(driver.created) == 2
    finally:
        await p.close()


# ---------------------------------------------------------------- the pool sizes itself


async def until(check, tries: int = 500) -> None:
    """Let the pool's loops run until ``check()`` holds (a generous bound, not a timing assertion)."""
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.01)
    assert check()


def autoscaled_pool(clock: FakeClock, *, min_warm=1, max_warm=8, boot_s=0.5, **kwargs) -> Pool:
    return Pool(MemoryDriver(clock, boot_s), load_code, runtimes=["python3"], min_warm=min_warm, max_warm=max_warm,
                autoscale_window_s=10, max_machines=256, health_interval_s=3600, clock=clock, **kwargs)


async def cold_burst(p: Pool, clock: FakeClock, count: int, **dep_args) -> None:
    """``count`` calls of new functions at once: each needs a machine that boots in ``boot_s``."""
    calls = [asyncio.create_task(p.acquire(dep(f"burst{next(_ids)}", **dep_args))) for _ in range(count)]
    await until(lambda: clock.sleeping >= count)
    clock.advance(p.driver.boot_s)
    for lease in await asyncio.gather(*calls):
        p.release(lease)


def test_blanks_needed_is_littles_law_with_a_poisson_margin():
    """The sizing rule itself: starts during one boot (rate × boot), plus √ of that, rounded up."""
    assert blanks_needed(rate=3.0, boot_s=0.5, window_s=10) == 3  # load 1.5 -> 1.5 + 1.22
    assert blanks_needed(rate=100.0, boot_s=0.01, window_s=10) == 2  # load 1 -> 2
    assert blanks_needed(rate=20.0, boot_s=0.5, window_s=10) == 14  # load 10 -> 13.2
    assert blanks_needed(rate=0.15, boot_s=5.0, window_s=10) == 0  # under two starts in the window: no rate


async def test_target_rises_under_a_burst_of_starts_and_decays_to_min_warm_when_idle():
    """A burst of warm/cold starts raises the blank target; with no more starts it decays back to min_warm."""
    clock = FakeClock()
    p = autoscaled_pool(clock, min_warm=1)
    try:
        assert p.autoscale() == {"python3": 1}
        await cold_burst(p, clock, 30)
        # 30 starts in a 10 s window: 3 starts/s, boots measured at 0.5 s -> load 1.5 -> 3 blanks
        assert p.autoscale() == {"python3": 3} and p.stats()["python3"]["target"] == 3
        targets = []
        for _ in range(8):
            clock.advance(10)
            targets.append(p.autoscale()["python3"])
        assert targets == sorted(targets, reverse=True) and targets[0] == 2 and targets[-1] == 1, targets
    finally:
        await p.close()


async def test_target_is_clamped_to_max_warm():
    """However large the burst, the pool keeps no more than max_warm blank machines per runtime."""
    clock = FakeClock()
    p = autoscaled_pool(clock, min_warm=0, max_warm=2)
    try:
        await cold_burst(p, clock, 200)  # unclamped: 20 starts/s x 0.5 s -> 14
        assert p.autoscale() == {"python3": 2}
    finally:
        await p.close()


async def test_hot_starts_and_odd_sized_machines_do_not_raise_the_target():
    """Only starts a blank machine could have served count: not hot ones, not other memory sizes."""
    clock = FakeClock()
    p = autoscaled_pool(clock, min_warm=0, boot_s=0.0)
    try:
        for _ in range(30):
            await run(p, dep("same"))  # one cold start, 29 hot
        p.driver.boot_s = 0.5
        await cold_burst(p, clock, 30, memory_mb=512)  # blank machines are 128 MB: these never fit one
        assert p.autoscale() == {"python3": 0}
        await cold_burst(p, clock, 30)  # the same burst at the blank size does count
        assert p.autoscale()["python3"] >= 1
    finally:
        await p.close()


async def test_prewarm_loop_boots_up_to_the_target_and_destroys_the_surplus():
    """The background loop, not the call path, moves the blank count to the target, both ways."""
    clock = FakeClock()
    p = autoscaled_pool(clock, min_warm=0, max_warm=8, prewarm_interval_s=0.01)
    await p.start()
    try:
        await cold_burst(p, clock, 30)
        await until(lambda: p.stats()["python3"]["booting"] == 3)  # target 3, as computed above
        await until(lambda: clock.sleeping >= 3)  # the boots are under way: advancing now finishes them
        clock.advance(0.5)
        await until(lambda: p.stats()["python3"]["blank"] == 3)
        lease = await p.acquire(dep("warm"))
        assert lease.start == "warm"
        p.release(lease)
        await until(lambda: p.stats()["python3"]["booting"] == 1)  # the taken blank is replaced
        await until(lambda: clock.sleeping >= 1)
        clock.advance(0.5)
        await until(lambda: p.stats()["python3"]["blank"] == 3)
        blanks = list(p._blank["python3"])
        clock.advance(120)  # idle: the rate decays, the target falls to min_warm, the surplus goes
        await until(lambda: p.stats()["python3"] == {"blank": 0, "booting": 0, "idle": 31, "busy": 0, "target": 0})
        await p.drain_reaping()
        assert all(not m.alive for m in blanks) and p.total == 31
    finally:
        await p.close()


def test_max_warm_below_min_warm_is_refused():
    """A ceiling under the floor is a configuration error, caught at start rather than ignored."""
    from pydantic import ValidationError

    from nimbus.config import Settings

    with pytest.raises(ValidationError, match="MAX_WARM"):
        Settings(min_warm=3, max_warm=2)
    assert Settings(min_warm=2, max_warm=2).max_warm == 2
    with pytest.raises(ValueError):
        Pool(MemoryDriver(), load_code, runtimes=["python3"], min_warm=3, max_warm=2)
