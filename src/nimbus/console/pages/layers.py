"""The console's Layers page: the dependency layers the API lists (``gateway/layers.py``), and one with its
build log.

What a viewer sees is exactly what ``GET /api/v1/layers`` shows it (the same ``_layers`` call): a tenant
the layers its own functions mount, its own first request's time; an admin every layer, unused ones too,
with other tenants' functions as ``tenant/name``.
"""

import re
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from nimbus.console import web
from nimbus.errors import NotFound
from nimbus.gateway import layers as layers_api

router = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)

VIEWER = Depends(web.viewer)
SHOWN = 200  # rows on the page; the list is newest first
# What pip and npm print once they are done: the packages a layer holds, in one line.
INSTALLED = re.compile(r"^(?:Successfully installed (.+)|(added \d+ packages?.*))$", re.MULTILINE)


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _row(layer, viewer: web.Viewer) -> dict:
    view = layers_api._view(layer, log=True)
    found = INSTALLED.search(layer.log or "")
    # A function page is the viewer's own tenant's: only a plain name (not an admin's tenant/name) links there.
    uses = [{"name": name, "link": "/" not in name} for name in layer.functions]
    return {**view, "short": layer.sha256[:12], "size_text": size(layer.size), "built": when(layer.created_at),
            "took": f"{layer.duration_ms / 1000:.1f} s", "uses": uses,
            "packages": (found.group(1) or found.group(2)) if found else ""}


@router.get("/layers")
async def layers_page(request: Request, viewer: web.Viewer = VIEWER) -> Response:
    layers = await layers_api._layers(request)
    return web.render(request, "layers.html", {
        "active": "layers", "layers": [_row(layer, viewer) for layer in layers[:SHOWN]],
        "more": len(layers) > SHOWN, "everyone": layers_api._everyone(request)})


@router.get("/layers/{sha256}")
async def layer_page(request: Request, sha256: str, viewer: web.Viewer = VIEWER) -> Response:
    if len(sha256) <= 64:
        for layer in await layers_api._layers(request):
            if layer.sha256 == sha256 or layer.key == sha256:
                return web.render(request, "layers_detail.html", {
                    "active": "layers", "layer": _row(layer, viewer), "everyone": layers_api._everyone(request)})
    raise NotFound(f"layer {sha256[:64]!r} not found")
