"""The sync invoke path as a plain ASGI handler: the call a node serves most, without the framework.

``POST /api/v1/functions/{name}/invoke`` (``{name}`` may be ``name:qualifier``, or the qualifier may come as
``?qualifier=``) is the hot path: routing, dependency injection, a ``Request``
object and response classes cost more of a warm call than the sandbox round trip does (measured with
``python -m bench.profile``). :class:`FastInvoke` sits inside the auth and body-limit middleware, so
keys, rate limits and the body cap apply as to any route, and answers that one request itself:
same checks, same JSON, same problem documents (``problems.for_error``). Anything else, including an
invoke with an ``Idempotency-Key`` (whose header the route validates), goes on to FastAPI, whose route
stays the documented one in ``/openapi.json``. Both answer through :func:`invoke_sync`, so the two
cannot drift apart (tests/integration/test_invoke_parity.py holds them to it).
"""

from urllib.parse import parse_qs

import orjson

from nimbus import protocol
from nimbus.deployment import LATEST
from nimbus.errors import InvalidRequest, NimbusError, PayloadTooLarge
from nimbus.gateway import names, problems, schemas
from nimbus.gateway.responses import dumps

PREFIX = "/api/v1/functions/"
SUFFIX = "/invoke"
EVENT_MAX = 6 << 20  # Lambda's synchronous payload limit
JSON_HEADERS = [(b"content-type", b"application/json")]


def invoke_name(scope) -> str | None:
    """The function name when ``scope`` is a sync invoke this handler takes, else None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"]
    if not path.startswith(PREFIX) or not path.endswith(SUFFIX):
        return None
    name = path[len(PREFIX):-len(SUFFIX)]
    if not name or "/" in name:
        return None
    for header, _ in scope["headers"]:
        if header == b"idempotency-key":
            return None
    return name


async def read_event(scope, receive) -> bytes:
    """The request body as the event: at most ``EVENT_MAX`` bytes of JSON (empty means ``{}``)."""
    for header, value in scope["headers"]:
        if header == b"content-length" and value.isdigit() and int(value) > EVENT_MAX:
            raise PayloadTooLarge(f"the event is {value.decode()} bytes; the limit is {EVENT_MAX}")
    return check_event(await read_body(receive, "event"))


async def read_body(receive, what: str = "request body") -> bytes:
    """The whole body, at most ``EVENT_MAX`` bytes (``InvalidRequest`` when the client goes away first)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # gone mid-body (or cut off by its deadline): no call
            raise InvalidRequest(f"the client went away before the whole {what} arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > EVENT_MAX:
            raise PayloadTooLarge(f"the {what} is over {EVENT_MAX} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_event(event: bytes) -> bytes:
    """``event`` if it is JSON, ``{}`` if it is blank; ``InvalidRequest`` otherwise."""
    if not event.strip():
        return b"{}"
    try:
        value = orjson.loads(event)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit"):  # orjson's own limit (1024), above ours
            raise _too_deep() from None
        raise InvalidRequest(f"the event is not valid JSON: {exc}") from None
    if protocol.nesting_over(event, value):  # the agents' JSON decoders refuse it too
        raise _too_deep()
    return event


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"the event is nested more than {protocol.NESTING_MAX} levels deep; "
                          f"at most {protocol.NESTING_MAX} levels of arrays and objects are allowed")


def query_qualifier(scope) -> str | None:
    """The ``qualifier`` query parameter of a request (the last one given), or None."""
    raw = scope.get("query_string")
    if not raw:
        return None
    values = parse_qs(raw.decode("latin-1"), keep_blank_values=True).get("qualifier")
    return values[-1] if values else None


async def invoke_sync(node, name: str, tenant: str, scope, receive, idempotency_key: str | None = None,
                      qualifier: str | None = None) -> bytes:
    """The one sync invoke, for this path and the FastAPI route: the body of its 200 answer.

    ``name`` may carry a qualifier (``name:prod``), or ``qualifier`` gives it. The function is looked up
    before the event is read (an unknown one is a 404 whatever the body). A ``NimbusError`` is the caller's
    to answer; both answer it with ``problems.for_error``.
    """
    if qualifier is None and ":" not in name:  # the hot path: no parsing, the plain cached look-up
        fn, version = await node.store.lookup_function(name, tenant), LATEST
    else:
        base, qualifier = names.merge_qualifier(name, qualifier)
        fn, version = await node.store.lookup_qualified(base, tenant, qualifier)
    event = await read_event(scope, receive)
    inv = await node.scheduler.invoke(fn, event, idempotency_key=idempotency_key, executed_version=version,
                                      call_context=protocol.call_fields(qualifier))
    return dumps(schemas.invoke_view(inv))


class FastInvoke:
    """ASGI middleware: serves sync invokes directly, hands every other request to ``app``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        name = invoke_name(scope)
        if name is None:
            await self.app(scope, receive, send)
            return
        try:
            body = await invoke_sync(scope["app"].state.node, name, scope["state"]["nimbus.principal"].tenant,
                                     scope, receive, qualifier=query_qualifier(scope))
        except NimbusError as exc:
            await problems.for_error(exc, scope["method"], scope["path"])(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
