"""Errors as ``application/problem+json`` (RFC 9457): every failure says what was wrong, never a bare 500.

Nimbus's own exceptions map to statuses here, at the HTTP boundary, so the layers below stay HTTP-free.
Every detail is scrubbed of the node's environment values on its way out (:func:`redact`): a message
that quotes one by mistake (a resolver's output, an echoed input) must not hand a tenant the node's keys.
"""

import logging
from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from nimbus import errors
from nimbus.errors import redact
from nimbus.gateway.responses import dumps

log = logging.getLogger("nimbus.gateway")

PROBLEM_TYPE = "application/problem+json"

# Most specific first: the first isinstance match wins.
STATUS_OF: tuple[tuple[type[errors.NimbusError], int], ...] = (
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.PayloadTooLarge, 413),
    (errors.InvalidRequest, 422),
    (errors.Overloaded, 429),
    (errors.Unavailable, 503),
    (errors.StoreError, 503),
    (errors.NimbusError, 500),
)


def problem(status: int, detail: str, *, title: str | None = None, headers: dict | None = None,
            **extra) -> Response:
    phrase = HTTPStatus(status).phrase
    if isinstance(extra.get("errors"), list):
        extra["errors"] = [dict(item, msg=redact(item["msg"])) if isinstance(item.get("msg"), str) else item
                           for item in extra["errors"]]
    body = {"type": f"urn:nimbus:problem:{phrase.lower().replace(' ', '-')}", "title": title or phrase,
            "status": status, "detail": redact(detail), **extra}
    return Response(dumps(body), status_code=status, media_type=PROBLEM_TYPE, headers=headers)


def for_error(exc: errors.NimbusError, method: str, path: str) -> Response:
    """The problem document for one of Nimbus's own errors (also used by the fast invoke path)."""
    status = next(code for kind, code in STATUS_OF if isinstance(exc, kind))
    headers = None
    if isinstance(exc, errors.Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    if status >= 500 and status != 503:
        log.error("request %s %s failed: %s", method, path, exc)
    return problem(status, str(exc), headers=headers)


async def _nimbus_error(request: Request, exc: errors.NimbusError) -> Response:
    return for_error(exc, request.method, request.url.path)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = exc.errors()
    for item in problems:
        if item.get("type") == "json_invalid":
            ctx = item.get("ctx") or {}
            return problem(400, f"the request body is not valid JSON: {ctx.get('error', item.get('msg'))}",
                           title="Malformed JSON")
    lines = []
    for item in problems:
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        lines.append(f"{where}: {item.get('msg')}")
    return problem(422, "; ".join(lines), title="Invalid request",
                   errors=[{"loc": list(i.get("loc", ())), "msg": i.get("msg"), "type": i.get("type")}
                           for i in problems])


async def _http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
    return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, f"an internal error occurred ({type(exc).__name__}); the node keeps serving")


# ---------------------------------------------------------------- the OpenAPI document says the same

PROBLEM_SCHEMA = {
    "title": "Problem",
    "description": "RFC 9457 problem details: every 4xx and 5xx answer of this API",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {"type": "array", "description": "422 from input validation: one entry per problem",
                   "items": {"type": "object", "required": ["loc", "msg", "type"],
                             "properties": {"loc": {"type": "array"}, "msg": {"type": "string"},
                                            "type": {"type": "string"}}}},
    },
}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

# What any operation may answer, whatever its handler does: the body limit and the request parser run
# before it, and the store answers (or not) under it.
COMMON_PROBLEMS = {
    "400": "malformed request: a body that is not JSON, or a Content-Length that is not a number",
    "413": "the request body is over the node's limit",
    "422": "invalid input; `errors` lists each problem",
    "503": "the node cannot serve this now (the store does not answer, or it is shutting down)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "required": True,
                               "schema": {"type": "integer", "minimum": 1}}}


def document_problems(spec: dict) -> dict:
    """Make the OpenAPI document tell the truth about errors: every 4xx/5xx is ``application/problem+json``.

    FastAPI documents its own 422 shape (``HTTPValidationError``) and leaves the statuses the routes name
    without a body; the answers are problem documents (see the handlers above), so the document says so,
    and names the statuses every operation can give. Applied to whatever the routes declare, so a status
    a router adds later is documented the same way.
    """
    for methods in spec.get("paths", {}).values():
        for operation in methods.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for status, description in COMMON_PROBLEMS.items():
                responses.setdefault(status, {"description": description})
            if any(p.get("in") == "path" for p in operation.get("parameters", ())):
                responses.setdefault("404", {"description": "no such resource"})
            for status, response in responses.items():
                if not (status.isdigit() and int(status) >= 400):
                    continue
                if response.get("description") in ("Validation Error", "", None):
                    response["description"] = COMMON_PROBLEMS.get(status, HTTPStatus(int(status)).phrase)
                response["content"] = {PROBLEM_TYPE: {"schema": PROBLEM_REF}}
                if status == "429":
                    response["headers"] = {**RETRY_AFTER, **response.get("headers", {})}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    # FastAPI's own validation-error shapes are never sent: drop them unless something still refers to them
    for name in ("HTTPValidationError", "ValidationError"):  # the first refers to the second
        others = {key: value for key, value in spec.items() if key != "components"}
        others["schemas"] = {key: value for key, value in schemas.items() if key != name}
        if f'"#/components/schemas/{name}"' not in orjson.dumps(others).decode():
            schemas.pop(name, None)
    return spec


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.NimbusError, _nimbus_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_problems(generate())
        return app.openapi_schema

    app.openapi = openapi
