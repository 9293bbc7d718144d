"""Lambda's API errors as botocore parses them (rest-json): the code in ``x-amzn-ErrorType``, a JSON body
``{"Type", "message"}``, the request id in ``x-amzn-RequestId``. Nimbus's own errors are mapped here, in one
place, so every route answers the modeled exception (``client.exceptions.ResourceNotFoundException`` …).

Never a 5xx for something a retry would repeat: botocore retries 500/502/503/504 on its own.
"""

import logging
import math
import uuid

import orjson
from pydantic import ValidationError

from nimbus.errors import (
    Conflict,
    InvalidRequest,
    NimbusError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
    redact,
)

log = logging.getLogger("nimbus.lambda_api")


class LambdaError(Exception):
    """An answer in Lambda's error shape: ``code`` (the modeled exception's name), HTTP ``status``."""

    def __init__(self, code: str, status: int, message: str, *, kind: str = "User",
                 headers: dict[str, str] | None = None, extra: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.message, self.kind = code, status, message, kind
        self.headers = headers or {}
        self.extra = extra or {}


def not_found(message: str) -> LambdaError:
    return LambdaError("ResourceNotFoundException", 404, message)


def conflict(message: str) -> LambdaError:
    return LambdaError("ResourceConflictException", 409, message)


def invalid(message: str) -> LambdaError:
    return LambdaError("InvalidParameterValueException", 400, message)


def bad_content(message: str) -> LambdaError:
    return LambdaError("InvalidRequestContentException", 400, message)


def precondition(message: str) -> LambdaError:
    return LambdaError("PreconditionFailedException", 412, message)


def signature(message: str) -> LambdaError:
    return LambdaError("InvalidSignatureException", 403, message)


def unknown_key(message: str = "The security token included in the request is invalid.") -> LambdaError:
    return LambdaError("UnrecognizedClientException", 403, message)


def missing_auth() -> LambdaError:
    return LambdaError("MissingAuthenticationTokenException", 403, "Missing Authentication Token")


def throttled(message: str, retry_after: float, reason: str = "CallerRateLimitExceeded") -> LambdaError:
    return LambdaError("TooManyRequestsException", 429, message,
                       headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
                       extra={"retryAfterSeconds": str(max(1, math.ceil(retry_after))), "Reason": reason})


def of(exc: BaseException) -> LambdaError:
    """The Lambda error for any exception a route let out: Nimbus's tree by class, anything else a 500."""
    if isinstance(exc, LambdaError):
        return exc
    if isinstance(exc, NotFound):
        return not_found(redact(str(exc)))
    if isinstance(exc, Conflict):
        return conflict(redact(str(exc)))
    if isinstance(exc, PayloadTooLarge):
        return LambdaError("RequestTooLargeException", 413, redact(str(exc)))
    if isinstance(exc, InvalidRequest):
        return invalid(redact(str(exc)))
    if isinstance(exc, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
        return invalid(redact(problems))
    if isinstance(exc, Overloaded):
        return throttled(redact(str(exc)), exc.retry_after, "ConcurrentInvocationLimitExceeded")
    if isinstance(exc, Unavailable | NimbusError):
        return LambdaError("ServiceException", 500, redact(str(exc)), kind="Service")
    log.exception("Lambda API request failed", exc_info=exc)
    return LambdaError("ServiceException", 500, "the node failed to serve this request", kind="Service")


def request_id() -> str:
    return str(uuid.uuid4())


async def send(error: LambdaError, send_fn, rid: str | None = None) -> None:
    """Answer ``error`` on a raw ASGI ``send``."""
    body = orjson.dumps({"Type": error.kind, "message": error.message, **error.extra})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-amzn-errortype", error.code.encode()), (b"x-amzn-requestid", (rid or request_id()).encode()),
               *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await send_fn({"type": "http.response.start", "status": error.status, "headers": headers})
    await send_fn({"type": "http.response.body", "body": body})
