"""The invoke page: run one of the tenant's functions with a JSON event, sync or async, and see the answer.

A call goes through what the API's routes call, so no rule lives twice: the name and qualifier are
parsed by ``names.merge_qualifier``, resolved by ``Store.lookup_qualified``, the event is read and
checked by ``fast.read_event`` (6 MiB, JSON, nesting), and the call is ``scheduler.invoke`` (as
``fast.invoke_sync``) or ``scheduler.submit_async`` (as the ``/async`` route). The sync path keeps the
record ``invoke`` returns, so its logs show at once without waiting for the row to be written behind.
"""

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from nimbus import protocol
from nimbus.console import web
from nimbus.deployment import LATEST
from nimbus.errors import InvalidRequest, NotFound
from nimbus.gateway import fast, names
from nimbus.store.records import FINISHED_STATUSES

router = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)
VIEWER = Depends(web.viewer)
CHECKED = Depends(web.checked)  # signed in, and the form carries its CSRF token

LISTED_MAX = 200  # functions offered in the picker; a tenant with more types the name
QUALIFIERS_MAX = 50  # newest published versions offered (aliases: all, they are few)
NAME_MAX = 200  # a function name (63) with a qualifier (129) and the colon
# An urlencoded event grows up to 3x (every byte %XX); fast.read_event then holds the decoded one to 6 MiB.
FORM_PART_MAX = 3 * fast.EVENT_MAX + 4096
OUTPUT_SHOWN_MAX = 256 << 10  # pretty-printed output shown inline; the invocation page has the rest
LOG_TAIL_LINES = 200


async def _qualifiers(store, name: str, tenant: str) -> list[tuple[str, str]]:
    """(value, label) of what a call of ``name`` may name: $LATEST, published versions (newest first), aliases."""
    versions = await store.list_published(name, tenant)
    aliases = await store.list_aliases(name, tenant)
    found = [("", f"{LATEST} (unqualified)")]
    found += [(str(v.published), f"version {v.published}") for v in reversed(versions[-QUALIFIERS_MAX:])]
    found += [(a.name, f"alias {a.name} → {a.version}") for a in aliases]
    return found


@router.get("/invoke")
async def invoke_page(request: Request, function: str | None = Query(None, max_length=NAME_MAX),
                      viewer: web.Viewer = VIEWER) -> Response:
    store = web.node(request).store
    listed, total = await store.list_functions(tenant=viewer.tenant, limit=LISTED_MAX)
    chosen = None
    if function:
        base, _ = names.split_qualifier(function)
        chosen = await store.get_function(base, viewer.tenant)  # another tenant's: 404
    elif listed:
        chosen = listed[0]
    names_listed = [f.name for f in listed]
    if chosen is not None and chosen.name not in names_listed:
        names_listed.insert(0, chosen.name)
    qualifiers = await _qualifiers(store, chosen.name, viewer.tenant) if chosen is not None else []
    return web.render(request, "invoke.html", {
        "functions": names_listed, "total": total, "many": total > LISTED_MAX, "chosen": chosen,
        "qualifiers": qualifiers, "event_max": fast.EVENT_MAX,
    })


@router.get("/invoke/qualifiers")
async def qualifiers_fragment(request: Request, function: str = Query("", max_length=NAME_MAX),
                              viewer: web.Viewer = VIEWER) -> Response:
    """The qualifier select for another function (htmx swaps it in when the function changes)."""
    found: list[tuple[str, str]] = []
    if function:
        try:
            found = await _qualifiers(web.node(request).store, function, viewer.tenant)
        except NotFound:
            found = []
    return web.render(request, "invoke_qualifiers.html", {"qualifiers": found, "known": bool(found)})


def _one_body(raw: bytes):
    """An ASGI receive that hands ``fast.read_event`` the whole event at once."""
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}
    return receive


async def _form(request: Request):
    try:
        return await request.form(max_files=0, max_fields=20, max_part_size=FORM_PART_MAX)
    except HTTPException as exc:  # python-multipart's limits: a 4xx that says which
        raise InvalidRequest(f"the form could not be read: {exc.detail}") from None


def _text(form, key: str, limit: int) -> str:
    value = form.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be text")
    if len(value) > limit:
        raise InvalidRequest(f"{key} is over {limit} characters")
    return value


@router.post("/invoke")
async def invoke(request: Request, viewer: web.Viewer = CHECKED) -> Response:
    form = await _form(request)
    name = _text(form, "function", NAME_MAX).strip()
    qualifier = _text(form, "qualifier", 129).strip() or None
    mode = _text(form, "mode", 10) or "sync"
    if not name:
        raise InvalidRequest("choose a function to invoke")
    if mode not in ("sync", "async"):
        raise InvalidRequest("mode must be sync or async")
    node = web.node(request)
    base, qualifier = names.merge_qualifier(name, qualifier)
    fn, version = await node.store.lookup_qualified(base, viewer.tenant, qualifier)
    event = await fast.read_event({"headers": []}, _one_body(_text(form, "event", FORM_PART_MAX).encode()))
    if mode == "sync":
        inv = await node.scheduler.invoke(fn, event, executed_version=version,
                                          call_context=protocol.call_fields(qualifier))
    else:
        inv = await node.scheduler.submit_async(fn, event, executed_version=version)
    # A plain form post (no script) gets a whole page; htmx swaps the fragment into the answer card.
    return web.render(request, "invoke_result.html" if web.is_htmx(request) else "invoke_answer.html", _result(inv))


@router.get("/invoke/result/{invocation_id}")
async def result_fragment(invocation_id: str, request: Request,
                          viewer: web.Viewer = VIEWER) -> Response:
    """An async call's answer so far: polled every second until it ends."""
    if len(invocation_id) > 64:
        raise NotFound("no such invocation")
    inv = await web.node(request).store.get_invocation(invocation_id, viewer.tenant)
    return web.render(request, "invoke_result.html", _result(inv))


def _pretty(raw: bytes | None) -> tuple[str, bool]:
    """The output as indented JSON (clipped for the page), and whether it was clipped."""
    if raw is None:
        return "", False
    try:
        text = orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        text = raw.decode(errors="replace")
    if len(text) > OUTPUT_SHOWN_MAX:
        return text[:OUTPUT_SHOWN_MAX], True
    return text, False


def _tail(logs: str) -> tuple[str, bool]:
    lines = logs.splitlines()
    if len(lines) <= LOG_TAIL_LINES:
        return logs, False
    return "\n".join(lines[-LOG_TAIL_LINES:]), True


def _result(inv) -> dict[str, Any]:
    output, output_clipped = _pretty(inv.output)
    logs, logs_clipped = _tail(inv.logs or "")
    return {"inv": inv, "finished": inv.status in FINISHED_STATUSES, "output": output,
            "output_clipped": output_clipped, "logs": logs, "logs_clipped": logs_clipped or inv.logs_truncated}
