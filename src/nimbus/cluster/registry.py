"""This node's row in the node registry: registered at start, refreshed by heartbeats, and the sweep that
finds dead nodes and takes their async work over.

Every live node sweeps on every heartbeat; the store lets exactly one of them flip a silent node to
``dead`` and that one hands the dead node's leased async calls back to the queue at once, instead of
waiting out their leases (``async_lease_s``). No node leads: the database row is the only agreement.
"""

import asyncio
import logging
from collections.abc import Callable

from nimbus.store import NodeRecord, Store

log = logging.getLogger("nimbus.cluster")

FORGET_AFTER_S = 86_400.0  # rows of nodes dead or stopped this long are deleted: ids of homes long gone
FORGET_EVERY = 100  # heartbeats between two such deletes


class Registry:
    """Register, heartbeat, drain and take over for one node (one worker process)."""

    def __init__(self, store: Store, record: NodeRecord, *, stats: Callable[[], dict], heartbeat_s: float,
                 dead_s: float, on_takeover: Callable[[], None]) -> None:
        self.store = store
        self.record = record
        self._stats = stats
        self.heartbeat_s = heartbeat_s
        self.dead_s = dead_s
        self._on_takeover = on_takeover
        self.state = "up"
        self._task: asyncio.Task | None = None
        self._beats = 0

    @property
    def node_id(self) -> str:
        return self.record.id

    async def start(self) -> None:
        self.record.stats = self._stats()
        await self.store.register_node(self.record)
        self._task = asyncio.create_task(self._loop(), name="node-heartbeat")

    async def drain(self) -> None:
        """Say ``draining`` now: operators and ``nimbus nodes`` see it before the node goes."""
        self.state = "draining"
        try:
            await self.store.set_node_state(self.node_id, "draining")
        except Exception:
            log.exception("could not mark this node draining in the registry")

    async def close(self) -> None:
        """Stop heartbeating and say ``stopped``: a clean exit is not a death, nothing to take over."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.store.set_node_state(self.node_id, "stopped")
        except Exception:
            log.exception("could not mark this node stopped in the registry; it will be found dead instead")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is away: it says why; other nodes may find this one dead
                log.warning("node heartbeat failed: %s", exc)

    async def beat(self) -> list[str]:
        """One heartbeat and one sweep; the nodes this call found dead (and took over)."""
        stats = self._stats()
        if not await self.store.heartbeat_node(self.node_id, state=self.state, stats=stats):
            # Declared dead while alive (a long pause, a partition): its leases were handed back and are
            # fenced, so the calls it still runs stop at their next renewal. Come back as a new life.
            log.warning("this node was declared dead by another (no heartbeat for %g s); registering again",
                        self.dead_s)
            self.record.stats, self.record.state = stats, self.state
            await self.store.register_node(self.record)
        dead = await self.store.claim_dead_nodes(self.dead_s, exclude=self.node_id)
        for node_id in dead:
            released = await self.store.release_owned(node_id)
            log.warning("node %s missed its heartbeats for %g s: it is dead; took over %d async invocations",
                        node_id, self.dead_s, released)
        if dead:
            self._on_takeover()
        self._beats += 1
        if self._beats % FORGET_EVERY == 1:
            await self.store.forget_nodes(FORGET_AFTER_S)
        return dead
