"""Function URLs: every request to ``/fn/{name}[:{qualifier}]/{path…}`` as an HTTP API payload 2.0 event,
and the function's result back as the HTTP response (docs/api.md#function-urls, DESIGN §11).

A raw ASGI handler, like ``fast`` and ``lambda_api``: the request is any method and content type, so no
framework parsing fits, and a warm URL call should cost no more than an ``/api/v1`` invoke. It sits inside
the auth middleware, which admits ``/fn/`` without a key (the URL's ``auth`` decides, here) and records in
``scope["state"]["nimbus.url_key"]`` whether a valid API key came with the request.

Everything in the request is hostile: it is read with limits (6 MiB body, 64 KiB of headers), and
anything that does not decode (percent-encoding, UTF-8) is a 400, never a 5xx.
"""

import base64
import binascii
import time
from urllib.parse import parse_qsl, unquote

import orjson

from nimbus import protocol
from nimbus.deployment import LATEST
from nimbus.errors import InvalidRequest, NimbusError, NotFound, PayloadTooLarge
from nimbus.gateway import fast, problems
from nimbus.gateway.fast import EVENT_MAX
from nimbus.store.statements import new_id

PREFIX = "/fn/"
HEADERS_MAX = 64 << 10  # all request header bytes together
QUERY_FIELDS_MAX = 1000
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript",
              "application/x-www-form-urlencoded", "+json", "+xml")
JSON_HEADERS = [(b"content-type", b"application/json")]
# Hop-by-hop and framing headers the node sets itself; a function's own are dropped.
RESERVED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"})
METHODS_ALL = "GET,HEAD,POST,PUT,PATCH,DELETE,OPTIONS"


class BadGateway(Exception):
    """The function answered with something that is not a valid HTTP response (a 502)."""


def split_path(scope) -> tuple[str, str, str] | None:
    """(name, qualifier or '', raw path after it) of a ``/fn/`` request; None for other paths.

    ``InvalidRequest`` for a ``/fn/`` path whose name does not decode.
    """
    raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if not raw.startswith(PREFIX):
        return None
    head, slash, rest = raw[len(PREFIX):].partition("/")
    name = _decode(head)
    name, _, qualifier = name.partition(":")
    if not name:
        raise InvalidRequest("the URL names no function: /fn/{name}[:{qualifier}]/{path}")
    if qualifier == LATEST:
        qualifier = ""
    return name, qualifier, slash + rest or "/"


def _decode(text: str) -> str:
    """Percent-decoding that refuses what does not decode, instead of passing replacement characters on."""
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("the path is not valid percent-encoded UTF-8") from None


def _is_text(content_type: str) -> bool:
    content_type = content_type.lower()
    return any(kind in content_type for kind in TEXT_TYPES)


def build_event(scope, raw_path: str, body: bytes, request_id: str, account_id: str, *,
                drop_authorization: bool) -> dict:
    """The payload 2.0 event of one request (``InvalidRequest`` for what does not decode)."""
    headers: dict[str, str] = {}
    cookies: list[str] = []
    size = 0
    for name_b, value_b in scope["headers"]:
        size += len(name_b) + len(value_b)
        if size > HEADERS_MAX:
            raise InvalidRequest(f"the request headers are over {HEADERS_MAX} bytes")
        name, value = name_b.decode("latin-1").lower(), value_b.decode("latin-1")
        if name == "cookie":
            cookies.extend(part.strip() for part in value.split(";") if part.strip())
            continue
        if name == "authorization" and drop_authorization:  # the node's API key is not the function's to see
            continue
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    query = (scope.get("query_string") or b"").decode("latin-1")
    params: dict[str, str] = {}
    try:
        for key, value in parse_qsl(query, keep_blank_values=True, errors="strict",
                                    max_num_fields=QUERY_FIELDS_MAX):
            params[key] = f"{params[key]},{value}" if key in params else value
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"the query string does not decode: {exc}") from None
    now = time.time()
    method = scope["method"]
    client = scope.get("client")
    event: dict = {
        "version": "2.0", "routeKey": "$default", "rawPath": raw_path, "rawQueryString": query,
        "headers": headers, "queryStringParameters": params or None,
        "requestContext": {
            "accountId": account_id, "apiId": "nimbus", "domainName": headers.get("host", ""),
            "domainPrefix": headers.get("host", "").split(".", 1)[0].split(":", 1)[0],
            "http": {"method": method, "path": _decode(raw_path),
                     "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
                     "sourceIp": client[0] if client else "", "userAgent": headers.get("user-agent", "")},
            "requestId": request_id, "routeKey": "$default", "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "pathParameters": None, "stageVariables": None, "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = cookies
    if body:
        text = None
        if _is_text(headers.get("content-type", "")):
            try:
                text = body.decode()
            except UnicodeDecodeError:
                text = None
        if text is None:
            event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
        else:
            event["body"] = text
    return event


def _clean(value) -> bytes:
    """A response header value the function gave, refusing what would split the response."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode() if not isinstance(value, bool) \
        else ("true" if value else "false")
    if "\r" in text or "\n" in text or "\0" in text:
        raise BadGateway("a response header value holds a line break")
    return text.encode("latin-1", errors="strict")


def _header_name(name) -> bytes:
    if not isinstance(name, str) or not name or not all(33 <= ord(c) < 127 and c not in '()<>@,;:\\"/[]?={}'
                                                        for c in name):
        raise BadGateway(f"{str(name)[:64]!r} is not a header name")
    return name.lower().encode()


def _listed(values, what: str) -> list:
    if not isinstance(values, list):
        raise BadGateway(f"{str(what)[:64]} is not a list")
    return values


def map_result(output: bytes | None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of the function's result, as Lambda maps a payload 2.0 response."""
    raw = output or b"null"
    try:
        result = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadGateway("the result is not JSON") from None
    if not isinstance(result, dict) or "statusCode" not in result:
        return 200, list(JSON_HEADERS), raw
    try:
        status = result["statusCode"]
        if isinstance(status, str) and status.isdigit():
            status = int(status)
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise BadGateway("statusCode is not an HTTP status")
        headers: list[tuple[bytes, bytes]] = []
        for name, value in (result.get("headers") or {}).items():
            if name.lower() not in RESERVED:
                headers.append((_header_name(name), _clean(value)))
        for name, values in (result.get("multiValueHeaders") or {}).items():
            if name.lower() not in RESERVED:
                headers.extend((_header_name(name), _clean(value)) for value in _listed(values, name))
        headers.extend((b"set-cookie", _clean(cookie)) for cookie in _listed(result.get("cookies") or [], "cookies"))
        body = result.get("body")
        if body is None:
            data = b""
        elif not isinstance(body, str):
            data = orjson.dumps(body)
        elif result.get("isBase64Encoded"):
            data = base64.b64decode(body, validate=True)
        else:
            data = body.encode()
    except (AttributeError, TypeError, ValueError, binascii.Error) as exc:
        raise BadGateway(f"the result is not an HTTP response: {exc}") from None
    if status < 200 or status in (204, 304):  # HTTP allows these no body
        data = b""
    if not any(name == b"content-type" for name, _ in headers) and data:
        headers.append((b"content-type", b"application/json" if body is not None and not isinstance(body, str)
                        else b"text/plain; charset=utf-8"))
    return status, headers, data


def _header(scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value.decode("latin-1")
    return None


def _origin_allowed(cors: dict, origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for ``origin``, or None when CORS does not admit it."""
    origins = cors.get("allow_origins") or []
    if origin is None or not origins:
        return None
    if "*" in origins:
        return origin if cors.get("allow_credentials") else "*"
    return origin if origin in origins else None


def cors_headers(cors: dict, origin: str | None) -> list[tuple[bytes, bytes]]:
    allowed = _origin_allowed(cors, origin)
    if allowed is None:
        return []
    headers = [(b"access-control-allow-origin", allowed.encode("latin-1")), (b"vary", b"origin")]
    if cors.get("allow_credentials"):
        headers.append((b"access-control-allow-credentials", b"true"))
    if cors.get("expose_headers"):
        headers.append((b"access-control-expose-headers", ",".join(cors["expose_headers"]).encode("latin-1")))
    return headers


def preflight_headers(cors: dict, origin: str | None, scope) -> list[tuple[bytes, bytes]]:
    headers = cors_headers(cors, origin)
    if not headers:
        return []
    methods = cors.get("allow_methods") or ["*"]
    headers.append((b"access-control-allow-methods", (METHODS_ALL if "*" in methods else ",".join(methods))
                    .encode("latin-1")))
    asked = _header(scope, b"access-control-request-headers")
    allowed_headers = cors.get("allow_headers") or []
    if allowed_headers:
        value = asked if "*" in allowed_headers and asked else ",".join(allowed_headers)
        headers.append((b"access-control-allow-headers", value.encode("latin-1")))
    if cors.get("max_age") is not None:
        headers.append((b"access-control-max-age", str(int(cors["max_age"])).encode()))
    return headers


async def _answer(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _message(text: str) -> bytes:
    return orjson.dumps({"Message": text})


class FunctionUrls:
    """ASGI middleware: serves every ``/fn/`` request, hands the rest to ``app``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            await self._serve(scope, receive, send)
        except InvalidRequest as exc:
            if isinstance(exc, PayloadTooLarge):
                await _answer(send, 413, JSON_HEADERS, _message(str(exc)))
            else:  # a request that is not valid HTTP for a function: 400, as Lambda answers it
                await _answer(send, 400, JSON_HEADERS, _message(str(exc)))
        except NimbusError as exc:
            await problems.for_error(exc, scope["method"], scope["path"])(scope, receive, send)

    async def _serve(self, scope, receive, send) -> None:
        parts = split_path(scope)
        assert parts is not None  # the prefix was checked
        name, qualifier, raw_path = parts
        node = scope["app"].state.node
        state = scope["state"]
        tenant = state["nimbus.principal"].tenant
        for header, value in scope["headers"]:
            if header == b"content-length" and (not value.isdigit() or int(value) > EVENT_MAX):
                raise PayloadTooLarge(f"the request body is {value.decode('latin-1')[:32]} bytes; "
                                      f"the limit is {EVENT_MAX}")
        try:
            config = await node.store.lookup_function_url(name, tenant, qualifier)
        except NotFound:
            await _answer(send, 404, JSON_HEADERS, _message("no function URL here"))
            return
        cors = config.cors
        origin = _header(scope, b"origin")
        if (scope["method"] == "OPTIONS" and origin is not None and cors.get("allow_origins")
                and _header(scope, b"access-control-request-method") is not None):
            await _answer(send, 200, preflight_headers(cors, origin, scope), b"")
            return
        key = state.get("nimbus.url_key")
        if config.auth == "key" and key is None:
            await _answer(send, 403, JSON_HEADERS, _message("this function URL needs an API key: "
                                                            "Authorization: Bearer <key>"))
            return
        if qualifier:
            fn, version = await node.store.lookup_qualified(name, tenant, qualifier)
        else:
            fn, version = await node.store.lookup_function(name, tenant), LATEST
        body = await fast.read_body(receive)
        request_id = new_id()
        event = build_event(scope, raw_path, body, request_id, node.settings.account_id,
                            drop_authorization=key is not None)
        inv = await node.scheduler.invoke(fn, orjson.dumps(event), executed_version=version,
                                          call_context=protocol.call_fields(qualifier or None), trigger="url",
                                          invocation_id=request_id)
        extra = [(b"x-amzn-requestid", inv.id.encode()), *cors_headers(cors, origin)]
        if inv.status == "timed_out":
            await _answer(send, 504, [*JSON_HEADERS, *extra], _message("the function timed out"))
            return
        if inv.status != "succeeded":
            await _answer(send, 502, [*JSON_HEADERS, *extra], _message("the function failed"))
            return
        try:
            status, headers, data = map_result(inv.output)
        except BadGateway as exc:
            await _answer(send, 502, [*JSON_HEADERS, *extra], _message(f"the function's response is not valid: {exc}"))
            return
        if scope["method"] == "HEAD":
            data = b""
        await _answer(send, status, [*headers, *extra], data)
