"""The pool's decisions (hot/warm/cold, isolation per version, recycling, capacity) against an in-memory driver.

The in-memory machines below stand in for sandboxes only here, where the subject is the pool's
bookkeeping; tests/integration runs the same flows on real bwrap machines.
"""

import asyncio
import itertools
import time

import orjson
import pytest

from nimbus import protocol
from nimbus.errors import InitFailed, MachineDied, MachineTimeout, Unavailable
from nimbus.machines.base import MachineSpec
from nimbus.pool import Deployment, Pool

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


class MemoryDriver:
    name = "memory"

    def __init__(self) -> None:
        self.created: list[MemoryMachine] = []
        self.destroyed: list[MemoryMachine] = []
        self.pings_fail = False
        self.ping_delay = 0.0
        self.fail_create = False

    async def create(self, spec: MachineSpec) -> MemoryMachine:
        await asyncio.sleep(0)
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
    lease = await pool.acquire(d)
    healthy = True
    try:
        reply, blob = await lease.machine.request({"type": protocol.EXEC}, event)
        return lease, orjson.loads(blob)
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
