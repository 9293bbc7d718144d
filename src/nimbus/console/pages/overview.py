"""The console's overview: the signed-in tenant's last hour (calls, starts, errors, latency, async queue,
latest failures) and, for admins only, the node's pool and every node of the registry.

The figures live in one fragment (``/console/overview/figures``) that the page includes and htmx fetches
again every 10 s; the charts' numbers travel in a ``data-chart`` attribute that static/charts.js draws
with uPlot (the CSP allows no inline script). All the tenant's figures come from the store's insights
queries, scoped to ``viewer.tenant``; nothing node-wide is even computed for a viewer who is not an admin.
"""

import asyncio
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from nimbus.console import web
from nimbus.gateway.system import _node_view
from nimbus.store.insights import Insights
from nimbus.store.records import STARTS, utcnow

router = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)

REFRESH = "every 10s"
FAILURES_SHOWN = 10
POOL_COLUMNS = ("blank", "idle", "busy", "booting", "target", "templates", "spares")
VIEWER = Depends(web.viewer)


@router.get("/")
async def overview(request: Request, viewer: web.Viewer = VIEWER) -> Response:
    return web.render(request, "overview.html", {"active": "overview", **await figures(request, viewer)})


@router.get("/overview/figures")
async def overview_figures(request: Request, viewer: web.Viewer = VIEWER) -> Response:
    """The figures alone, for htmx's refresh."""
    return web.render(request, "overview_figures.html", await figures(request, viewer))


async def figures(request: Request, viewer: web.Viewer) -> dict:
    node = web.node(request)
    store = node.store
    now = utcnow()
    hour, backlog, failures = await asyncio.gather(
        store.tenant_insights(viewer.tenant, now=now), store.async_backlog(viewer.tenant),
        store.recent_failures(viewer.tenant, FAILURES_SHOWN, now=now))
    context = {"now": now, "refresh": REFRESH, "hour": hour, "starts": _starts(hour),
               "stats": {**_stats(hour), "backlog": f"{backlog:,}"},
               "calls_chart": _chart(hour, "calls / min", [("calls", [m.calls for m in hour.minutes]),
                                                          ("errors", [m.errors for m in hour.minutes])]),
               "latency_chart": _chart(hour, "ms", [("p50", [m.p50_ms for m in hour.minutes]),
                                                    ("p99", [m.p99_ms for m in hour.minutes])], points=True),
               "failures": [{"id": f.id, "function": f.function_name, "status": f.status,
                             "ago": ago(f.created_at, now), "at": f.created_at.isoformat(timespec="seconds"),
                             "duration": duration_text(f.duration_ms), "error": f.error_type, "message": f.message}
                            for f in failures],
               "node_section": None}
    if viewer.admin:  # node-wide facts: never computed for a tenant's eyes
        context["node_section"] = await _node_section(node, now)
    return context


def _stats(hour: Insights) -> dict:
    busiest = max(hour.minutes, key=lambda m: m.calls)
    return {"calls": f"{hour.calls:,}", "errors": f"{hour.errors:,}",
            "error_rate": f"{100 * hour.errors / hour.calls:.1f} %" if hour.calls else "–",
            "peak": f"{busiest.calls:,}", "p50": duration_text(hour.p50_ms), "p99": duration_text(hour.p99_ms),
            "sampled": hour.sampled}


def _starts(hour: Insights) -> list[dict]:
    total = sum(hour.starts.values())
    return [{"kind": kind, "count": f"{hour.starts[kind]:,}",
             "share": f"{100 * hour.starts[kind] / total:.0f} %" if total else "–"} for kind in STARTS]


def _chart(hour: Insights, unit: str, series: list[tuple[str, list]], *, points: bool = False) -> dict:
    """What charts.js draws: x in unix seconds (each minute's start), one list of values per series
    (None: nothing to show that minute); ``points``: mark every value (a lone minute draws no line)."""
    return {"unit": unit, "points": points, "x": [int(m.at.timestamp()) for m in hour.minutes],
            "series": [{"label": label, "values": [None if v is None else round(v, 3) for v in values]}
                       for label, values in series]}


async def _node_section(node, now: datetime) -> dict:
    pool = node.pool
    stats = pool.stats()
    records = await node.store.list_nodes()
    nodes = [_node_view(record, now, node.settings.node_dead_s, node.registry) for record in records]
    for view in nodes:
        view["heartbeat"] = seconds_text(view["heartbeat_age_s"])
    runtimes = [{"runtime": runtime, **{column: counts.get(column) for column in POOL_COLUMNS}}
                for runtime, counts in sorted(stats.items())]
    return {"machines": pool.total, "max_machines": pool.max_machines, "min_warm": pool.min_warm,
            "max_warm": pool.max_warm, "queue_depth": node.scheduler.queue_depth,
            "in_flight": node.scheduler.in_flight, "runtimes": runtimes, "nodes": nodes,
            "this_node": node.registry.node_id if node.registry is not None else None,
            "snapshots": any(r["templates"] is not None for r in runtimes)}


def duration_text(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 10:
        return f"{value:.2f} ms"
    if value < 1000:
        return f"{value:.0f} ms"
    return f"{value / 1000:.1f} s"


def seconds_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def ago(when: datetime, now: datetime) -> str:
    return seconds_text(max(0.0, (now - when).total_seconds())) + " ago"
