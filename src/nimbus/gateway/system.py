"""Health and metrics: what a load balancer and Prometheus ask.

With auth on, ``/health`` stays open (probes carry no key) and ``/metrics`` needs an admin key (its labels
name every tenant's functions); ``gateway.auth`` enforces both before these handlers run.
"""

import asyncio
import os

from fastapi import APIRouter, Request
from starlette.responses import Response

from nimbus.gateway.problems import problem
from nimbus.gateway.responses import JSON
from nimbus.metrics import CONTENT_TYPE

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
    # Which worker process answered (NIMBUS_PROCESSES): its machines, pool and queue are that worker's alone.
    return JSON({"status": "ok", "machines": node.pool.total, "pool": node.pool.stats(),
                 "queue_depth": node.scheduler.queue_depth,
                 "process": {"index": node.settings.process_index, "pid": os.getpid()}})


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.node.metrics.render(), media_type=CONTENT_TYPE)
