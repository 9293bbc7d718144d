"""The node registry: which nodes share this database, what each last said about itself, and which died.

A row is written whole when a node starts (``register_node``) and refreshed by its heartbeats. Declaring
a node dead is one conditional UPDATE (``claim_dead_nodes``), so of several live nodes noticing the same
silence exactly one takes the dead node's async work over; a node that was only slow and comes back
finds its row ``dead`` (``heartbeat_node`` answers False), registers again, and its stale leases fail
their next renewal, so it stops the calls another node now runs. Heartbeat times are the nodes' own
clocks, as lease expiries are: the nodes' clocks must agree (NTP) to well within ``node_dead_s``.
"""

from dataclasses import asdict
from datetime import timedelta

import sqlalchemy as sa

from nimbus.store import tables
from nimbus.store.database import Database, boundary
from nimbus.store.records import NodeRecord, utcnow

_n = tables.nodes
LIVE_STATES = ("up", "draining")


class NodesMixin(Database):
    """Register, heartbeat, list and bury nodes."""

    async def register_node(self, node: NodeRecord) -> None:
        """Write this node's row whole (a restarted node keeps its id, so its row is replaced)."""
        row = asdict(node)
        statement = self._upsert(_n).values(row)
        statement = statement.on_conflict_do_update(index_elements=[_n.c.id],
                                                    set_={k: statement.excluded[k] for k in row if k != "id"})
        with boundary(f"register node {node.id}"):
            async with self._write_one() as conn:
                await conn.execute(statement)

    async def heartbeat_node(self, id: str, *, state: str, stats: dict) -> bool:  # noqa: A002
        """Refresh the node's heartbeat, state and figures. False when its row is gone or says ``dead``:
        another node took its work over, so it must register again."""
        statement = (_n.update().where(_n.c.id == id, _n.c.state != "dead")
                     .values(state=state, stats=stats, heartbeat_at=utcnow()))
        with boundary(f"heartbeat of node {id}"):
            async with self._write_one() as conn:
                return (await conn.execute(statement)).rowcount == 1

    async def set_node_state(self, id: str, state: str) -> None:  # noqa: A002
        """Say ``draining`` or ``stopped`` now, not at the next heartbeat."""
        statement = _n.update().where(_n.c.id == id).values(state=state, heartbeat_at=utcnow())
        with boundary(f"mark node {id} {state}"):
            async with self._write_one() as conn:
                await conn.execute(statement)

    async def list_nodes(self) -> list[NodeRecord]:
        with boundary("list nodes"):
            async with self._read() as conn:
                rows = (await conn.execute(sa.select(_n).order_by(_n.c.id))).all()
        return [NodeRecord(**row._asdict()) for row in rows]

    async def claim_dead_nodes(self, dead_s: float, *, exclude: str) -> list[str]:
        """Mark ``dead`` every live node silent for ``dead_s`` (never ``exclude``, the caller); their ids.

        Only the caller that flips a row gets its id, so each dead node's work is taken over once.
        """
        cutoff = utcnow() - timedelta(seconds=dead_s)
        statement = (_n.update()
                     .where(_n.c.state.in_(LIVE_STATES), _n.c.heartbeat_at < cutoff, _n.c.id != exclude)
                     .values(state="dead").returning(_n.c.id))
        with boundary("find dead nodes"):
            async with self._write_one() as conn:
                return [row.id for row in await conn.execute(statement)]

    async def forget_nodes(self, older_than_s: float) -> int:
        """Delete the rows of nodes dead or stopped for longer than ``older_than_s``; how many."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        statement = _n.delete().where(_n.c.state.in_(("dead", "stopped")), _n.c.heartbeat_at < cutoff)
        with boundary("forget old nodes"):
            async with self._write_one() as conn:
                return (await conn.execute(statement)).rowcount
