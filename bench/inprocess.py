"""In-process figures on the real Pool and the real bwrap driver: hot acquire, an idle machine's PSS, and
where a cold start goes (``driver.create`` then Init) for a booted machine and for one forked from a template."""

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import NOOP_CODE, tree_memory_kib
from nimbus import protocol
from nimbus.deployment import Deployment
from nimbus.machines.bwrap import BwrapDriver
from nimbus.pool import Pool


def deployment(i: int = 0) -> Deployment:
    return Deployment(version_id=f"bench-v{i}", function_id=f"bench-f{i}", function_name=f"bench-{i}", version=1,
                      runtime="python3", handler="main.handler", env={}, memory_mb=128, timeout_s=30.0,
                      concurrency=1, code_sha256=f"bench-{i}")


async def _load_code(dep: Deployment) -> bytes:
    return NOOP_CODE.encode()


async def _exec(lease) -> None:
    header = {"type": protocol.EXEC, "invocation_id": "bench", "deadline_ms": 30_000}
    reply, _ = await lease.machine.request(header, b"{}", timeout=30)
    if reply.get("type") != protocol.RESULT:
        raise RuntimeError(f"exec failed: {reply}")


async def _cold_parts(driver: BwrapDriver, n: int) -> dict[str, float]:
    """Where an in-process cold start goes: ``driver.create`` (sandbox up, agent answers ping), then Init."""
    from nimbus.machines.base import MachineSpec

    create, init = [], []
    warm_up = await driver.create(MachineSpec(runtime="python3", memory_mb=256))  # a template, if any, starts
    await warm_up.stop()
    for i in range(n):
        t0 = time.perf_counter()
        machine = await driver.create(MachineSpec(runtime="python3", memory_mb=256))
        t1 = time.perf_counter()
        header = {"type": protocol.INIT, "runtime": "python3", "handler": "main.handler", "filename": "main.py",
                  "env": {}, "memory_mb": 256, "timeout_s": 30.0, "function_name": f"cold-{i}", "function_version": "1"}
        reply, _ = await machine.request(header, NOOP_CODE.encode(), timeout=30)
        t2 = time.perf_counter()
        if reply.get("type") != protocol.INIT_OK:
            raise RuntimeError(f"init failed: {reply}")
        create.append(t1 - t0)
        init.append(t2 - t1)
        await machine.stop()
    return {"create_p50_ms": statistics.median(create) * 1000, "init_p50_ms": statistics.median(init) * 1000,
            "samples": n, "cgroups": driver.cgroup_note, "seccomp": driver.seccomp_note}


async def _measure(n_acquire: int, n_pss: int) -> dict[str, dict]:
    home = Path(tempfile.mkdtemp(prefix="nimbus-bench-pool-"))
    driver = BwrapDriver(home)
    # No start(): no pre-warm or health loop, so nothing but the calls below touches the pool.
    pool = Pool(driver, _load_code, runtimes=["python3"], min_warm=0, max_machines=n_pss + 4)
    try:
        # Hot acquire: one machine initialised with the function, idle; acquire and release it n times.
        dep = deployment(0)
        lease = await pool.acquire(dep)
        await _exec(lease)
        pool.release(lease)
        acquire, release = [], []
        clock = time.perf_counter_ns
        for _ in range(n_acquire):
            t0 = clock()
            lease = await pool.acquire(dep)
            t1 = clock()
            pool.release(lease)
            t2 = clock()
            acquire.append(t1 - t0)
            release.append(t2 - t1)
            if lease.start != "hot":
                raise RuntimeError(f"expected a hot start, got {lease.start}")
        acquire.sort()
        hot = {"value": statistics.median(acquire) / 1000, "p99_us": acquire[len(acquire) * 99 // 100] / 1000,
               "release_p50_us": statistics.median(release) / 1000, "samples": n_acquire}

        # PSS: n_pss machines side by side (as on a node, so shared pages are split as they would be),
        # each initialised with the no-op function and having run it once, then left idle.
        leases = [lease for lease in [await pool.acquire(deployment(i)) for i in range(1, n_pss + 1)]]
        for lease in leases:
            await _exec(lease)
        for lease in leases:
            pool.release(lease)
        await asyncio.sleep(0.2)
        per_machine = [tree_memory_kib(lease.machine.pid) for lease in leases]
        pss = [m["pss_kib"] / 1024 for m in per_machine]
        memory = {"value": statistics.median(pss), "unit": "MiB", "machines_side_by_side": n_pss,
                  "pss_mib_each": [round(p, 2) for p in pss],
                  "rss_mib_median": statistics.median(m["rss_kib"] / 1024 for m in per_machine),
                  "processes_per_machine": per_machine[0]["processes"]}
        for held in [*leases, lease]:
            pool.retire_function(held.deployment.function_id)
        await pool.drain_reaping()
        boot = BwrapDriver(Path(tempfile.mkdtemp(prefix="nimbus-bench-boot-")), use_templates=False)
        try:
            booted = await _cold_parts(boot, 15)
        finally:
            await boot.close()
        parts = {"boot": booted, "template": await _cold_parts(driver, 30) if driver.templates_on else None,
                 "templates": driver.templates_note}
        return {"hot_acquire_p50_us": hot, "idle_machine_pss_mib": memory, "cold_parts": parts}
    finally:
        await pool.close()
        await driver.close()


def measure(n_acquire: int = 20_000, n_pss: int = 4) -> dict[str, dict]:
    return asyncio.run(_measure(n_acquire, n_pss))
