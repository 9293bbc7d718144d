"""The function URL config routes: ``PUT/GET/DELETE /api/v1/functions/{name}/url[?qualifier=alias]``.

Serving the URLs is ``gateway/urls.py``'s job; these only say which functions (or aliases) answer there.
"""

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.responses import Response

from nimbus.deployment import LATEST
from nimbus.errors import InvalidRequest
from nimbus.gateway import auth
from nimbus.gateway.responses import JSON
from nimbus.store.versions import check_alias_name

router = APIRouter(prefix="/api/v1", tags=["function URLs"])

Origin = Annotated[str, StringConstraints(pattern=r"^(\*|https?://[^\s/,]{1,253})$")]
Method = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Z]{1,16})$")]
Header = Annotated[str, StringConstraints(pattern=r"^(\*|[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256})$")]
QUALIFIER = Query(None, max_length=128, description="an alias; none (or $LATEST) for the unqualified URL")


class Cors(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allow_origins: list[Origin] = Field(default_factory=list, max_length=100, description="origins, or *")
    allow_methods: list[Method] = Field(default_factory=list, max_length=16, description="methods, or *")
    allow_headers: list[Header] = Field(default_factory=list, max_length=100, description="request headers, or *")
    expose_headers: list[Header] = Field(default_factory=list, max_length=100)
    max_age: int | None = Field(None, ge=0, le=86400, description="seconds a browser may cache a preflight")
    allow_credentials: bool = False


class UrlIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auth: Literal["none", "key"] = Field("key", description="none: anyone may call it; key: an API key is needed")
    cors: Cors = Field(default_factory=lambda: Cors(max_age=None))


class UrlOut(BaseModel):
    function: str
    qualifier: str | None
    url: str = Field(description="where it answers, on this node")
    auth: str
    cors: Cors
    created_at: str
    updated_at: str


def _qualifier(value: str | None) -> str:
    if value is None or value == LATEST:
        return ""
    if value.isdigit():
        raise InvalidRequest("a function URL serves $LATEST or an alias, not a version number: "
                             "point an alias at the version")
    return check_alias_name(value)  # anything else never reaches the store (a NUL was a 503 on PostgreSQL)


def _view(record, request: Request) -> dict:
    path = f"/fn/{record.function_name}" + (f":{record.qualifier}" if record.qualifier else "") + "/"
    return {"function": record.function_name, "qualifier": record.qualifier or None,
            "url": str(request.base_url).rstrip("/") + path, "auth": record.auth, "cors": record.cors,
            "created_at": record.created_at.isoformat(), "updated_at": record.updated_at.isoformat()}


@router.put("/functions/{name}/url", response_model=UrlOut,
            responses={201: {"model": UrlOut, "description": "created"}, 404: {}, 422: {}})
async def put_url(name: str, body: UrlIn, request: Request, qualifier: str | None = QUALIFIER) -> Response:
    """Serve the function (or one alias) at ``/fn/{name}[:{alias}]/…``, or change how."""
    store = request.app.state.node.store
    tenant = auth.tenant(request)
    wanted = _qualifier(qualifier)
    if wanted:
        await store.lookup_qualified(name, tenant, wanted)  # a 404 for an unknown alias
    record, created = await store.put_function_url(name, tenant, wanted, auth=body.auth,
                                                   cors=body.cors.model_dump())
    return JSON(_view(record, request), status_code=201 if created else 200)


@router.get("/functions/{name}/url", response_model=UrlOut, responses={404: {}})
async def get_url(name: str, request: Request, qualifier: str | None = QUALIFIER) -> Response:
    record = await request.app.state.node.store.get_function_url(name, auth.tenant(request), _qualifier(qualifier))
    return JSON(_view(record, request))


@router.delete("/functions/{name}/url", status_code=204, responses={404: {}})
async def delete_url(name: str, request: Request, qualifier: str | None = QUALIFIER) -> Response:
    await request.app.state.node.store.delete_function_url(name, auth.tenant(request), _qualifier(qualifier))
    return Response(status_code=204)
