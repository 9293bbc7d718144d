"""The Firecracker driver's process handling, against the TEST STAND-INS for ``firecracker`` and ``jailer``.

No host that develops Nimbus can boot a Firecracker guest, so ``tests/standin`` provides executables
that behave as Firecracker's API schema and vsock documentation say (and as jailer.md says of the jail's
layout), and whose "guest" is a real agent process. Everything of Nimbus here is real: the driver's
ordered steps and their undo stack, the API client, the vsock handshake, the frames, the agent, snapshot
bookkeeping, and a whole node serving HTTP with ``NIMBUS_DRIVER=firecracker``. What is not exercised:
Firecracker's own behaviour, a guest kernel booting, the jailer's chroot, cgroups and privilege drop.

The tests at the end need a KVM host with the real binaries; they are skipped here with that reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from nimbus import protocol
from nimbus.errors import MachineDied, MachineStartError, MachineTimeout
from nimbus.machines.base import MachineSpec
from nimbus.machines.firecracker import FirecrackerConfig, FirecrackerDriver, images, jail
from nimbus.machines.firecracker import api as fcapi
from nimbus.machines.firecracker import driver as fc_driver
from nimbus.machines.firecracker import machine as firecracker

pytestmark = pytest.mark.firecracker

HANDLER = b"import os\n\ndef handler(event, context):\n    return {'n': event['n'] * 2, 'fn': context.function_name}\n"
SPIN = b"def handler(event, context):\n    while True:\n        pass\n"


def init_header(**fields) -> dict:
    return {"type": "init", "runtime": "python3", "handler": "main.handler", "filename": "main.py", "env": {},
            "memory_mb": 128, "timeout_s": 5.0, "function_name": "doubler", "function_version": "1", **fields}


def exec_header() -> dict:
    return {"type": "exec", "invocation_id": "inv-1", "deadline_ms": 5000}


async def init_and_call(machine, n: int = 21, code: bytes = HANDLER) -> dict:
    reply, _ = await machine.request(init_header(), code, timeout=30)
    assert reply["type"] == "init_ok", reply
    reply, output = await machine.request(exec_header(), json.dumps({"n": n}).encode(), timeout=30)
    assert reply["type"] == "result", reply
    return json.loads(output)


@pytest.fixture(scope="module")
def image_home(tmp_path_factory) -> Path:
    """A node home holding a real python3 guest image (the stand-in does not boot it, but the driver finds it)."""
    home = tmp_path_factory.mktemp("fc-home")
    images.build_image(home, "python3")
    return home


@pytest.fixture
def short_dir():
    """A short directory for jails and sockets: a Unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="fc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def binaries(short_dir):
    from standin import install

    installed = install(short_dir)
    return installed.firecracker, installed.jailer


@pytest.fixture
def kernel_file(short_dir) -> Path:
    # Not a kernel: the stand-in only checks that the boot source names an existing file.
    path = short_dir / "vmlinux-standin"
    path.write_bytes(b"\x7fELF stand-in kernel: never booted")
    return path


def make_config(binaries, kernel_file, short_dir, *, jailed: bool, **overrides) -> FirecrackerConfig:
    firecracker_bin, jailer_bin = binaries
    values = dict(firecracker=firecracker_bin, jailer=jailer_bin if jailed else None,
                  chroot_base=short_dir / "jail", uid=os.getuid(), gid=os.getgid(), kernel=kernel_file,
                  run_dir=short_dir / "vms", start_timeout_s=20.0)
    values.update(overrides)
    return FirecrackerConfig(**values)


@pytest.fixture
async def make_driver(image_home, binaries, kernel_file, short_dir):
    drivers = []

    def make(jailed: bool = False, **overrides) -> FirecrackerDriver:
        driver = FirecrackerDriver(image_home, make_config(binaries, kernel_file, short_dir, jailed=jailed,
                                                            **overrides))
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()
    shutil.rmtree(image_home / fc_driver.SNAPSHOTS_DIR, ignore_errors=True)


def leftovers(short_dir: Path) -> list[str]:
    """Files the driver left in its run and jail directories."""
    found = []
    for base in (short_dir / "vms", short_dir / "jail"):
        if base.exists():
            found += [str(p) for p in base.rglob("*") if p.is_file() or p.is_socket()]
    return found


# ---------------------------------------------------------------- the plan


def test_the_plan_is_the_issue_s_order_and_variants_swap_steps():
    assert firecracker.plan() == ("validate.config", "jail.stage", "vmm.start", "api.ready", "boot.source",
                                  "drives.root", "machine.config", "vsock.add", "instance.start", "agent.ready")
    direct = firecracker.plan(jailed=False)
    assert direct[1] == "workdir.stage" and "jail.stage" not in direct
    restore = firecracker.plan(restore=True)
    assert restore == ("validate.config", "jail.stage", "vmm.start", "api.ready", "snapshot.load", "agent.ready")


def test_the_driver_is_registered_by_name():
    from nimbus import machines

    assert machines.driver_class("firecracker") is FirecrackerDriver


# ---------------------------------------------------------------- booting, direct and jailed


async def test_direct_mode_boots_serves_and_leaves_nothing(make_driver, short_dir, caplog):
    driver = make_driver(jailed=False)
    with caplog.at_level(logging.WARNING, logger="nimbus.machines.jail"):
        machine = await driver.create(MachineSpec(runtime="python3"))
    assert "without the jailer" in caplog.text
    assert machine.alive and not machine.restored and machine.step is None
    assert machine.ready_ms is not None and list(machine.step_ms) == list(machine.plan)  # every step is timed
    assert await machine.ping()
    assert await init_and_call(machine) == {"n": 42, "fn": "doubler"}
    assert machine.uses == 1
    workdir = short_dir / "vms" / machine.id
    assert (workdir / firecracker.ROOTFS_NAME).stat().st_ino == machine.image.stat().st_ino  # linked, not copied
    await machine.stop()
    assert not machine.alive and machine.returncode is not None
    assert not workdir.exists()
    assert await machine.ping() is False


async def test_jailed_mode_runs_the_jailer_with_the_documented_command_line(make_driver, short_dir):
    driver = make_driver(jailed=True)
    machine = await driver.create(MachineSpec(runtime="python3", memory_mb=256, vcpus=2))
    spec = machine._jail
    root = jail.chroot_dir(spec)
    recorded = json.loads((root / "jailer-argv.json").read_text())["argv"]
    assert recorded[-len(jail.jailer_argv(spec)) + 1:] == jail.jailer_argv(spec)[1:]
    limit = (256 + firecracker.VMM_OVERHEAD_MB) << 20
    assert f"memory.max={limit}" in recorded or f"memory.limit_in_bytes={limit}" in recorded
    assert "--new-pid-ns" not in recorded  # the driver's child is the VMM itself
    for name in (firecracker.ROOTFS_NAME, firecracker.KERNEL_NAME):
        assert (root / name).is_file()
    assert await init_and_call(machine, n=5) == {"n": 10, "fn": "doubler"}
    await machine.stop()
    assert not root.parent.exists(), "the jail directory must be removed"


async def test_several_machines_run_side_by_side(make_driver):
    driver = make_driver(jailed=True)
    machines = await asyncio.gather(*(driver.create(MachineSpec(runtime="python3")) for _ in range(3)))
    assert len({m.id for m in machines}) == 3 and len(driver.machines) == 3
    results = await asyncio.gather(*(init_and_call(m, n=i) for i, m in enumerate(machines)))
    assert [r["n"] for r in results] == [0, 2, 4]
    await driver.close()
    assert driver.machines == [] and not any(m.alive for m in machines)


# ---------------------------------------------------------------- failures unwind


async def test_a_refused_configuration_call_names_its_step_and_unwinds(make_driver, short_dir):
    driver = make_driver(jailed=False)
    with pytest.raises(MachineStartError) as caught:
        await driver.create(MachineSpec(runtime="python3", vcpus=64))  # the schema allows 1..32 vCPUs
    message = str(caught.value)
    assert "machine.config" in message and "firecracker PUT /machine-config answered 400" in message
    assert leftovers(short_dir) == [] and driver.machines == []


async def test_a_vmm_that_exits_at_once_is_reported_with_its_status(make_driver, short_dir):
    quitter = short_dir / "firecracker-quits"
    quitter.write_text("#!/bin/sh\necho 'stand-in VMM: giving up' >&2\nexit 3\n")
    quitter.chmod(0o755)
    driver = make_driver(jailed=False, firecracker=quitter)
    with pytest.raises(MachineStartError) as caught:
        await driver.create(MachineSpec(runtime="python3"))
    message = str(caught.value)
    assert "api.ready" in message and "exited with status 3" in message and "giving up" in message
    assert leftovers(short_dir) == []


@pytest.mark.parametrize("change, said", [
    (dict(kernel=Path("/nonexistent/vmlinux")), "guest kernel /nonexistent/vmlinux does not exist"),
    (dict(firecracker=Path("/nonexistent/firecracker")), "/nonexistent/firecracker is not an executable file"),
])
async def test_validation_fails_before_anything_starts(make_driver, short_dir, change, said):
    driver = make_driver(jailed=False, **change)
    with pytest.raises(MachineStartError, match="validate.config") as caught:
        await driver.create(MachineSpec(runtime="python3"))
    assert said in str(caught.value)
    assert not (short_dir / "vms").exists() or leftovers(short_dir) == []


async def test_specs_the_driver_cannot_serve_are_refused_plainly(make_driver, binaries, kernel_file, short_dir,
                                                                  tmp_path):
    driver = make_driver(jailed=False)
    with pytest.raises(MachineStartError, match="machines with a network are not supported"):
        await driver.create(MachineSpec(runtime="python3", network=True))
    bare = FirecrackerDriver(tmp_path / "no-images", make_config(binaries, kernel_file, short_dir, jailed=False))
    with pytest.raises(MachineStartError, match="nimbus images build --runtime python3"):
        await bare.create(MachineSpec(runtime="python3"))
    assert leftovers(short_dir) == []


async def test_a_layer_is_a_second_read_only_drive_that_init_mounts(make_driver, short_dir, image_home):
    layer = image_home / "layers" / ("ab" * 32)
    (layer / "six").mkdir(parents=True)
    (layer / "six" / "__init__.py").write_text("VERSION = 'layered'\n")
    driver = make_driver(jailed=True)
    spec = MachineSpec(runtime="python3", layer=str(layer))
    first, second = [await driver.create(spec) for _ in range(2)]
    assert first.plan == firecracker.plan(jailed=True, layer=True)
    assert first.plan.index("drives.layer") == first.plan.index("drives.root") + 1
    assert first.layer_image == second.layer_image == layer.with_name(layer.name + ".ext4")  # made once
    assert first.boot_args().endswith(" -- --layer /dev/vdb")
    async with fcapi.FirecrackerApi(first.api_socket) as api:
        config = await api.vm_config()
    drives = {d["drive_id"]: d for d in config["drives"]}
    assert drives["layer"] == {**drives["layer"], "is_read_only": True, "is_root_device": False,
                               "path_on_host": "/" + firecracker.LAYER_NAME}
    assert config["boot-source"]["boot_args"] == first.boot_args()
    listing = subprocess.run(["debugfs", "-R", "cat /six/__init__.py", str(first.layer_image)],
                             capture_output=True, text=True, timeout=60)
    assert listing.stdout == "VERSION = 'layered'\n", listing.stderr
    await driver.close()
    assert leftovers(short_dir) == []


async def test_a_socket_path_too_long_is_refused(make_driver, short_dir):
    driver = make_driver(jailed=True, chroot_base=short_dir / ("d" * 90))
    with pytest.raises(MachineStartError, match="longer than the 107 bytes"):
        await driver.create(MachineSpec(runtime="python3"))


# ---------------------------------------------------------------- a running machine


async def test_a_call_past_its_timeout_kills_the_machine(make_driver, short_dir):
    machine = await make_driver(jailed=False).create(MachineSpec(runtime="python3"))
    reply, _ = await machine.request(init_header(), SPIN, timeout=30)
    assert reply["type"] == "init_ok"
    with pytest.raises(MachineTimeout, match="killed"):
        await machine.request(exec_header(), b"{}", timeout=0.5)
    assert not machine.alive and leftovers(short_dir) == []


async def test_a_vmm_killed_from_outside_is_a_dead_machine(make_driver, short_dir):
    machine = await make_driver(jailed=False).create(MachineSpec(runtime="python3"))
    os.kill(machine.pid, signal.SIGKILL)
    with pytest.raises(MachineDied, match="killed by SIGKILL"):
        await machine.request({"type": "ping"}, timeout=10)
    assert not machine.alive
    await machine.kill()  # idempotent, and releases the directory
    assert leftovers(short_dir) == []


async def test_the_host_never_sends_unknown_frames(make_driver):
    machine = await make_driver(jailed=False).create(MachineSpec(runtime="python3"))
    with pytest.raises(protocol.ProtocolError, match="does not send"):
        await machine.request({"type": "result"})
    assert await machine.ping()
    await machine.stop()


# ---------------------------------------------------------------- snapshots


async def test_snapshots_are_taken_once_then_restored_with_fresh_entropy(make_driver, image_home, short_dir):
    driver = make_driver(jailed=True, snapshots=True)
    first = await driver.create(MachineSpec(runtime="python3"))
    assert not first.restored and driver.boots == 1
    key = driver.snapshot_key(first.spec, first.image, first.kernel)
    snapshot = firecracker.Snapshot(key, image_home / fc_driver.SNAPSHOTS_DIR / key)
    assert snapshot.complete()
    for path in (snapshot.state, snapshot.memory):  # shared by every restore: no VMM may change it
        assert path.stat().st_mode & 0o777 == 0o444 and path.stat().st_uid == 0
    # The snapshot reset its vsock connection; the driver reconnected, and the machine still serves.
    assert await init_and_call(first) == {"n": 42, "fn": "doubler"}

    second = await driver.create(MachineSpec(runtime="python3"))
    assert second.restored and driver.restores == 1 and driver.boots == 1
    assert second.plan == firecracker.plan(jailed=True, restore=True)
    staged = jail.chroot_dir(second._jail)
    assert (staged / firecracker.MEMORY_NAME).stat().st_ino == snapshot.memory.stat().st_ino
    assert not (staged / firecracker.KERNEL_NAME).exists()  # a restore boots no kernel
    sent = []
    original = second._channel.exchange

    async def spy(header, blob, timeout, **kw):
        sent.append(header)
        return await original(header, blob, timeout, **kw)

    second._channel.exchange = spy
    assert await init_and_call(second, n=1) == {"n": 2, "fn": "doubler"}
    entropy = sent[0].get("entropy")
    assert isinstance(entropy, str) and len(bytes.fromhex(entropy)) == firecracker.ENTROPY_BYTES
    # Snapshots depend on the machine's shape: another memory size boots and takes its own.
    third = await driver.create(MachineSpec(runtime="python3", memory_mb=256))
    assert not third.restored and driver.boots == 2
    await driver.close()


async def test_a_snapshot_that_does_not_load_is_deleted_and_the_machine_boots(make_driver, image_home, caplog):
    driver = make_driver(jailed=False, snapshots=True)
    first = await driver.create(MachineSpec(runtime="python3"))
    key = driver.snapshot_key(first.spec, first.image, first.kernel)
    directory = image_home / fc_driver.SNAPSHOTS_DIR / key
    (directory / firecracker.STATE_NAME).write_text("not a snapshot")
    with caplog.at_level(logging.WARNING, logger="nimbus.machines.firecracker"):
        second = await driver.create(MachineSpec(runtime="python3"))
    assert not second.restored and "restoring snapshot" in caplog.text
    assert await init_and_call(second) == {"n": 42, "fn": "doubler"}
    # Booting it took a fresh snapshot in place of the broken one.
    assert firecracker.Snapshot(key, directory).complete()
    assert json.loads((directory / firecracker.STATE_NAME).read_text())


# ---------------------------------------------------------------- a whole node


def test_a_node_with_the_firecracker_driver_serves_http(make_node, image_home, binaries, kernel_file, short_dir):
    firecracker_bin, _ = binaries
    database = f"sqlite:///{short_dir / 'nimbus.db'}"
    with make_node(image_home, database, driver="firecracker", firecracker_bin=firecracker_bin, jailer="off",
                   kernel=kernel_file, runtimes=["python3"], snapshots="on") as running, running.client() as api:
        created = api.post("/api/v1/functions", json={"name": "fc-double", "runtime": "python3",
                                                      "code": HANDLER.decode(), "handler": "main.handler"})
        assert created.status_code == 201, created.text
        starts = []
        for n in range(3):
            answer = api.post("/api/v1/functions/fc-double/invoke", json={"n": n})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["status"] == "succeeded" and body["output"] == {"n": n * 2, "fn": "fc-double"}, body
            starts.append(body["start"])
        assert starts[0] in ("warm", "cold") and starts[1:] == ["hot", "hot"]
        assert running.node.driver.name == "firecracker"
        # The first machine to boot was snapshotted. Machines booted while it was being taken (the first
        # call's cold start, say) stay booted ones; every machine made after it exists is restored. Two
        # more functions: the second one's machine is certainly made after the snapshot.
        driver = running.node.driver
        for name, n in (("fc-second", 4), ("fc-third", 5)):
            created = api.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                          "code": HANDLER.decode(), "handler": "main.handler"})
            assert created.status_code == 201, created.text
            body = api.post(f"/api/v1/functions/{name}/invoke", json={"n": n}).json()
            assert body["status"] == "succeeded" and body["output"] == {"n": n * 2, "fn": name}, body
        assert body["start"] in ("warm", "cold") and body["restored"] is True, (body, driver.boots, driver.restores)
        recorded = api.get(f"/api/v1/invocations/{body['invocation_id']}").json()
        assert recorded["restored"] is True and recorded["start"] == body["start"]
        again = api.post("/api/v1/functions/fc-third/invoke", json={"n": 6}).json()
        assert again["start"] == "hot" and again["restored"] is False, again


# ---------------------------------------------------------------- on a KVM host, for real

KVM_REASON = ("needs a KVM host that boots Firecracker guests, the firecracker and jailer binaries, a guest "
              "kernel and images (set NIMBUS_TEST_KVM=1 there); this host has a PVM nested /dev/kvm and no "
              "firecracker binary")
on_kvm = pytest.mark.skipif(os.environ.get("NIMBUS_TEST_KVM") != "1", reason=KVM_REASON)


@pytest.fixture
async def real_driver(tmp_path):
    """A driver with the default configuration (jailer, /usr/local/bin binaries) on a home with images."""
    home = Path(os.environ.get("NIMBUS_HOME", tmp_path))
    drivers = []

    def make(**overrides):
        driver = FirecrackerDriver(home, FirecrackerConfig(**overrides))
        problems = driver.problems(["python3"])
        assert not problems, problems
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        await driver.close()


@on_kvm
async def test_kvm_boots_a_vm_and_invokes_a_function(real_driver):
    driver = real_driver()
    began = time.perf_counter()
    machine = await driver.create(MachineSpec(runtime="python3"))
    print(f"boot to agent ready: {(time.perf_counter() - began) * 1000:.1f} ms (driver says {machine.ready_ms:.1f})")
    assert await init_and_call(machine) == {"n": 42, "fn": "doubler"}
    await driver.close()


@on_kvm
async def test_kvm_restores_a_snapshot(real_driver):
    driver = real_driver(snapshots=True)
    booted = await driver.create(MachineSpec(runtime="python3"))
    restored = await driver.create(MachineSpec(runtime="python3"))
    print(f"boot {booted.ready_ms:.1f} ms, restore {restored.ready_ms:.1f} ms")
    assert restored.restored
    assert await init_and_call(restored) == {"n": 42, "fn": "doubler"}
    await driver.close()
