"""Schedules of a function: ``/api/v1/functions/{name}/schedules``. Pause and resume are a PUT of ``enabled``.

The expression is checked here, at create and update, so a bad one is a 422 naming the field instead of a
schedule that never fires.
"""

from datetime import datetime

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from nimbus.errors import InvalidRequest
from nimbus.gateway import auth
from nimbus.store.records import LATEST, utcnow
from nimbus.store.schedules import ScheduleRecord
from nimbus.store.versions import check_alias_name
from nimbus.triggers.expressions import EXPRESSION_MAX, parse

router = APIRouter(prefix="/api/v1", tags=["schedules"])

SCHEDULE_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"  # EventBridge's rule names
INPUT_MAX = 8192  # EventBridge's limit on a target's fixed input


class ScheduleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=SCHEDULE_NAME_PATTERN)
    expression: str = Field(max_length=EXPRESSION_MAX, description="rate(value unit) or cron(six fields), UTC")
    qualifier: str = Field(LATEST, max_length=128, description="$LATEST, a published version or an alias")
    input: dict | list | str | int | float | bool | None = Field(
        None, description="a fixed event instead of the EventBridge Scheduled Event")
    enabled: bool = True


class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expression: str | None = Field(None, max_length=EXPRESSION_MAX)
    qualifier: str | None = Field(None, max_length=128)
    input: dict | list | str | int | float | bool | None = None
    enabled: bool | None = None


class ScheduleOut(BaseModel):
    name: str
    function: str
    qualifier: str
    expression: str
    input: dict | list | str | int | float | bool | None
    enabled: bool
    next_fire_at: datetime | None
    created_at: datetime
    updated_at: datetime


def _view(record: ScheduleRecord) -> dict:
    return {"name": record.name, "function": record.function_name, "qualifier": record.qualifier,
            "expression": record.expression, "input": None if record.input is None else orjson.loads(record.input),
            "enabled": record.enabled, "next_fire_at": record.next_fire_at, "created_at": record.created_at,
            "updated_at": record.updated_at}


def _first_fire(expression: str) -> datetime:
    found = parse(expression).first_after(utcnow())
    if found is None:
        raise InvalidRequest(f"{expression!r} has no fire time in the future")
    return found


def _input(value) -> str | None:
    if value is None:
        return None
    text = orjson.dumps(value).decode()
    if len(text) > INPUT_MAX:
        raise InvalidRequest(f"a schedule's input is at most {INPUT_MAX} characters of JSON")
    return text


def _qualifier(value: str) -> str:
    if value != LATEST and not value.isdigit():
        check_alias_name(value)
    return value


@router.post("/functions/{name}/schedules", status_code=201, response_model=ScheduleOut,
             responses={404: {}, 409: {"description": "a schedule of that name exists"}, 422: {}})
async def create_schedule(name: str, body: ScheduleCreate, request: Request) -> dict:
    store = request.app.state.node.store
    record = await store.create_schedule(
        name, auth.tenant(request), name=body.name, qualifier=_qualifier(body.qualifier),
        expression=body.expression.strip(), input=_input(body.input), enabled=body.enabled,
        next_fire_at=_first_fire(body.expression))
    return _view(record)


@router.get("/functions/{name}/schedules", responses={404: {}})
async def list_schedules(name: str, request: Request) -> dict:
    records = await request.app.state.node.store.list_schedules(name, auth.tenant(request))
    return {"schedules": [ScheduleOut(**_view(r)).model_dump(mode="json") for r in records]}


@router.get("/functions/{name}/schedules/{schedule}", response_model=ScheduleOut, responses={404: {}})
async def get_schedule(name: str, schedule: str, request: Request) -> dict:
    return _view(await request.app.state.node.store.get_schedule(name, auth.tenant(request), schedule))


@router.put("/functions/{name}/schedules/{schedule}", response_model=ScheduleOut, responses={404: {}, 422: {}})
async def update_schedule(name: str, schedule: str, body: ScheduleUpdate, request: Request) -> dict:
    """Change what is given. A new expression, or resuming, starts counting from now: a paused schedule
    does not make up for the ticks it skipped."""
    store = request.app.state.node.store
    tenant = auth.tenant(request)
    current = await store.get_schedule(name, tenant, schedule)
    values: dict = {}
    if body.qualifier is not None:
        values["qualifier"] = _qualifier(body.qualifier)
    if "input" in body.model_fields_set:
        values["input"] = _input(body.input)
    if body.enabled is not None:
        values["enabled"] = body.enabled
    expression = body.expression.strip() if body.expression is not None else current.expression
    if body.expression is not None or (body.enabled and not current.enabled):
        values["expression"] = expression
        values["next_fire_at"] = _first_fire(expression)
    return _view(await store.update_schedule(name, tenant, schedule, **values))


@router.delete("/functions/{name}/schedules/{schedule}", status_code=204, responses={404: {}})
async def delete_schedule(name: str, schedule: str, request: Request) -> Response:
    await request.app.state.node.store.delete_schedule(name, auth.tenant(request), schedule)
    return Response(status_code=204)
