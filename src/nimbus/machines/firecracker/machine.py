"""One Firecracker microVM with the agent in it: started as a named, ordered list of steps, each undoable.

As in firecracker-go-sdk, each step that succeeds may push an undo action; when a later one fails they
run in reverse, so a failed start leaves no process, jail directory or socket behind, and ``kill()``
unwinds the same stack. Variants swap steps instead of branching inside them (:func:`plan`)::

    validate.config → jail.stage → vmm.start → api.ready → boot.source → drives.root →
    machine.config → vsock.add → instance.start → agent.ready

Every path Firecracker is given is one of a few fixed names in the machine's own directory, so a
snapshot's recorded paths name the same things when it is restored. The full story (jailer, snapshots
and their entropy, what runs where) is in docs/architecture.md, "Security model".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nimbus import protocol
from nimbus.errors import MachineDied, MachineStartError, ProtocolError
from nimbus.machines.base import DEFAULT_PING_TIMEOUT_S, MachineSpec
from nimbus.machines.channel import Channel
from nimbus.machines.firecracker import api, jail, vsock

log = logging.getLogger("nimbus.machines.firecracker")

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nimbus.machines.firecracker.driver import FirecrackerDriver

# The VMM's own memory beside the guest's, in the jail's cgroup limit (Firecracker's overhead is a few MiB).
VMM_OVERHEAD_MB = 32
KERNEL_NAME, ROOTFS_NAME = jail.DEFAULT_KERNEL_NAME, jail.DEFAULT_ROOTFS_NAME
VSOCK_NAME = jail.DEFAULT_VSOCK_UDS.lstrip("/")
API_SOCKET_NAME = "firecracker.socket"  # direct mode; in the jail it is jail.DEFAULT_API_SOCK
STATE_NAME, MEMORY_NAME = "snapshot.state", "snapshot.mem"
LAYER_NAME = "layer.ext4"
LAYER_DEVICE = "/dev/vdb"  # the guest's name for the second drive
ENTROPY_BYTES = 32
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
TAIL_BYTES = 8192
EXIT_WAIT_S = 5.0
RESET_WAIT_S = 1.0  # how long a snapshotted machine's old vsock connection gets to be dropped
READ_ONLY = 0o444


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
        self._api: api.FirecrackerApi | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future | None = None
        self._output: asyncio.Task | None = None
        self._tail = bytearray()
        self._channel = Channel(self, driver)
        self._lock = asyncio.Lock()
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

    def tail_note(self) -> str:
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
                    raise MachineStartError(f"machine {self.id}: {name}: {exc}{self.tail_note()}") from exc
                except (OSError, ValueError, ProtocolError, EOFError) as exc:
                    raise MachineStartError(f"machine {self.id}: {name} failed: {exc}{self.tail_note()}") from exc
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

    def kill_now(self) -> None:
        """SIGKILL the VMM's whole process group (it leads one): nothing it started may outlive it."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the VMM leads the group (start_new_session)
            return
        except ProcessLookupError:
            return  # the group is gone
        except PermissionError:
            pass
        # Only when the group could not be signalled: Process.kill() polls the child first (Popen), which
        # reaps it if it has just died, and asyncio's own wait then reports status 255 instead of the
        # signal that killed it.
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def _end_vmm(self) -> None:
        """Kill the VMM and wait for it: a guest keeps nothing worth a graceful shutdown."""
        self.kill_now()
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
        self._api = api.FirecrackerApi(self.api_socket, timeout=self._config.api_timeout_s)
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
        await self._api.put_boot_source(api.BootSource(kernel_image_path=self.vmm_path(KERNEL_NAME),
                                                         boot_args=self.boot_args()))

    async def _drives_root(self) -> None:
        # Read-only: one image serves every machine of the runtime; the guest writes only to its tmpfs.
        await self._api.put_drive(api.Drive(drive_id="rootfs", path_on_host=self.vmm_path(ROOTFS_NAME),
                                              is_root_device=True, is_read_only=True))

    async def _drives_layer(self) -> None:
        # The second drive: /dev/vdb in the guest (the root device is always /dev/vda).
        await self._api.put_drive(api.Drive(drive_id="layer", path_on_host=self.vmm_path(LAYER_NAME),
                                              is_root_device=False, is_read_only=True))

    async def _machine_config(self) -> None:
        await self._api.put_machine_config(api.MachineConfiguration(vcpu_count=self.spec.vcpus,
                                                                      mem_size_mib=self.spec.memory_mb))

    async def _vsock_add(self) -> None:
        await self._api.put_vsock(api.Vsock(uds_path=self.vmm_path(VSOCK_NAME)))

    async def _instance_start(self) -> None:
        await self._api.instance_start()

    async def _snapshot_load(self) -> None:
        params = api.SnapshotLoadParams(snapshot_path=self.vmm_path(STATE_NAME),
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
        self._channel.attach(*await asyncio.open_unix_connection(sock=sock))
        header, _ = await self._channel.exchange({"type": protocol.PING}, b"", self._config.start_timeout_s)
        if header.get("type") != protocol.PONG:
            raise MachineStartError(f"the agent answered ping with {header.get('type')!r}")

    async def _close_channel(self) -> None:
        await self._channel.close()

    # ------------------------------------------------------------------ requests

    async def request(self, header: dict, blob: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes]:
        """Send one frame, return the reply; see the ``Machine`` protocol for the errors."""
        if header.get("type") == protocol.INIT and self.restored:
            header = {**header, "entropy": os.urandom(ENTROPY_BYTES).hex()}
        async with self._lock:
            return await self._channel.exchange(header, blob, timeout, alive=self.alive)

    async def ping(self, timeout: float = DEFAULT_PING_TIMEOUT_S) -> bool:
        """True when the agent answers ``pong`` in time; never raises; a busy machine is not answering."""
        if not self.alive or self._lock.locked():
            return False
        async with self._lock:
            try:
                header, _ = await self._channel.exchange({"type": protocol.PING}, b"", timeout, alive=self.alive)
            except Exception:
                return False
            return header.get("type") == protocol.PONG

    # ------------------------------------------------------------------ what the channel asks

    def exit_note(self) -> str:
        return describe_exit(self.returncode)

    async def died(self, kind: str) -> MachineDied:
        """Kill what is left of it first, so the error quotes how the VMM really ended."""
        await self.abort()
        return MachineDied(f"machine {self.id} died during {kind}: {describe_exit(self.returncode)}{self.tail_note()}")

    async def died_mid_frame(self) -> bool:
        """False: a frame cut short is reported as a broken frame (``ProtocolError``), whatever ended it."""
        return False

    async def abort(self) -> None:
        """A request broke the machine: kill it now (during start, the start's undo stack cleans up)."""
        if self._started:
            await self.kill()
        elif self._proc is not None:
            self.kill_now()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), EXIT_WAIT_S)

    # ------------------------------------------------------------------ snapshots

    async def take_snapshot(self, directory: Path) -> None:
        """Pause, write a full snapshot into ``directory`` (made here, atomically), resume, reconnect."""
        async with self._lock:
            await self._api.pause()
            try:
                await self._api.create_snapshot(api.SnapshotCreateParams(
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
                await asyncio.wait_for(self._channel.reader.read(1), RESET_WAIT_S)
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
        self.kill_now()
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


__all__ = ["BOOT_STEPS", "FirecrackerMachine", "Snapshot", "describe_exit", "host_cgroup_version", "plan"]
