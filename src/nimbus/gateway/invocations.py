"""One invocation's status, result and logs."""

from fastapi import APIRouter, Request
from starlette.responses import Response

from nimbus.gateway import auth, schemas
from nimbus.gateway.responses import JSON

router = APIRouter(prefix="/api/v1", tags=["invocations"])


@router.get("/invocations/{invocation_id}", response_model=schemas.InvocationOut, responses={404: {}})
async def get_invocation(invocation_id: str, request: Request) -> Response:
    inv = await request.app.state.node.store.get_invocation(invocation_id, auth.tenant(request))
    return JSON(schemas.invocation_view(inv))
