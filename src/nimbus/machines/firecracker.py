"""The Firecracker driver: every machine is a microVM, normally started through Firecracker's jailer.

A machine is one ``firecracker`` process (the VMM) running one guest: a kernel and a read-only ext4
root file system built by ``nimbus images`` whose ``/sbin/init`` starts the agent, which listens on
vsock port 9999. The host speaks to it through the vsock device's Unix socket (``CONNECT 9999``, see
:mod:`nimbus.machines.vsock`) in the same frames as every other driver.

Start-up is a named, ordered list of steps, as in firecracker-go-sdk; each step that succeeds may push
an undo action, and when a later step fails the actions run in reverse, so a failed start leaves no
process, jail directory or socket behind. After a successful start the same stack is what ``stop()``
unwinds. Variants swap steps instead of branching inside them (:func:`plan`)::

    validate.config → jail.stage → vmm.start → api.ready → boot.source → drives.root →
    machine.config → vsock.add → instance.start → agent.ready

* without the jailer (configured on purpose; a warning is logged) ``jail.stage`` becomes
  ``workdir.stage``: the VMM runs unconfined in a per-machine directory;
* restoring a snapshot replaces ``boot.source`` … ``instance.start`` with ``snapshot.load``;
* a function with a dependency layer gets ``drives.layer`` after ``drives.root``: the layer directory
  as an ext4 image (made once per layer, beside it), a second read-only drive that the guest's init
  mounts read-only at ``/opt/layer`` (``--layer /dev/vdb`` after ``--`` on the kernel command line).

There is no network step: machines have no network, and a spec asking for one is refused.

Paths. Every path Firecracker is given is one of a few fixed names in the machine's own directory
(``/vmlinux``, ``/rootfs.ext4``, ``/vsock.sock`` inside the jail; the same names relative to the
VMM's working directory without it). A snapshot records the paths its machine was configured with, and
restoring needs them to name the same things again: with fixed per-machine names they always do.

Snapshots (``snapshots=True``). The first machine booted for a (runtime, memory, vCPUs, image, kernel)
answers ping, is paused, fully snapshotted into ``$NIMBUS_HOME/snapshots/<key>/``, resumed and handed
out. Later machines of that key are restored from it (``snapshot.load``, File memory backend, resumed at
once) and marked ``restored``. What the snapshot documentation warns about is handled: the vsock
device is reset on snapshot, so the host reconnects (the agent keeps listening); every clone wakes with
the same entropy, so a restored machine's ``init`` carries 32 fresh bytes that the agent mixes into the
kernel's pool and reseeds from before any function code runs (the guest kernel's VMGenID does the
kernel side too on ≥ 5.18); identical paths, as above. The snapshot's files, written by a jailed VMM,
are made root's and read-only before any restore uses them. A snapshot that fails to load (or whose
guest does not come back) is deleted and the machine boots instead.

What runs where. No host that develops Nimbus can boot a Firecracker guest (no ``firecracker`` binary
in any registry; a nested PVM ``/dev/kvm``). ``tests/integration/test_firecracker_driver.py`` drives
this module against a *stand-in* ``firecracker`` and ``jailer`` (``tests/standin/``): real processes
that serve the API per its schema and bridge the vsock socket to a real agent, so every step, undo,
failure path and the snapshot bookkeeping run; Firecracker's own behaviour and a guest booting do not.
The tests that need a KVM host are marked and skipped here with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nimbus import protocol
from nimbus.errors import MachineDied, MachineStartError, MachineTimeout, ProtocolError
from nimbus.machines import fcapi, frames, images, jail, kernel, kvm, vsock
from nimbus.machines.base import DEFAULT_PING_TIMEOUT_S, DEFAULT_START_TIMEOUT_S, MachineSpec

log = logging.getLogger("nimbus.machines.firecracker")

# Firecracker appends root=/dev/vda and ro/rw for the root drive itself; the image's /sbin/init is the
# kernel's default init. reboot=k and panic=1 make a guest that ends (or panics) end its VMM at once.
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off quiet"
DEFAULT_JAIL_UID = 65534
DEFAULT_JAIL_GID = 65534
# The VMM's own memory beside the guest's, in the jail's cgroup limit (Firecracker's overhead is a few MiB).
VMM_OVERHEAD_MB = 32
KERNEL_NAME, ROOTFS_NAME = jail.DEFAULT_KERNEL_NAME, jail.DEFAULT_ROOTFS_NAME
VSOCK_NAME = jail.DEFAULT_VSOCK_UDS.lstrip("/")
API_SOCKET_NAME = "firecracker.socket"  # direct mode; in the jail it is jail.DEFAULT_API_SOCK
STATE_NAME, MEMORY_NAME = "snapshot.state", "snapshot.mem"
LAYER_NAME = "layer.ext4"
LAYER_DEVICE = "/dev/vdb"  # the guest's name for the second drive
SNAPSHOTS_DIR = "snapshots"
VMS_DIR = "vms"  # direct mode's per-machine directories, under the node's home
SNAPSHOT_RETRY_S = 300.0  # after taking a snapshot failed, its key boots without trying again for this long
ENTROPY_BYTES = 32
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
TAIL_BYTES = 8192
EXIT_WAIT_S = 5.0
RESET_WAIT_S = 1.0  # how long a snapshotted machine's old vsock connection gets to be dropped
KEY_CHARS = 16
KVM_DEVICE = "/dev/kvm"
READ_ONLY = 0o444
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
    api_timeout_s: float = fcapi.DEFAULT_API_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A full snapshot of a blank machine: its state file and its memory file."""

    key: str
    directory: Path

    @property
    def state(self) -> Path:
        return self.directory / STATE_NAME

    @property
    def memory(self) -> Path:
        return self.directory / MEMORY_NAME

    def complete(self) -> bool:
        return self.state.is_file() and self.memory.is_file()


BOOT_STEPS = ("validate.config", "jail.stage", "vmm.start", "api.ready", "boot.source", "drives.root",
              "machine.config", "vsock.add", "instance.start", "agent.ready")
CONFIGURE_STEPS = ("boot.source", "drives.root", "machine.config", "vsock.add", "instance.start")


def plan(*, jailed: bool = True, restore: bool = False, layer: bool = False) -> tuple[str, ...]:
    """The start-up steps, in order: with or without the jailer, booted or restored, with a layer or not."""
    steps = list(BOOT_STEPS)
    if not jailed:
        steps[steps.index("jail.stage")] = "workdir.stage"
    if layer:
        steps.insert(steps.index("drives.root") + 1, "drives.layer")
    if restore:
        first = steps.index(CONFIGURE_STEPS[0])
        steps[first:first + len(CONFIGURE_STEPS)] = ["snapshot.load"]
    return tuple(steps)


def host_cgroup_version(root: Path = Path("/sys/fs/cgroup")) -> int:
    """2 on a host whose /sys/fs/cgroup is the unified hierarchy, else 1 (the jailer must be told which)."""
    return 2 if (root / "cgroup.controllers").exists() else 1


def describe_exit(returncode: int | None) -> str:
    """How the VMM process ended."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"firecracker was killed by {name}"
    return f"firecracker exited with status {returncode}"


Undo = Callable[[], Awaitable[None]]


class FirecrackerMachine:
    """One microVM with the guest agent in it; see :class:`nimbus.machines.base.Machine`.

    ``restored`` is True for a machine loaded from a snapshot; ``ready_ms`` is how long its start took,
    from the first step to the agent's pong, and ``step_ms`` what each step took of it (``make bench``
    reports them). ``step`` names the step running (or that failed).
    """

    def __init__(self, driver: FirecrackerDriver, spec: MachineSpec, image: Path, kernel_path: Path | None,
                 snapshot: Snapshot | None = None, layer_image: Path | None = None) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.runtime = spec.runtime
        self.spec = spec
        self.created_at = time.monotonic()
        self.uses = 0
        self.restored = False
        self.ready_ms: float | None = None
        self.step_ms: dict[str, float] = {}
        self.step: str | None = None
        self.pid: int | None = None
        self.image = image
        self.kernel = kernel_path
        self.snapshot = snapshot
        self.layer_image = layer_image
        self._driver = driver
        self._config = driver.config
        self._jail: jail.JailSpec | None = None
        self._root: Path | None = None  # the directory the VMM's paths are relative to
        self._api: fcapi.FirecrackerApi | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future | None = None
        self._output: asyncio.Task | None = None
        self._tail = bytearray()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._seq = 0
        self._undo: contextlib.AsyncExitStack | None = None
        self._started = False
        self._released = False
        self.plan = plan(jailed=self._config.jailer is not None, restore=snapshot is not None,
                         layer=layer_image is not None)
        self._steps: dict[str, Callable[[], Awaitable[Undo | None]]] = {
            "validate.config": self._validate_config,
            "jail.stage": self._jail_stage,
            "workdir.stage": self._workdir_stage,
            "vmm.start": self._vmm_start,
            "api.ready": self._api_ready,
            "boot.source": self._boot_source,
            "drives.root": self._drives_root,
            "drives.layer": self._drives_layer,
            "machine.config": self._machine_config,
            "vsock.add": self._vsock_add,
            "instance.start": self._instance_start,
            "snapshot.load": self._snapshot_load,
            "agent.ready": self._agent_ready,
        }

    def __repr__(self) -> str:
        return f"<FirecrackerMachine {self.id} {self.runtime} pid={self.pid} {'alive' if self.alive else 'dead'}>"

    @property
    def alive(self) -> bool:
        return self._started and not self._released and self._exited is not None and not self._exited.done()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def diagnostics(self) -> str:
        """The last few KiB of the VMM's output: its own log lines and the guest's serial console."""
        return self._tail.decode(errors="replace")

    def _tail_note(self) -> str:
        text = self.diagnostics().strip()
        return f"; its output ends: {text[-2000:]}" if text else ""

    # ------------------------------------------------------------------ paths

    def vmm_path(self, name: str) -> str:
        """``name`` as the VMM is told it: absolute inside the jail, relative to its directory without one."""
        return f"/{name}" if self._jail is not None else name

    def host_path(self, name: str) -> Path:
        """``name`` in this machine's directory, as the host sees it."""
        return self._root / name

    @property
    def api_socket(self) -> Path:
        if self._jail is not None:
            return jail.api_socket_path(self._jail)
        return self.host_path(API_SOCKET_NAME)

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Run the plan's steps in order; on a failure undo what was done and raise ``MachineStartError``."""
        if self._started or self._released:
            raise MachineStartError(f"machine {self.id} was already started")
        began = time.perf_counter()
        async with contextlib.AsyncExitStack() as undo:
            for name in self.plan:
                self.step = name
                step_began = time.perf_counter()
                try:
                    action = await self._steps[name]()
                except asyncio.CancelledError:
                    raise
                except MachineStartError as exc:
                    raise MachineStartError(f"machine {self.id}: {name}: {exc}{self._tail_note()}") from exc
                except (OSError, ValueError, ProtocolError, EOFError) as exc:
                    raise MachineStartError(f"machine {self.id}: {name} failed: {exc}{self._tail_note()}") from exc
                if action is not None:
                    undo.push_async_callback(action)
                self.step_ms[name] = (time.perf_counter() - step_began) * 1000
            self._undo = undo.pop_all()
        self._started = True
        self.step = None
        self.created_at = time.monotonic()
        self.ready_ms = (time.perf_counter() - began) * 1000
        self.restored = self.snapshot is not None

    async def _validate_config(self) -> None:
        spec = self.spec
        if spec.network:
            raise MachineStartError("machines with a network are not supported by the firecracker driver")
        if (spec.layer is None) != (self.layer_image is None):
            raise MachineStartError("a layer's image must come with its spec")
        if self.layer_image is not None and self.snapshot is not None:
            raise MachineStartError("a machine with a layer is booted, never restored from a blank snapshot")
        if not self.image.is_file():
            raise MachineStartError(f"root file system {self.image} does not exist")
        if self.snapshot is None and (self.kernel is None or not self.kernel.is_file()):
            raise MachineStartError(f"guest kernel {self.kernel} does not exist; build or register one with "
                                    "'nimbus images kernel'")
        if self.snapshot is not None and not self.snapshot.complete():
            raise MachineStartError(f"snapshot {self.snapshot.directory} is incomplete")
        binaries = [self._config.firecracker] + ([self._config.jailer] if self._config.jailer else [])
        for binary in binaries:
            if not binary.is_file() or not os.access(binary, os.X_OK):
                raise MachineStartError(f"{binary} is not an executable file (install Firecracker's release "
                                        "binaries; see the README, 'Running on KVM hosts')")
        if self._config.jailer is not None:
            self._jail = jail.JailSpec(
                id=f"nimbus-{self.id}", memory_mb=spec.memory_mb + VMM_OVERHEAD_MB, vcpus=spec.vcpus,
                uid=self._config.uid, gid=self._config.gid, exec_file=self._config.firecracker,
                jailer=self._config.jailer, chroot_base_dir=self._config.chroot_base,
                cgroup_version=self._config.cgroup_version or host_cgroup_version(),
                # No new PID namespace: the jailer then execs Firecracker in place, so the process the
                # driver started is the VMM and its exit is the machine's end.
                new_pid_ns=False,
            )
            self._root = jail.chroot_dir(self._jail)
        else:
            self._root = self._driver.run_dir / self.id
        for sock in (self.api_socket, self.host_path(VSOCK_NAME)):
            if len(os.fsencode(sock)) > UNIX_PATH_MAX:
                raise MachineStartError(f"socket path {sock} is longer than the {UNIX_PATH_MAX} bytes a Unix "
                                        "socket allows; choose a shorter chroot base or run directory")

    def _stage_files(self) -> list[tuple[Path, str]]:
        """What the direct mode links into the machine's directory (the jailed mode: jail.stage_files)."""
        files = [(self.image, ROOTFS_NAME)]
        if self.snapshot is not None:
            files += [(self.snapshot.state, STATE_NAME), (self.snapshot.memory, MEMORY_NAME)]
        else:
            files.append((self.kernel, KERNEL_NAME))
        if self.layer_image is not None:
            files.append((self.layer_image, LAYER_NAME))
        return files

    async def _jail_stage(self) -> Undo:
        spec = self._jail
        jail_dir = self._root.parent  # <chroot_base>/<exec_file_name>/<id>
        if jail_dir.exists():
            raise MachineStartError(f"jail {jail_dir} already exists")

        async def remove() -> None:
            await asyncio.to_thread(shutil.rmtree, jail_dir, True)
            for directory in jail.cgroup_dirs(spec):
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("machine %s: cgroup %s not removed: %s", self.id, directory, exc)

        try:
            extra = {}
            if self.snapshot is not None:
                extra = {STATE_NAME: self.snapshot.state, MEMORY_NAME: self.snapshot.memory}
            if self.layer_image is not None:
                extra[LAYER_NAME] = self.layer_image
            jail.stage_files(spec, None if self.snapshot else self.kernel, self.image, extra=extra)
        except BaseException:
            await remove()
            raise
        return remove

    async def _workdir_stage(self) -> Undo:
        root = self._root
        root.mkdir(parents=True)

        async def remove() -> None:
            await asyncio.to_thread(shutil.rmtree, root, True)

        try:
            for source, name in self._stage_files():
                jail.link_or_copy(source, root / name)
        except BaseException:
            await remove()
            raise
        return remove

    async def _vmm_start(self) -> Undo:
        if self._jail is not None:
            argv, cwd = jail.jailer_argv(self._jail), "/"
        else:
            argv, cwd = jail.direct_argv(self._config.firecracker, self.api_socket), str(self._root)
            self._driver.warn_unconfined()
        self._proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=cwd,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        )
        self.pid = self._proc.pid
        self._output = asyncio.ensure_future(self._collect_output())
        self._exited = asyncio.ensure_future(self._proc.wait())
        self._driver._machines.add(self)
        return self._end_vmm

    async def _collect_output(self) -> None:
        stream = self._proc.stdout
        while chunk := await stream.read(4096):
            self._tail += chunk
            del self._tail[:-TAIL_BYTES]

    def _kill_vmm(self) -> None:
        """SIGKILL the VMM's whole process group (it leads one): nothing it started may outlive it."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def _end_vmm(self) -> None:
        """Kill the VMM and wait for it: a guest keeps nothing worth a graceful shutdown."""
        self._kill_vmm()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)
        except TimeoutError:
            log.error("machine %s: firecracker pid %s did not exit after SIGKILL", self.id, self.pid)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._output), EXIT_WAIT_S)
        self._driver._machines.discard(self)

    async def _unless_vmm_exits(self, work: Awaitable, what: str):
        """Await ``work``, but fail at once, with the exit status, if the VMM exits first."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task, self._exited}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._output), 1.0)
        raise MachineStartError(f"{describe_exit(self.returncode)} before {what}")

    async def _api_ready(self) -> Undo:
        self._api = fcapi.FirecrackerApi(self.api_socket, timeout=self._config.api_timeout_s)
        try:
            await self._unless_vmm_exits(self._api.wait_ready(self._config.start_timeout_s),
                                         "its API socket answered")
        except BaseException:
            await self._api.close()
            raise
        return self._api.close

    def boot_args(self) -> str:
        """The kernel command line; words after ``--`` are the guest init's own arguments."""
        if self.layer_image is None:
            return self._config.boot_args
        return f"{self._config.boot_args} -- --layer {LAYER_DEVICE}"

    async def _boot_source(self) -> None:
        await self._api.put_boot_source(fcapi.BootSource(kernel_image_path=self.vmm_path(KERNEL_NAME),
                                                         boot_args=self.boot_args()))

    async def _drives_root(self) -> None:
        # Read-only: one image serves every machine of the runtime; the guest writes only to its tmpfs.
        await self._api.put_drive(fcapi.Drive(drive_id="rootfs", path_on_host=self.vmm_path(ROOTFS_NAME),
                                              is_root_device=True, is_read_only=True))

    async def _drives_layer(self) -> None:
        # The second drive: /dev/vdb in the guest (the root device is always /dev/vda).
        await self._api.put_drive(fcapi.Drive(drive_id="layer", path_on_host=self.vmm_path(LAYER_NAME),
                                              is_root_device=False, is_read_only=True))

    async def _machine_config(self) -> None:
        await self._api.put_machine_config(fcapi.MachineConfiguration(vcpu_count=self.spec.vcpus,
                                                                      mem_size_mib=self.spec.memory_mb))

    async def _vsock_add(self) -> None:
        await self._api.put_vsock(fcapi.Vsock(uds_path=self.vmm_path(VSOCK_NAME)))

    async def _instance_start(self) -> None:
        await self._api.instance_start()

    async def _snapshot_load(self) -> None:
        params = fcapi.SnapshotLoadParams(snapshot_path=self.vmm_path(STATE_NAME),
                                          mem_file_path=self.vmm_path(MEMORY_NAME), resume_vm=True,
                                          vsock_uds_path=self.vmm_path(VSOCK_NAME))
        await self._api.load_snapshot(params)

    async def _agent_ready(self) -> Undo:
        await self._connect()
        return self._close_channel

    async def _connect(self) -> None:
        """Open the channel to the agent through the vsock socket and wait for its pong."""
        sock = await self._unless_vmm_exits(
            vsock.connect(self.host_path(VSOCK_NAME), timeout=self._config.start_timeout_s),
            "the agent listened on its vsock port")
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        header, _ = await self._exchange({"type": protocol.PING}, b"", self._config.start_timeout_s, starting=True)
        if header.get("type") != protocol.PONG:
            raise MachineStartError(f"the agent answered ping with {header.get('type')!r}")

    async def _close_channel(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # ------------------------------------------------------------------ requests

    async def request(self, header: dict, blob: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes]:
        """Send one frame, return the reply; see the ``Machine`` protocol for the errors."""
        if header.get("type") == protocol.INIT and self.restored:
            header = {**header, "entropy": os.urandom(ENTROPY_BYTES).hex()}
        async with self._lock:
            return await self._exchange(header, blob, timeout)

    async def ping(self, timeout: float = DEFAULT_PING_TIMEOUT_S) -> bool:
        """True when the agent answers ``pong`` in time; never raises; a busy machine is not answering."""
        if not self.alive or self._lock.locked():
            return False
        async with self._lock:
            try:
                header, _ = await self._exchange({"type": protocol.PING}, b"", timeout)
            except Exception:
                return False
            return header.get("type") == protocol.PONG

    async def _exchange(self, header: dict, blob: bytes, timeout: float | None, *,
                        starting: bool = False) -> tuple[dict, bytes]:
        kind = header.get("type")
        frames.check_request(kind)
        if not starting and not self.alive:
            raise MachineDied(f"machine {self.id} is not running ({describe_exit(self.returncode)}){self._tail_note()}")
        self._seq += 1
        rid = self._seq
        data = protocol.encode({**header, "id": rid}, blob)
        if kind == protocol.EXEC:
            self.uses += 1
        try:
            async with asyncio.timeout(timeout):
                self._writer.write(data)
                await self._writer.drain()
                reply, reply_blob = await frames.read_reply(self._reader, kind, frames.budget_of(self._driver))
        except TimeoutError:
            await self._fail()
            raise MachineTimeout(f"machine {self.id} gave no reply to {kind} within {timeout:g}s and was killed"
                                 f"{self._tail_note()}") from None
        except (EOFError, ConnectionError):
            await self._fail()
            raise MachineDied(f"machine {self.id} died during {kind}: {describe_exit(self.returncode)}"
                              f"{self._tail_note()}") from None
        except ProtocolError as exc:
            await self._fail()
            raise ProtocolError(f"machine {self.id}: {exc}; machine killed") from None
        except BaseException:  # cancelled mid-request: the channel is out of step, so the machine is done
            self._kill_vmm()
            raise
        problem = frames.reply_problem(kind, rid, reply, reply_blob)
        if problem is not None:
            await self._fail()
            raise ProtocolError(f"machine {self.id}: {problem}; machine killed")
        return reply, reply_blob

    async def _fail(self) -> None:
        """A request broke the machine: kill it now (during start, the start's undo stack cleans up)."""
        if self._started:
            await self.kill()
        elif self._proc is not None:
            self._kill_vmm()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)

    # ------------------------------------------------------------------ snapshots

    async def take_snapshot(self, directory: Path) -> None:
        """Pause, write a full snapshot into ``directory`` (made here, atomically), resume, reconnect."""
        async with self._lock:
            await self._api.pause()
            try:
                await self._api.create_snapshot(fcapi.SnapshotCreateParams(
                    snapshot_path=self.vmm_path(STATE_NAME), mem_file_path=self.vmm_path(MEMORY_NAME)))
            finally:
                await self._api.resume()
            partial = directory.with_name(f".{directory.name}.{self.id}")
            partial.mkdir(parents=True)
            try:
                for name in (STATE_NAME, MEMORY_NAME):
                    _move(self.host_path(name), partial / name)
                    _seal(partial / name)
                try:
                    os.rename(partial, directory)
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    shutil.rmtree(partial, ignore_errors=True)  # another machine got there first
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            # The snapshot reset the vsock device: the guest drops this connection on resuming, and its
            # agent listens again. Wait for the drop, so the new connection cannot be the one dropped.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader.read(1), RESET_WAIT_S)
            await self._close_channel()
            await self._connect()

    # ------------------------------------------------------------------ stop / kill

    async def stop(self) -> None:
        """Kill the VM and release its jail or directory; a microVM has nothing to flush."""
        await self.kill()

    async def kill(self) -> None:
        """Kill the VMM at once, then unwind every step's undo action; idempotent."""
        if self._released:
            return
        self._released = True
        self._kill_vmm()
        if self._undo is not None:
            await self._undo.aclose()


def _seal(path: Path) -> None:
    """Make a snapshot file read-only and, on a root node, root's: the VMM that wrote it ran as the jail's
    uid, and every later machine restores from it, so no VMM may own it."""
    if os.geteuid() == 0:
        os.chown(path, 0, 0)
    os.chmod(path, READ_ONLY)


def _move(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(source, target)
        source.unlink()


@dataclass
class _SnapshotState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed_at: float | None = None


class FirecrackerDriver:
    """Makes Firecracker machines from the node's images and kernel; see the module's docstring."""

    name = "firecracker"

    def __init__(self, home: Path, config: FirecrackerConfig | None = None) -> None:
        self.home = Path(home)
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


__all__ = ["BOOT_STEPS", "DEFAULT_BOOT_ARGS", "FirecrackerConfig", "FirecrackerDriver", "FirecrackerMachine",
           "Snapshot", "describe_exit", "plan"]
