"""Errors as ``application/problem+json`` (RFC 9457): every failure says what was wrong, never a bare 500.

Nimbus's own exceptions map to statuses here, at the HTTP boundary, so the layers below stay HTTP-free.
"""

import logging
from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from nimbus import errors

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
    body = {"type": f"urn:nimbus:problem:{phrase.lower().replace(' ', '-')}", "title": title or phrase,
            "status": status, "detail": detail, **extra}
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_TYPE, headers=headers)


async def _nimbus_error(request: Request, exc: errors.NimbusError) -> Response:
    status = next(code for kind, code in STATUS_OF if isinstance(exc, kind))
    headers = None
    if isinstance(exc, errors.Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    if status >= 500 and status != 503:
        log.error("request %s %s failed: %s", request.method, request.url.path, exc)
    return problem(status, str(exc), headers=headers)


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
                   errors=[{"loc": list(i.get("loc", ())), "msg": i.get("msg"), "type": i.get("type")} for i in problems])


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


def install(app: FastAPI) -> None:
    app.add_exception_handler(errors.NimbusError, _nimbus_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
