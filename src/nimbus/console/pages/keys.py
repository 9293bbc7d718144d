"""The console's Keys page (admin keys only, auth on): list, filter by tenant, create (shown once), revoke.

Creating and revoking call the API's own route functions (``gateway/keys.py``) with this request, whose
principal ``web.look`` has set: the same refusals, the same last-live-admin-key rule, the same
``guard.forget`` on revoke; nothing about keys is decided twice.
"""

import re
from datetime import datetime

import orjson
from fastapi import APIRouter, Depends, Form, Path, Query, Request
from pydantic import ValidationError
from starlette.responses import RedirectResponse, Response

from nimbus.console import web
from nimbus.errors import InvalidRequest, NotFound
from nimbus.gateway import keys as keys_api

router = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)

SHOWN = 500  # keys listed at most (oldest first); a node has a handful
TENANT_RE = re.compile(keys_api.TENANT_PATTERN)
NO_KEYS = "this node runs with NIMBUS_AUTH=off: it has no API keys to manage"


async def changing_admin(request: Request) -> web.Viewer:
    """A changing request (CSRF checked) from an admin key on a node with auth on: 403 / 404 otherwise."""
    found = await web.checked(request)
    if not found.auth_on:
        raise NotFound(NO_KEYS)
    if not found.admin:
        raise web.Forbidden("managing API keys needs an admin key")
    return found


ADMIN = Depends(web.admin)
CHANGING = Depends(changing_admin)


def when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else ""


def _row(record, viewer: web.Viewer) -> dict:
    return {**keys_api._view(record), "created": when(record.created_at), "revoked": when(record.revoked_at),
            "mine": viewer.principal is not None and viewer.principal.key_id == record.id}


def _tenant_filter(tenant: str | None) -> str | None:
    if not tenant:
        return None
    if not TENANT_RE.fullmatch(tenant):
        raise InvalidRequest(f"{tenant!r} is not a tenant name (lower-case letters, digits, - and _)")
    return tenant


async def _listing(request: Request, viewer: web.Viewer, tenant: str | None) -> dict:
    store = web.node(request).store
    records = await store.list_api_keys(tenant=tenant, limit=SHOWN + 1)
    everyone = records if tenant is None else await store.list_api_keys(limit=SHOWN)
    return {"keys": [_row(r, viewer) for r in records[:SHOWN]], "more": len(records) > SHOWN,
            "tenant": tenant or "", "tenants": sorted({r.tenant for r in everyone} | ({tenant} if tenant else set()))}


@router.get("/keys")
async def keys_page(request: Request, viewer: web.Viewer = ADMIN,
                    tenant: str | None = Query(None, max_length=64)) -> Response:
    if not viewer.auth_on:
        return web.render(request, "keys.html", {"active": "keys", "auth_off": NO_KEYS, "created": None,
                                                 "keys": [], "more": False, "tenant": "", "tenants": []})
    listing = await _listing(request, viewer, _tenant_filter(tenant))
    return web.render(request, "keys.html", {"active": "keys", "auth_off": None, "created": None, **listing})


@router.post("/keys")
async def create_key(request: Request, viewer: web.Viewer = CHANGING,
                     tenant: str = Form(..., max_length=64), name: str = Form("", max_length=keys_api.KEY_NAME_MAX),
                     admin: bool = Form(False)) -> Response:
    try:
        body = keys_api.KeyCreate(tenant=tenant.strip(), name=name.strip(), admin=admin)
    except ValidationError as exc:
        raise InvalidRequest("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    answer = await keys_api.create_key(body, request)
    if answer.status_code != 201:  # the API's own refusal (auth off, not admin): changing_admin said so already
        raise InvalidRequest(orjson.loads(answer.body).get("detail", "the key was not created"))
    created = orjson.loads(answer.body)
    listing = await _listing(request, viewer, None)
    template = "keys_created.html" if web.is_htmx(request) else "keys.html"
    return web.render(request, template, {"active": "keys", "auth_off": None, "created": created, **listing},
                      status=201)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str = Path(..., max_length=64),
                     viewer: web.Viewer = CHANGING) -> Response:
    await keys_api.revoke_key(key_id, request)  # Conflict for the last live admin key; forgets it everywhere
    record = await web.node(request).store.get_api_key(key_id)
    mine = viewer.principal is not None and viewer.principal.key_id == key_id
    if not web.is_htmx(request):
        return RedirectResponse(f"{web.ROOT}/login" if mine else f"{web.ROOT}/keys", status_code=303)
    headers = {"HX-Redirect": f"{web.ROOT}/login"} if mine else None  # this very session just ended
    return web.render(request, "keys_row.html", {"key": _row(record, viewer)}, headers=headers)
