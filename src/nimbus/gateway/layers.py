"""Dependency layers as objects: list them, show one, and collect what nothing uses (``nimbus gc``).

A layer is shared by every function with the same dependencies, whichever tenant owns it: a tenant sees
the layers its own functions mount; an admin key (or a node with auth off) sees them all, unused ones
too. A tenant is shown its own first request for a layer (when, how long), never the build another
tenant ran, which would tell it what that tenant deployed. Garbage collection removes build-cache
entries and layers no function version references, and the node's unpacked copies of them; it needs
an admin key.
"""

from datetime import datetime

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from nimbus.errors import NotFound
from nimbus.gateway import auth
from nimbus.gateway.problems import problem
from nimbus.gateway.responses import JSON

router = APIRouter(prefix="/api/v1", tags=["layers"])

DEFAULT_GRACE_S = 60.0  # a deploy stores its build, then its version: leave it that long to do both


class LayerOut(BaseModel):
    sha256: str = Field(description="sha256 of the layer archive: what function versions reference")
    key: str | None = Field(description="the cache key: sha256 of runtime, platform and the manifest files")
    runtime: str
    platform: str = Field(description="what it was resolved for: interpreter or node version, machine, libc")
    size: int = Field(description="bytes of the archive (tar.gz)")
    duration_ms: float = Field(description="how long resolving it took: for a tenant, its own first request")
    created_at: datetime = Field(description="when it was resolved: for a tenant, when it first asked for it")
    functions: list[str] = Field(description="functions with a version that mounts it")


class LayerDetail(LayerOut):
    log: str = Field(description="the package tool's output when it was built, clipped")


class LayerList(BaseModel):
    layers: list[LayerOut]


class GarbageOut(BaseModel):
    builds: int = Field(description="unused build-cache entries of compiled functions removed")
    layers: int = Field(description="unused dependency layers removed")
    artifacts: int = Field(description="stored blobs removed (artifacts and layer archives)")
    bytes: int = Field(description="bytes those blobs held")
    unpacked: int = Field(description="unpacked layer directories removed from this node")


def _everyone(request: Request) -> bool:
    return not auth.auth_on(request) or auth.principal(request).admin


def _view(layer, *, log: bool = False) -> dict:
    view = {"sha256": layer.sha256, "key": layer.key, "runtime": layer.runtime, "platform": layer.platform,
            "size": layer.size, "duration_ms": layer.duration_ms, "created_at": layer.created_at,
            "functions": layer.functions}
    if log:
        view["log"] = layer.log
    return view


async def _layers(request: Request):
    return await request.app.state.node.store.list_layers(None if _everyone(request) else auth.tenant(request))


@router.get("/layers", response_model=LayerList)
async def list_layers(request: Request) -> Response:
    return JSON({"layers": [_view(layer) for layer in await _layers(request)]})


@router.get("/layers/{sha256}", response_model=LayerDetail, responses={404: {"description": "no such layer"}})
async def get_layer(sha256: str, request: Request) -> Response:
    for layer in await _layers(request):
        if layer.sha256 == sha256 or layer.key == sha256:
            return JSON(_view(layer, log=True))
    raise NotFound(f"layer {sha256!r} not found")


@router.post("/gc", response_model=GarbageOut,
             responses={403: {"description": "the key is not an admin key"}})
async def collect_garbage(request: Request,
                          grace_s: float = Query(DEFAULT_GRACE_S, ge=0, le=10 ** 9,
                                                 description="keep what was stored less than this long ago")
                          ) -> Response:
    """Remove unused build-cache entries, layers and artifacts; never one a function version references."""
    if not _everyone(request):
        return problem(403, "garbage collection touches every tenant's builds: it needs an admin key")
    node = request.app.state.node
    counts = await node.store.collect_garbage(grace_s=grace_s)
    counts["unpacked"] = node.layers.prune(await node.store.layer_shas())
    return JSON(counts)
