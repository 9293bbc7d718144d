"""The one seam between the pool and whatever runs code: a ``Machine`` and the ``Driver`` that makes it.

A machine is one isolated sandbox (a bwrap process tree here, a Firecracker microVM on KVM hosts) with
the guest agent inside, spoken to in the frames of ``nimbus.protocol``. The pool never knows which
driver it has. Errors are raised as ``nimbus.errors.MachineError`` subclasses; after any of them the
machine is dead and must not be reused.
"""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

DEFAULT_MEMORY_MB = 128
DEFAULT_VCPUS = 1
DEFAULT_PIDS_MAX = 256
DEFAULT_START_TIMEOUT_S = 10.0
DEFAULT_PING_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """What a machine must be: which runtime it boots, the limits it runs under, and what it mounts.

    ``layer`` is the absolute host path of the function's unpacked dependency layer (pip ``--target``
    output for python3, the contents of a ``node_modules`` directory for nodejs), which the machine sees
    read-only at :data:`nimbus.agent.contract.LAYER_DIR`; None for a function without one, whose machine
    sees an empty directory there. The layer is fixed when the machine is made: a blank machine made
    without one can serve only functions without one.
    """

    runtime: str
    memory_mb: int = DEFAULT_MEMORY_MB
    vcpus: int = DEFAULT_VCPUS
    pids_max: int = DEFAULT_PIDS_MAX
    network: bool = False
    layer: str | None = None


@runtime_checkable
class Machine(Protocol):
    """One sandbox with a guest agent in it.

    ``request`` sends one frame and returns the agent's reply; the machine stamps the frame's ``id``
    and checks that the reply carries the same one. On ``timeout`` the machine is killed and
    ``MachineTimeout`` raised; on a closed channel or dead process ``MachineDied``; on a frame that
    breaks the protocol the machine is killed and ``ProtocolError`` raised.
    """

    id: str
    runtime: str
    spec: MachineSpec
    created_at: float  # time.monotonic() when started
    uses: int  # exec requests served

    @property
    def alive(self) -> bool: ...

    async def start(self) -> None:
        """Boot the sandbox and wait until its agent answers a ping (``MachineStartError`` if not)."""

    async def request(self, header: dict, blob: bytes = b"", timeout: float | None = None) -> tuple[dict, bytes]:
        """Send one frame, return the reply (header, blob)."""

    async def ping(self, timeout: float = DEFAULT_PING_TIMEOUT_S) -> bool:
        """True when the agent answers ``pong`` in time; never raises."""

    async def stop(self) -> None:
        """Close the channel, give the agent a moment to exit, then kill what is left; release resources."""

    async def kill(self) -> None:
        """Kill the sandbox at once and release its resources; idempotent."""


@runtime_checkable
class Snapshot(Protocol):
    """A machine that ran ``Init`` and now only forks (a function template): each fork is a new machine of
    its version, initialised. A driver that has them says ``snapshots_on`` (and why not in
    ``snapshots_note``), creates a machine with ``create(spec, forkable=True)`` and, once the pool has
    initialised it, turns it into one with ``snapshot(machine, timeout)`` (the timeout bounds the
    function's before-snapshot hooks)."""

    id: str
    spec: MachineSpec

    @property
    def alive(self) -> bool:
        """True while it can fork."""

    @property
    def children(self) -> int:
        """Forks of it that have not ended (they end with it)."""

    async def fork(self) -> Machine:
        """A new started machine, already initialised (``MachineStartError`` if not)."""

    async def retire(self) -> None:
        """Fork no more, and end once the last fork has ended."""

    async def close(self) -> None:
        """End now, with every fork still running."""


@runtime_checkable
class Driver(Protocol):
    """Makes machines of one kind. ``create`` returns a started machine."""

    name: str

    async def create(self, spec: MachineSpec) -> Machine: ...

    async def close(self) -> None:
        """Kill every machine this driver still owns and release shared resources."""


__all__ = ["DEFAULT_MEMORY_MB", "DEFAULT_PIDS_MAX", "DEFAULT_PING_TIMEOUT_S", "DEFAULT_START_TIMEOUT_S",
           "DEFAULT_VCPUS", "Driver", "Machine", "MachineSpec", "Snapshot"]
