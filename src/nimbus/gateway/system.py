"""Health, metrics and the node registry: what a load balancer, Prometheus and an operator ask.

With auth on, ``/health`` stays open (probes carry no key); ``/metrics`` (its labels name every tenant's
functions) and ``/api/v1/nodes`` (addresses and load of every node) need an admin key; ``gateway.auth``
enforces both before these handlers run.
"""

import asyncio
import os

from fastapi import APIRouter, Request
from starlette.responses import Response

from nimbus.gateway.problems import problem
from nimbus.gateway.responses import JSON
from nimbus.metrics import CONTENT_TYPE
from nimbus.store.records import utcnow

router = APIRouter(tags=["system"])

STORE_PING_TIMEOUT_S = 2.0


@router.get("/health")
async def health(request: Request) -> Response:
    node = request.app.state.node
    try:
        store_ok = await asyncio.wait_for(node.store.ping(), STORE_PING_TIMEOUT_S)
    except Exception:
        store_ok = False
    if not store_ok:
        return problem(503, "the metadata store does not answer", title="Unhealthy")
    if node.draining:  # the balancer's cue to send no more: calls already here still finish
        return problem(503, "the node is draining before it stops", title="Draining")
    # Which worker process answered (NIMBUS_PROCESSES): its machines, pool and queue are that worker's alone.
    return JSON({"status": "ok", "machines": node.pool.total, "pool": node.pool.stats(),
                 "queue_depth": node.scheduler.queue_depth,
                 "process": {"index": node.settings.process_index, "pid": os.getpid()}})


@router.get("/api/v1/nodes", responses={403: {"description": "needs an admin key"}})
async def nodes(request: Request) -> Response:
    """Every node sharing this database, as the registry knows it; ``dead`` when its heartbeats stopped."""
    node = request.app.state.node
    found = await node.store.list_nodes()
    now = utcnow()
    return JSON({"nodes": [_node_view(record, now, node.settings.node_dead_s, node.registry) for record in found]})


def _node_view(record, now, dead_s: float, registry) -> dict:
    age = max(0.0, (now - record.heartbeat_at).total_seconds())
    state = "dead" if record.state in ("up", "draining") and age > dead_s else record.state
    stats = record.stats if isinstance(record.stats, dict) else {}
    return {"id": record.id, "address": record.address, "state": state,
            "self": registry is not None and record.id == registry.node_id,
            "driver": record.driver, "runtimes": record.runtimes, "version": record.version,
            "started_at": record.started_at.isoformat(), "heartbeat_at": record.heartbeat_at.isoformat(),
            "heartbeat_age_s": round(age, 3), "capacity": record.capacity,
            "machines": stats.get("machines", 0), "in_flight": stats.get("in_flight", 0),
            "queue_depth": stats.get("queue_depth", 0), "pool": stats.get("pool", {})}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.node.metrics.render(), media_type=CONTENT_TYPE)
