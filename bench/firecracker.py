"""Firecracker microVMs: boot to agent ready, and restore from a snapshot to agent ready.

Measured only on a host the firecracker driver can use (``FirecrackerDriver.problems`` empty: KVM, the
firecracker and jailer binaries, a guest kernel and a python3 image, a root node); elsewhere each row
says why it was not measured. The floor, from the same machines: the VMM alone, from spawning the
(jailed) firecracker to its API socket answering (steps ``vmm.start`` + ``api.ready``), which every
machine pays whatever the guest does.
"""

import asyncio
import os
import statistics
from pathlib import Path

from nimbus.machines.base import MachineSpec
from nimbus.machines.firecracker import FirecrackerConfig, FirecrackerDriver

FLOOR_STEPS = ("vmm.start", "api.ready")


def _row(machines: list) -> dict:
    if not machines:
        return {"value": None, "note": "no machine of this kind was made (see the node's log)"}
    ready = [m.ready_ms for m in machines]
    floor = [sum(m.step_ms[s] for s in FLOOR_STEPS) for m in machines]
    steps = {name: statistics.median(m.step_ms[name] for m in machines) for name in machines[0].plan}
    value, floor_ms = statistics.median(ready), statistics.median(floor)
    return {"value": value, "floor": floor_ms, "ratio": value / floor_ms, "samples": len(machines),
            "steps_p50_ms": steps}


async def _measure(home: Path, samples: int) -> dict:
    driver = FirecrackerDriver(home, FirecrackerConfig(snapshots=True))
    problems = driver.problems(["python3"])
    if problems:
        note = "not measured here: " + "; ".join(problems)
        return {key: {"value": None, "note": note} for key in ("firecracker_boot_p50_ms",
                                                                "firecracker_restore_p50_ms")}
    spec = MachineSpec(runtime="python3")
    try:
        booted, restored = [], []
        for _ in range(samples + 1):  # the first boots and takes the snapshot the others restore
            machine = await driver.create(spec)
            (restored if machine.restored else booted).append(machine)
            await machine.kill()
        # Boots without a snapshot to restore: a driver with snapshots off.
        plain = FirecrackerDriver(home, FirecrackerConfig())
        for _ in range(samples):
            machine = await plain.create(spec)
            booted.append(machine)
            await machine.kill()
        return {"firecracker_boot_p50_ms": _row(booted), "firecracker_restore_p50_ms": _row(restored)}
    finally:
        await driver.close()


def measure(samples: int, home: str | None = None) -> dict:
    """The two rows; ``home`` holds the images and kernel (default ``$NIMBUS_HOME`` or ``./.nimbus``)."""
    home = Path(home or os.environ.get("NIMBUS_HOME", ".nimbus")).resolve()
    return asyncio.run(_measure(home, samples))
