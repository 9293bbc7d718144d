"""The Lambda API (``/2015-03-31/functions…``) as one raw ASGI handler, in rest-json as botocore models it.

Raw ASGI rather than FastAPI routes, for two reasons: the answers must be Lambda's (its error shapes, its
status codes, a raw payload as the body), not FastAPI's validation documents; and the Invoke is the call a
boto3 user makes most, which should cost no more than ``/api/v1``'s fast path (``gateway/fast.py``).

Every operation reads its body (bounded), checks the SigV4 signature the auth middleware left to check
(it needs the body's hash) and only then touches the store. Creates and updates run
``gateway.functions.create`` / ``update``, the invokes ``node.scheduler``: what ``/api/v1`` runs.
"""

import base64
import binascii
from urllib.parse import parse_qsl, unquote

import orjson

from nimbus import protocol
from nimbus.errors import InvalidRequest
from nimbus.gateway import fast, functions, schemas
from nimbus.gateway.lambda_api import errors, names, shapes, sigv4
from nimbus.gateway.lambda_api.shapes import LATEST

ROOT = "/2015-03-31/"
FUNCTIONS = "/2015-03-31/functions"
INVOKE_MAX = fast.EVENT_MAX  # Lambda's synchronous payload limit; async calls take it too, as /api/v1 does
CODE_MAX = 70 << 20  # a 50 MiB zip in base64 plus the JSON around it, as /api/v1's body cap
JSON_MAX = 1 << 20  # every other operation's body
LOG_TAIL = 4096  # X-Amz-Log-Result: the last 4 KB of the log
LIST_MAX = 1000  # items per page, whatever MaxItems asks: the rest comes with NextMarker
DEFAULT_TIMEOUT_S = 3  # Lambda's defaults, which differ from /api/v1's
DEFAULT_MEMORY_MB = 128
LOADER_ERRORS = {"ImportModuleError": "Runtime.ImportModuleError", "HandlerNotFound": "Runtime.HandlerNotFound",
                 "SyntaxError": "Runtime.UserCodeSyntaxError"}
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
JSON_HEADERS = [(b"content-type", b"application/json")]
WANTED_HEADERS = frozenset({b"content-length", b"x-amz-invocation-type", b"x-amz-log-type", b"x-amz-client-context"})


class Call:
    """One request: its scope, the node, the caller's tenant, the path's parts and the query."""

    __slots__ = ("scope", "receive", "node", "tenant", "parts", "query", "account", "region", "headers")

    def __init__(self, scope, receive, parts: list[str]) -> None:
        self.scope, self.receive, self.parts = scope, receive, parts
        self.node = scope["app"].state.node
        self.tenant = scope["state"]["nimbus.principal"].tenant
        self.account, self.region = self.node.settings.account_id, self.node.settings.region
        query = scope.get("query_string")
        self.query = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True)) if query else {}
        self.headers = {key: value for key, value in scope["headers"] if key in WANTED_HEADERS}

    def header(self, name: str) -> str | None:
        value = self.headers.get(name.encode())
        return value.decode("latin-1") if value is not None else None

    async def body(self, limit: int, operation: str) -> bytes:
        """The whole body, at most ``limit`` bytes, with its signature checked (when auth is on)."""
        declared = self.header("content-length")
        too_large = errors.LambdaError("RequestTooLargeException", 413,
                                       f"Request must be smaller than {limit} bytes for the {operation} operation")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise errors.bad_content("the client went away before the whole body arrived")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        pending = self.scope["state"].get("nimbus.sigv4")
        if pending is not None:
            sigv4.verify(*pending, self.scope, body)
        return body

    async def json(self, limit: int, operation: str, *, required: bool = True) -> dict:
        raw = await self.body(limit, operation)
        if not raw.strip() and not required:
            return {}
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise errors.bad_content("Could not parse request body into json") from None
        if not isinstance(data, dict):
            raise errors.bad_content("the request body must be a JSON object")
        return data

    def name(self, qualifier_param: bool = False) -> tuple[str, str | None]:
        param = self.query.get("Qualifier") if qualifier_param else None
        return names.qualified(self.parts[0], param, self.account, self.region)

    def configuration(self, record, version: str = LATEST, arn_qualifier: str | None = None) -> dict:
        return shapes.configuration(record, account=self.account, region=self.region, version=version,
                                    arn_qualifier=arn_qualifier)


# ---------------------------------------------------------------- request fields


def _field(data: dict, key: str, kind, *, required: bool = False, default=None):
    value = data.get(key)
    if value is None:
        if required:
            raise errors.invalid(f"{key} is required")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise errors.invalid(f"{key} must be {getattr(kind, '__name__', kind)}")
    return value


def _zip(value: str, key: str = "ZipFile") -> str:
    """A blob member: base64 in the JSON body, handed to /api/v1's code_base64 (which decodes and bounds it)."""
    if not isinstance(value, str):
        raise errors.invalid(f"{key} must be base64 text")
    try:
        base64.b64decode(value[:64] + "=" * (-len(value[:64]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise errors.invalid(f"{key} is not valid base64") from None
    return value


def _environment(data: dict) -> dict | None:
    env = _field(data, "Environment", dict)
    if env is None:
        return None
    variables = env.get("Variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise errors.invalid("Environment.Variables must map names to strings")
    return variables


def _unsupported(data: dict) -> None:
    """Refuse what would be accepted but not honoured (rather than ignoring it silently)."""
    if data.get("PackageType", "Zip") != "Zip":
        raise errors.invalid("PackageType Image is not supported on Nimbus: give Code.ZipFile")
    if data.get("Layers"):
        raise errors.invalid("Lambda layers are not supported on Nimbus: put requirements.txt or package.json "
                             "in the zip (a dependency layer is built from it)")
    architectures = data.get("Architectures")
    if architectures not in (None, ["x86_64"]):
        raise errors.invalid("Architectures must be [\"x86_64\"] on Nimbus")


def _timeout(data: dict, default: int | None) -> float | None:
    value = _field(data, "Timeout", int, default=default)
    return float(value) if value is not None else None


def _revision(call: Call, data: dict, current_revision: str) -> None:
    wanted = _field(data, "RevisionId", str)
    if wanted is not None and wanted != shapes.revision_id(current_revision):
        raise errors.precondition("The Revision Id provided does not match the latest Revision Id. Call the "
                                  "GetFunction/GetAlias API to retrieve the latest Revision Id")


def _page(call: Call, items: list, key: str) -> dict:
    """One page of ``items``: ``Marker`` is the index to start at, ``MaxItems`` the count."""
    start = _index(call.query.get("Marker"), "Marker")
    count = _index(call.query.get("MaxItems"), "MaxItems", default=50)
    if count < 1:
        raise errors.invalid("MaxItems must be at least 1")
    count = min(count, LIST_MAX)
    page = {key: items[start:start + count]}
    if start + count < len(items):
        page["NextMarker"] = str(start + count)
    return page


def _index(value: str | None, key: str, default: int = 0) -> int:
    if value is None:
        return default
    if not value.isdigit() or len(value) > 18:
        raise errors.invalid(f"{key} {value[:40]!r} is not valid")
    return int(value)


# ---------------------------------------------------------------- functions


async def create_function(call: Call):
    data = await call.json(CODE_MAX, "CreateFunction")
    _unsupported(data)
    name, qualifier = names.parse(_field(data, "FunctionName", str, required=True), call.account, call.region)
    if qualifier is not None:
        raise errors.invalid("CreateFunction takes a function name without a qualifier")
    role = _field(data, "Role", str, required=True)
    code = _field(data, "Code", dict, required=True)
    if set(code) - {"ZipFile"} or "ZipFile" not in code:
        raise errors.invalid("Nimbus takes the code as Code.ZipFile only (no S3 or image code)")
    description = _field(data, "Description", str, default="")
    body = schemas.FunctionCreate(
        name=name, runtime=_field(data, "Runtime", str, required=True), code_base64=_zip(code["ZipFile"]),
        handler=_field(data, "Handler", str, required=True), env=_environment(data),
        memory_mb=_field(data, "MemorySize", int, default=DEFAULT_MEMORY_MB),
        timeout_s=_timeout(data, DEFAULT_TIMEOUT_S))
    fn, _, _ = await functions.create(call.node, call.tenant, body, description=description, role=role)
    if _field(data, "Publish", bool, default=False):
        version = await call.node.store.publish_version(fn.id, call.tenant)
        return 201, call.configuration(version, str(version.published), str(version.published))
    return 201, call.configuration(fn)


async def _resolve(call: Call, name: str, qualifier: str | None):
    """(record, version label, ARN qualifier) for a read of ``name`` at ``qualifier``."""
    store = call.node.store
    if qualifier is None or qualifier == LATEST:
        return await store.get_function(name, call.tenant), LATEST, qualifier
    if qualifier.isdigit():
        version = await store.get_published(name, call.tenant, int(qualifier))
        return version, qualifier, qualifier
    alias = await store.get_alias(name, call.tenant, qualifier)
    if str(alias.version) == LATEST:
        return await store.get_function(name, call.tenant), LATEST, qualifier
    version = await store.get_published(name, call.tenant, int(alias.version))
    return version, str(alias.version), qualifier


async def get_function(call: Call):
    await call.body(JSON_MAX, "GetFunction")
    record, version, arn_qualifier = await _resolve(call, *call.name(qualifier_param=True))
    return 200, {"Configuration": call.configuration(record, version, arn_qualifier),
                 "Code": {"RepositoryType": "Nimbus"}}


async def get_configuration(call: Call):
    await call.body(JSON_MAX, "GetFunctionConfiguration")
    record, version, arn_qualifier = await _resolve(call, *call.name(qualifier_param=True))
    return 200, call.configuration(record, version, arn_qualifier)


async def list_functions(call: Call):
    await call.body(JSON_MAX, "ListFunctions")
    start = _index(call.query.get("Marker"), "Marker")
    count = min(max(_index(call.query.get("MaxItems"), "MaxItems", default=50), 1), LIST_MAX)
    fns, total = await call.node.store.list_functions(runtime=None, limit=count, offset=start, tenant=call.tenant)
    page = {"Functions": [call.configuration(fn) for fn in fns]}
    if start + len(fns) < total:
        page["NextMarker"] = str(start + len(fns))
    return 200, page


async def delete_function(call: Call):
    await call.body(JSON_MAX, "DeleteFunction")
    name, qualifier = call.name(qualifier_param=True)
    if qualifier is None:
        fn = await call.node.store.delete_function(name, call.tenant)
        call.node.pool.retire_function(fn.id)
    elif qualifier.isdigit():
        await call.node.store.delete_published(name, call.tenant, int(qualifier))
    else:
        raise errors.invalid(f"Deletion of {qualifier} is not allowed: give a version number, or no qualifier")
    return 204, None


async def update_code(call: Call):
    data = await call.json(CODE_MAX, "UpdateFunctionCode")
    _unsupported(data)
    name = _unqualified(call)
    if set(data) & {"S3Bucket", "S3Key", "S3ObjectVersion", "ImageUri"} or "ZipFile" not in data:
        raise errors.invalid("Nimbus takes the code as ZipFile only (no S3 or image code)")
    if data.get("DryRun"):
        raise errors.invalid("DryRun is not supported on Nimbus")
    current = await call.node.store.get_function(name, call.tenant)
    _revision(call, data, current.version_id)
    body = schemas.FunctionUpdate(code_base64=_zip(data["ZipFile"]))
    fn, _, _ = await functions.update(call.node, call.tenant, current.id, body)
    return 200, await _maybe_publish(call, data, fn)


async def update_configuration(call: Call):
    data = await call.json(JSON_MAX, "UpdateFunctionConfiguration")
    _unsupported(data)
    name = _unqualified(call)
    current = await call.node.store.get_function(name, call.tenant)
    _revision(call, data, current.version_id)
    settings = {"handler": _field(data, "Handler", str), "runtime": _field(data, "Runtime", str),
                "memory_mb": _field(data, "MemorySize", int), "timeout_s": _timeout(data, None),
                "env": _environment(data)}
    settings = {key: value for key, value in settings.items() if value is not None}
    extra = {key: value for key, value in (("description", _field(data, "Description", str)),
                                           ("role", _field(data, "Role", str))) if value is not None}
    if not settings and not extra:
        return 200, call.configuration(current)
    body = schemas.FunctionUpdate(**settings) if settings else schemas.FunctionUpdate.model_construct()
    fn, _, _ = await functions.update(call.node, call.tenant, current.id, body, **extra)
    return 200, call.configuration(fn)


async def _maybe_publish(call: Call, data: dict, fn) -> dict:
    if _field(data, "Publish", bool, default=False):
        version = await call.node.store.publish_version(fn.id, call.tenant)
        return call.configuration(version, str(version.published), str(version.published))
    return call.configuration(fn)


def _unqualified(call: Call) -> str:
    name, qualifier = call.name()
    if qualifier is not None:
        raise errors.invalid("this operation takes a function name without a qualifier")
    return name


# ---------------------------------------------------------------- versions and aliases


async def publish_version(call: Call):
    data = await call.json(JSON_MAX, "PublishVersion", required=False)
    name = _unqualified(call)
    current = await call.node.store.get_function(name, call.tenant)
    _revision(call, data, current.version_id)
    sha = _field(data, "CodeSha256", str)
    if sha is not None and sha != shapes.code_sha256(current.code_sha256):
        raise errors.invalid(f"CodeSHA256 ({sha}) is different from current CodeSHA256 in $LATEST "
                             f"({shapes.code_sha256(current.code_sha256)}). Please try again with the CodeSHA256 "
                             "in $LATEST.")
    version = await call.node.store.publish_version(current.id, call.tenant,
                                                    description=_field(data, "Description", str))
    return 201, call.configuration(version, str(version.published), str(version.published))


async def list_versions(call: Call):
    await call.body(JSON_MAX, "ListVersionsByFunction")
    name = _unqualified(call)
    store = call.node.store
    latest = await store.get_function(name, call.tenant)
    published = await store.list_published(latest.id, call.tenant)
    items = [call.configuration(latest, LATEST, LATEST)]
    items += [call.configuration(v, str(v.published), str(v.published)) for v in published]
    return 200, _page(call, items, "Versions")


def _version_of(value) -> int | str:
    if value == LATEST:
        return LATEST
    if isinstance(value, str) and value.isdigit() and len(value) <= 18:
        return int(value)
    raise errors.invalid(f"FunctionVersion {str(value)[:40]!r} must be $LATEST or a version number")


def _routing(data: dict) -> dict | None:
    routing = _field(data, "RoutingConfig", dict)
    if routing is None:
        return None
    weights = routing.get("AdditionalVersionWeights") or {}
    if not isinstance(weights, dict):
        raise errors.invalid("RoutingConfig.AdditionalVersionWeights must map a version to a weight")
    additional = {}
    for version, weight in weights.items():
        number = _version_of(version)
        if number == LATEST:
            raise errors.invalid("an additional version must be a published version number")
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise errors.invalid("a routing weight must be a number between 0 and 1")
        additional[number] = float(weight)
    return additional


def _alias(call: Call, record) -> dict:
    return shapes.alias_configuration(record, account=call.account, region=call.region)


async def create_alias(call: Call):
    data = await call.json(JSON_MAX, "CreateAlias")
    name = _unqualified(call)
    alias = await call.node.store.create_alias(
        name, call.tenant, _field(data, "Name", str, required=True),
        version=_version_of(_field(data, "FunctionVersion", str, required=True)),
        additional=_routing(data), description=_field(data, "Description", str, default=""))
    return 201, _alias(call, alias)


async def list_aliases(call: Call):
    await call.body(JSON_MAX, "ListAliases")
    name = _unqualified(call)
    aliases = await call.node.store.list_aliases(name, call.tenant)
    wanted = call.query.get("FunctionVersion")
    items = [_alias(call, a) for a in aliases
             if wanted is None or str(a.version) == wanted or str(wanted) in {str(v) for v in a.additional}]
    return 200, _page(call, items, "Aliases")


async def get_alias(call: Call):
    await call.body(JSON_MAX, "GetAlias")
    return 200, _alias(call, await call.node.store.get_alias(_unqualified(call), call.tenant, call.parts[2]))


async def update_alias(call: Call):
    data = await call.json(JSON_MAX, "UpdateAlias", required=False)
    name = _unqualified(call)
    store = call.node.store
    if _field(data, "RevisionId", str) is not None:
        _revision(call, data, (await store.get_alias(name, call.tenant, call.parts[2])).revision_id)
    version = _field(data, "FunctionVersion", str)
    alias = await store.update_alias(name, call.tenant, call.parts[2],
                                     version=_version_of(version) if version is not None else None,
                                     additional=_routing(data), description=_field(data, "Description", str))
    return 200, _alias(call, alias)


async def delete_alias(call: Call):
    await call.body(JSON_MAX, "DeleteAlias")
    await call.node.store.delete_alias(_unqualified(call), call.tenant, call.parts[2])
    return 204, None


# ---------------------------------------------------------------- invoke


def _client_context(value: str | None) -> dict | None:
    """X-Amz-Client-Context checked as Lambda checks it (base64 of a JSON object, at most 3,583 bytes) and
    decoded: the function sees it as ``context.client_context`` / ``context.clientContext``."""
    if value is None:
        return None
    message = "Client context must be a valid Base64-encoded JSON object."
    if len(value) > protocol.CLIENT_CONTEXT_MAX:
        raise errors.invalid(f"Client context must be at most {protocol.CLIENT_CONTEXT_MAX} bytes")
    try:
        decoded = orjson.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        raise errors.bad_content(message) from None
    if not isinstance(decoded, dict):
        raise errors.bad_content(message)
    return decoded


def function_error(inv, timeout_s: float) -> dict:
    """The payload of a failed call, as Lambda's runtimes write it (awslambdaric's ``make_error``)."""
    if inv.status == "timed_out":
        return {"errorType": "Sandbox.Timedout",
                "errorMessage": f"RequestId: {inv.id} Error: Task timed out after {timeout_s:.2f} seconds"}
    error = inv.error or {}
    kind = str(error.get("type") or "Error")
    stack = error.get("stack") or ""
    return {"errorMessage": str(error.get("message") or ""), "errorType": LOADER_ERRORS.get(kind, kind),
            "requestId": inv.id, "stackTrace": stack.splitlines() if isinstance(stack, str) else list(stack)}


async def invoke(call: Call, send) -> None:
    name, qualifier = call.name(qualifier_param=True)
    kind = call.header("x-amz-invocation-type") or "RequestResponse"
    if kind not in INVOCATION_TYPES:
        raise errors.invalid(f"X-Amz-Invocation-Type must be one of {', '.join(INVOCATION_TYPES)}")
    log_type = call.header("x-amz-log-type") or "None"
    if log_type not in ("None", "Tail"):
        raise errors.invalid("X-Amz-Log-Type must be None or Tail")
    client_context = _client_context(call.header("x-amz-client-context"))
    raw = await call.body(INVOKE_MAX, "Invoke")
    store = call.node.store
    if qualifier is None:  # the hot path: the cached look-up /api/v1's fast path uses
        fn, executed = await store.lookup_function(name, call.tenant), LATEST
    else:
        fn, executed = await store.lookup_qualified(name, call.tenant, qualifier)
    if kind == "DryRun":
        await _answer(send, 204, b"", [])
        return
    try:
        event = fast.check_event(raw)
    except InvalidRequest as exc:
        raise errors.bad_content(f"Could not parse request body into json: {exc}") from None
    if kind == "Event":
        inv = await call.node.scheduler.submit_async(fn, event, executed_version=executed)
        await _answer(send, 202, b"", [(b"x-amzn-requestid", inv.id.encode())])
        return
    inv = await call.node.scheduler.invoke(fn, event, executed_version=executed,
                                           call_context=protocol.call_fields(qualifier, client_context))
    headers = [*JSON_HEADERS, (b"x-amzn-requestid", inv.id.encode()),
               (b"x-amz-executed-version", getattr(inv, "executed_version", executed).encode())]
    if inv.status == "succeeded":
        body = inv.output or b"null"
    else:
        body = orjson.dumps(function_error(inv, float(fn.timeout_s)))
        headers.append((b"x-amz-function-error", b"Unhandled"))
    if log_type == "Tail":
        headers.append((b"x-amz-log-result", base64.b64encode((inv.logs or "").encode()[-LOG_TAIL:])))
    await _answer(send, 200, body, headers)


# ---------------------------------------------------------------- dispatch


async def _answer(send, status: int, body: bytes, headers: list) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


ROUTES = {
    (0, "GET"): list_functions, (0, "POST"): create_function,
    (1, "GET"): get_function, (1, "DELETE"): delete_function,
    (2, "configuration", "GET"): get_configuration, (2, "configuration", "PUT"): update_configuration,
    (2, "code", "PUT"): update_code,
    (2, "versions", "GET"): list_versions, (2, "versions", "POST"): publish_version,
    (2, "aliases", "GET"): list_aliases, (2, "aliases", "POST"): create_alias,
    (3, "aliases", "GET"): get_alias, (3, "aliases", "PUT"): update_alias, (3, "aliases", "DELETE"): delete_alias,
}


def _parts(scope) -> list[str] | None:
    """The path's segments after ``/2015-03-31/functions``, each percent-decoded; None for another path."""
    raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    if raw != FUNCTIONS and not raw.startswith(FUNCTIONS + "/"):
        return None
    rest = raw[len(FUNCTIONS) + 1:]
    parts = [unquote(part) for part in rest.split("/")] if rest else []
    if any(not part for part in parts):
        return None
    return parts


def _route(parts: list[str], method: str):
    if len(parts) == 2 and parts[1] == "invocations" and method == "POST":
        return invoke
    if len(parts) <= 1:
        return ROUTES.get((len(parts), method))
    return ROUTES.get((len(parts), parts[1], method))


class LambdaApi:
    """ASGI middleware: answers every request under ``/2015-03-31/``, hands the rest to ``app``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(ROOT):
            await self.app(scope, receive, send)
            return
        try:
            parts = _parts(scope)
            handler = _route(parts, scope["method"]) if parts is not None else None
            if handler is None:
                raise errors.LambdaError("UnknownOperationException", 404, "Unknown operation")
            call = Call(scope, receive, parts)
            if handler is invoke:
                await invoke(call, send)
                return
            status, view = await handler(call)
        except Exception as exc:  # every error is answered in Lambda's shape, a bug's as ServiceException
            await errors.send(errors.of(exc), send)
            return
        body = orjson.dumps(view) if view is not None else b""
        await _answer(send, status, body, [*JSON_HEADERS, (b"x-amzn-requestid", errors.request_id().encode())])
