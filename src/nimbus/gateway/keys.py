"""API key management for admin keys: create (the key is shown once), list, revoke.

Only admin keys may use these routes; any other key gets 403 (the routes are in the public OpenAPI
document, so hiding them behind a 404 would hide nothing). With auth off there are no keys to manage: 404.
"""

from datetime import datetime

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from nimbus.errors import Conflict
from nimbus.gateway import auth
from nimbus.gateway.problems import problem
from nimbus.gateway.responses import JSON
from nimbus.store.records import DEFAULT_TENANT

router = APIRouter(prefix="/api/v1", tags=["keys"])

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
KEY_NAME_MAX = 64  # api_keys.name
ADMIN_ONLY = {403: {"description": "the key is not an admin key"},
              404: {"description": "auth is off on this node, or no such key"}}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(DEFAULT_TENANT, pattern=TENANT_PATTERN, description="the tenant the key acts for")
    name: str = Field("", max_length=KEY_NAME_MAX, pattern=r"^[^\x00]*$", description="a label for people")
    admin: bool = Field(False, description="may manage the keys of every tenant")


class KeyOut(BaseModel):
    id: str
    tenant: str
    name: str
    prefix: str = Field(description="the key's first characters, to recognise it")
    admin: bool
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself: shown in this answer only, never again")
    access_key_id: str = Field(description="the Lambda API's SigV4 access key id (the key's id)")
    secret_access_key: str = Field(description="the Lambda API's SigV4 secret: shown in this answer only")


class KeyList(BaseModel):
    keys: list[KeyOut]


def _view(record) -> dict:
    return {"id": record.id, "tenant": record.tenant, "name": record.name, "prefix": record.prefix,
            "admin": record.admin, "created_at": record.created_at, "revoked_at": record.revoked_at}


def _refusal(request: Request) -> Response | None:
    if not auth.auth_on(request):
        return problem(404, "this node runs with NIMBUS_AUTH=off: it has no API keys to manage")
    if not auth.principal(request).admin:
        return problem(403, "managing API keys needs an admin key")
    return None


@router.post("/keys", status_code=201, response_model=KeyCreated, responses=ADMIN_ONLY)
async def create_key(body: KeyCreate, request: Request) -> Response:
    if (refused := _refusal(request)) is not None:
        return refused
    key, secret = auth.new_key(), auth.new_secret()
    record = await request.app.state.node.store.create_api_key(
        tenant=body.tenant, name=body.name, key_hash=auth.hash_key(key), admin=body.admin,
        prefix=auth.display_prefix(key), secret=secret)
    return JSON({**_view(record), "key": key, "access_key_id": record.id, "secret_access_key": secret},
                status_code=201, headers={"Location": f"/api/v1/keys/{record.id}"})


@router.get("/keys", response_model=KeyList, responses=ADMIN_ONLY)
async def list_keys(
    request: Request, tenant: str | None = Query(None, pattern=TENANT_PATTERN, description="only this tenant's"),
) -> Response:
    if (refused := _refusal(request)) is not None:
        return refused
    records = await request.app.state.node.store.list_api_keys(tenant=tenant)
    return JSON({"keys": [_view(r) for r in records]})


@router.delete("/keys/{key_id}", response_model=KeyOut,
               responses={**ADMIN_ONLY, 409: {"description": "the last live admin key cannot be revoked"}})
async def revoke_key(key_id: str, request: Request) -> Response:
    """Revoke a key; it stays listed with ``revoked_at``. Revoking it again changes nothing."""
    if (refused := _refusal(request)) is not None:
        return refused
    store = request.app.state.node.store
    target = await store.get_api_key(key_id)
    if target.admin and target.revoked_at is None:
        if len(await store.list_api_keys(admin=True, live=True, limit=2)) < 2:
            raise Conflict("this is the last live admin key: create another admin key before revoking it")
    record = await store.revoke_api_key(key_id)
    request.app.state.guard.forget(record.key_hash)
    return JSON(_view(record))
