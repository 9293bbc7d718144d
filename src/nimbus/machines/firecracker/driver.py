"""The Firecracker driver: makes microVMs from the node's images and kernel, booted or restored.

Each machine is a :class:`~nimbus.machines.firecracker.machine.FirecrackerMachine`. With
``snapshots=True`` the first machine booted for a (runtime, memory, vCPUs, image, kernel) is
snapshotted once, and later machines of that key are restored from it; a snapshot that fails to load is
deleted and its machines boot. A function with a layer gets the layer directory as a second read-only
drive (an ext4 image made once, beside it). See docs/architecture.md, "Security model".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from nimbus.agent.contract import SANDBOX_GID, SANDBOX_UID
from nimbus.errors import MachineStartError
from nimbus.machines import channel
from nimbus.machines.base import DEFAULT_START_TIMEOUT_S, MachineSpec
from nimbus.machines.firecracker import api, images, jail, kernel
from nimbus.machines.firecracker.machine import FirecrackerMachine, Snapshot

log = logging.getLogger("nimbus.machines.firecracker")

# Firecracker appends root=/dev/vda and ro/rw for the root drive itself; the image's /sbin/init is the
# kernel's default init. reboot=k and panic=1 make a guest that ends (or panics) end its VMM at once.
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet"
DEFAULT_JAIL_UID = SANDBOX_UID  # nobody, as in every sandbox
DEFAULT_JAIL_GID = SANDBOX_GID
SNAPSHOTS_DIR = "snapshots"
VMS_DIR = "vms"  # direct mode's per-machine directories, under the node's home
SNAPSHOT_RETRY_S = 300.0  # after taking a snapshot failed, its key boots without trying again for this long
KEY_CHARS = 16
KVM_DEVICE = "/dev/kvm"
# A restore that fails here blames the snapshot (unloadable, or a guest that does not come back).
SNAPSHOT_FAULT_STEPS = ("snapshot.load", "agent.ready")


@dataclass(frozen=True, slots=True)
class FirecrackerConfig:
    """How this node runs Firecracker; every field is a ``NIMBUS_*`` setting (see ``config.py``).

    ``jailer=None`` starts ``firecracker`` directly, unconfined, in ``run_dir`` (default
    ``$NIMBUS_HOME/vms``). ``kernel=None`` takes the newest kernel ``nimbus images kernel`` registered.
    """

    firecracker: Path = jail.DEFAULT_FIRECRACKER
    jailer: Path | None = jail.DEFAULT_JAILER
    chroot_base: Path = jail.DEFAULT_CHROOT_BASE
    uid: int = DEFAULT_JAIL_UID
    gid: int = DEFAULT_JAIL_GID
    cgroup_version: int | None = None  # None: this host's (2 when the unified hierarchy is mounted)
    kernel: Path | None = None
    boot_args: str = DEFAULT_BOOT_ARGS
    snapshots: bool = False
    run_dir: Path | None = None
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S
    api_timeout_s: float = api.DEFAULT_API_TIMEOUT_S


@dataclass
class _SnapshotState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed_at: float | None = None


class FirecrackerDriver:
    """Makes Firecracker machines from the node's images and kernel; see the module's docstring."""

    name = "firecracker"

    def __init__(self, home: Path, config: FirecrackerConfig | None = None, *,
                 reply_buffer_bytes: int = channel.DEFAULT_REPLY_BUFFER_BYTES) -> None:
        self.home = Path(home)
        self.reply_budget = channel.ReplyBudget(reply_buffer_bytes)  # replies of all its machines in flight
        self.config = config or FirecrackerConfig()
        self.run_dir = Path(self.config.run_dir or self.home / VMS_DIR)
        self.snapshots_dir = self.home / SNAPSHOTS_DIR
        self.start_timeout_s = self.config.start_timeout_s
        self._machines: set[FirecrackerMachine] = set()
        self._snapshots: dict[str, _SnapshotState] = {}
        self._layer_locks: dict[str, asyncio.Lock] = {}
        self._warned = False
        self.restores = self.boots = 0

    @property
    def machines(self) -> list[FirecrackerMachine]:
        return list(self._machines)

    def warn_unconfined(self) -> None:
        if not self._warned:
            self._warned = True
            jail.warn_unconfined()

    def kernel_path(self) -> Path | None:
        return self.config.kernel or kernel.find_kernel(self.home)

    def image_path(self, runtime: str) -> Path:
        image = images.find_image(self.home, runtime)
        if image is None:
            raise MachineStartError(f"no guest image for {runtime}; build one with "
                                    f"'nimbus images build --runtime {runtime}'")
        return image

    def snapshot_key(self, spec: MachineSpec, image: Path, kernel_path: Path | None) -> str:
        """What a snapshot depends on: the machine's shape, its image and kernel, the VMM and how it runs."""
        parts = [spec.runtime, str(spec.memory_mb), str(spec.vcpus), image.name, self.config.boot_args,
                 "jailed" if self.config.jailer else "direct"]
        for path in (kernel_path, self.config.firecracker):
            if path is not None and path.exists():
                stat = path.stat()
                parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:KEY_CHARS]
        return f"{spec.runtime}-{spec.memory_mb}m-{spec.vcpus}c-{digest}"

    def problems(self, runtimes: list[str] | tuple[str, ...] = ()) -> list[str]:
        """What stops this node from starting machines, checked before it serves (each a sentence)."""
        found = []
        binaries = {"firecracker": self.config.firecracker}
        if self.config.jailer is not None:
            binaries["jailer"] = self.config.jailer
        for name, path in binaries.items():
            if not path.is_file() or not os.access(path, os.X_OK):
                found.append(f"the {name} binary {path} is missing or not executable "
                             f"(NIMBUS_{name.upper()}_BIN)")
        if self.config.jailer is not None and os.geteuid() != 0:
            found.append("the jailer needs the node to run as root (or set NIMBUS_JAILER=off, unconfined)")
        # Not at the top: ``python -m nimbus.machines.firecracker.kvm`` runs that module, which must not
        # be imported already by its package.
        from nimbus.machines.firecracker import kvm

        if not os.path.exists(KVM_DEVICE):
            found.append(f"{KVM_DEVICE} does not exist: this host cannot run microVMs")
        elif kvm.detect_pvm()[0]:
            found.append(f"{KVM_DEVICE} is PVM nested KVM (kvm_pvm): stock guest kernels hang on it "
                         "(see nimbus doctor)")
        kernel_path = self.kernel_path()
        if kernel_path is None or not kernel_path.is_file():
            found.append(f"no guest kernel ({kernel_path or 'none registered'}): run 'nimbus images kernel' "
                         "or set NIMBUS_KERNEL")
        for runtime in runtimes:
            if images.find_image(self.home, runtime) is None:
                found.append(f"no {runtime} guest image: run 'nimbus images build --runtime {runtime}'")
        return found

    async def layer_image(self, layer_dir: str) -> Path:
        """The ext4 image of an unpacked layer directory, made once (beside it, as ``<dir>.ext4``)."""
        source = Path(layer_dir)
        target = source.with_name(source.name + images.EXT4_SUFFIX)
        if target.is_file():
            return target
        lock = self._layer_locks.setdefault(str(target), asyncio.Lock())
        async with lock:
            if not target.is_file():
                try:
                    await asyncio.to_thread(images.tree_image, source, target, f"layer-{source.name[:10]}")
                except (images.ImageError, OSError) as exc:
                    raise MachineStartError(f"cannot make the image of layer {source.name[:12]}: {exc}") from exc
        return target

    async def create(self, spec: MachineSpec) -> FirecrackerMachine:
        """A started machine: restored from the runtime's snapshot when there is one, else booted."""
        image = self.image_path(spec.runtime)
        kernel_path = self.kernel_path()
        if spec.layer is not None and not spec.network:
            machine = FirecrackerMachine(self, spec, image, kernel_path, layer_image=await self.layer_image(spec.layer))
            await machine.start()
            self.boots += 1
            return machine
        use_snapshots = self.config.snapshots and spec.layer is None and not spec.network
        key = self.snapshot_key(spec, image, kernel_path) if use_snapshots else None
        if key is not None:
            snapshot = Snapshot(key, self.snapshots_dir / key)
            if snapshot.complete():
                machine = FirecrackerMachine(self, spec, image, kernel_path, snapshot)
                try:
                    await machine.start()
                except MachineStartError as exc:
                    if machine.step not in SNAPSHOT_FAULT_STEPS:
                        raise  # not the snapshot's fault (a jail, the VMM): booting would fail the same way
                    log.warning("restoring snapshot %s failed, so it is deleted and machines of its kind boot "
                                "until a new one is taken: %s", key, exc)
                    await asyncio.to_thread(shutil.rmtree, snapshot.directory, True)
                else:
                    self.restores += 1
                    return machine
        machine = FirecrackerMachine(self, spec, image, kernel_path)
        await machine.start()
        self.boots += 1
        if key is not None:
            await self._snapshot_from(machine, key)
        return machine

    async def _snapshot_from(self, machine: FirecrackerMachine, key: str) -> None:
        """Take ``key``'s snapshot from this freshly booted, blank machine, unless one exists or is being taken."""
        state = self._snapshots.setdefault(key, _SnapshotState())
        if state.failed_at is not None and time.monotonic() - state.failed_at < SNAPSHOT_RETRY_S:
            return
        if state.lock.locked():
            return  # another machine is taking it
        async with state.lock:
            directory = self.snapshots_dir / key
            if Snapshot(key, directory).complete():
                return
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
            try:
                await machine.take_snapshot(directory)
            except Exception as exc:
                state.failed_at = time.monotonic()
                await machine.kill()
                raise MachineStartError(f"machine {machine.id}: taking snapshot {key} failed, so none is taken "
                                        f"for {SNAPSHOT_RETRY_S:g}s: {exc}") from exc
            log.info("snapshot %s taken from machine %s", key, machine.id)

    async def close(self) -> None:
        """Kill every machine this driver still owns."""
        await asyncio.gather(*(m.kill() for m in list(self._machines)), return_exceptions=True)


__all__ = ["DEFAULT_BOOT_ARGS", "FirecrackerConfig", "FirecrackerDriver"]
