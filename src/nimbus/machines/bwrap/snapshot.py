"""Function templates for the bwrap driver: a machine that ran ``Init``, forked into new machines of its version.

The pool makes a machine with ``forkable=True`` (forked from the runtime's template with a fork control
socket and the snapshot seccomp filter), initialises it as usual, then hands it to
:meth:`BwrapDriver.snapshot`: the agent answers ``snapshot_ok`` and from then on serves fork requests on
that socket instead of calls (:mod:`nimbus.agent.forks` says what each fork does to isolate itself). A
:class:`ForkedMachine` is an ordinary machine to the pool: its own cgroup, channel, output and namespaces;
it runs as the template's uid (a fork cannot change uid without privilege), in a user namespace of its own.

Forks live in the template machine's pid namespace, so they end with it: :meth:`Snapshot.retire` stops
new forks at once and ends the template when its last fork has ended; :meth:`Snapshot.close` ends both now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nimbus import protocol
from nimbus.errors import MachineError, MachineStartError
from nimbus.machines.bwrap.template import FORK_TIMEOUT_S, ForkServer, TemplateMachine

TYPE_CHECKING = False
if TYPE_CHECKING:
    from nimbus.machines.bwrap.driver import BwrapDriver

log = logging.getLogger("nimbus.machines.snapshot")

SNAPSHOT_TIMEOUT_S = 5.0


class Snapshot(ForkServer):
    """A function template: :meth:`fork` returns a new machine with the version's function loaded."""

    def __init__(self, driver: BwrapDriver, machine: TemplateMachine) -> None:
        super().__init__(driver, machine.runtime)
        self.machine = machine
        self.id = machine.id
        self.spec = machine.spec
        self.retiring = False
        self._closing: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return super().alive and not self.retiring and self.machine.alive

    async def start(self, timeout: float = SNAPSHOT_TIMEOUT_S) -> None:
        """Turn the initialised machine into the template (``MachineStartError`` if it will not).

        ``timeout``: for the function's before-snapshot hooks too (``nimbus.agent.main._run_hooks``).
        """
        control, self.machine.fork_control = self.machine.fork_control, None
        if control is None:
            raise MachineStartError(f"machine {self.machine.id} was not made forkable")
        self._listen(control)
        try:
            reply, _ = await self.machine.request({"type": protocol.SNAPSHOT}, timeout=timeout)
            if reply.get("type") != protocol.SNAPSHOT_OK:
                error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
                raise MachineStartError(f"machine {self.machine.id} cannot be a function template: "
                                        f"{str(error.get('message') or reply.get('type'))[:300]}")
            async with asyncio.timeout(FORK_TIMEOUT_S):
                await asyncio.shield(self._ready)
        except (MachineError, TimeoutError) as exc:
            await self.close()
            if isinstance(exc, MachineStartError):
                raise
            raise MachineStartError(f"machine {self.machine.id} did not become a function template: {exc}") from exc

    async def fork(self) -> ForkedMachine:
        """A new machine forked from the template, started (``MachineStartError`` if it cannot be)."""
        if not self.alive:
            raise MachineStartError(f"the function template {self.id} is not running")
        return await self.driver.adopt(ForkedMachine(self.driver, self.spec, self))

    def forget(self, machine: TemplateMachine) -> None:
        super().forget(machine)
        self._close_if_done()

    def _dispatch(self, message: dict) -> None:
        super()._dispatch(message)
        if message.get("op") == "exited":
            self._close_if_done()

    def _close_if_done(self) -> None:
        if self.retiring and not self._machines and self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.close(), name=f"close-template-{self.id}")

    async def retire(self) -> None:
        """Fork no more; end the template now if no fork of it is alive, else when the last one ends."""
        self.retiring = True
        self._close_if_done()

    async def close(self) -> None:
        """End the template machine now, and with it every fork of it still running."""
        self.closed = True
        with contextlib.suppress(Exception):
            await self.machine.kill()
        await self._stop_listening()


def userns_unavailable() -> str | None:
    """Why an unprivileged process here cannot make a user namespace, or None if it can."""
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) <= 0:
                return "user namespaces are disabled (user.max_user_namespaces is 0)"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/sys/kernel/unprivileged_userns_clone") as f:  # Debian's older kernels
            if f.read().strip() == "0":
                return "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone is 0)"
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") as f:  # Ubuntu 23.10 and later
            if f.read().strip() == "1":
                return "AppArmor restricts unprivileged user namespaces"
    except OSError:
        pass
    return None


class ForkedMachine(TemplateMachine):
    """A machine forked from a :class:`Snapshot`: initialised from birth, as the template's uid."""

    DEPTH = 3  # the runtime template's pid namespace, the function template's, then its own
    ATTACH_LAYER = False  # the function template's layer mount is in the namespace it forks from

    def __init__(self, driver: BwrapDriver, spec, snapshot: Snapshot) -> None:
        super().__init__(driver, spec, snapshot)
        self.snapshot = snapshot

    def _take_uid(self) -> int | None:
        return self.snapshot.machine.uid  # the template's, which it gives back when it ends

    def _give_uid(self) -> None:
        self.uid = None


__all__ = ["ForkedMachine", "Snapshot", "userns_unavailable"]
