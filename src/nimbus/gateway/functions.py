"""Functions: create, read, list, update, delete; published versions and aliases; and the two ways to
invoke one (any of them: ``{name}:{qualifier}`` or ``?qualifier=``)."""

import asyncio
import base64
import binascii

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from nimbus import packages, runtimes
from nimbus.compiler import manifests
from nimbus.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from nimbus.gateway import auth, fast, names, schemas
from nimbus.gateway.responses import JSON

router = APIRouter(prefix="/api/v1", tags=["functions"])

SOURCE_MAX = 512 << 10  # source text
ARTIFACT_MAX = 50 << 20  # decoded code_base64
EVENT_MAX = fast.EVENT_MAX
LIST_BYTES_MAX = 16 << 20  # outputs and logs one listing loads: 1,000 rows of 6 MiB would be 6 GiB of memory

EVENT_BODY = {
    "requestBody": {
        "description": "the event: any JSON value, at most 6 MiB (an empty body is {})",
        "required": False,
        "content": {"application/json": {"schema": {}}},
    }
}


def _node(request: Request):
    return request.app.state.node


WASM_MAGIC = b"\0asm"


def _source(body: schemas._Code, runtime: str) -> bytes:
    """The function's code as bytes, checked for size and shape: UTF-8 source, or (wasm) a binary module."""
    if body.code is not None:
        code = body.code.encode()
        if len(code) > SOURCE_MAX:
            raise PayloadTooLarge(f"the source is {len(code)} bytes; the limit is {SOURCE_MAX}")
    else:
        if len(body.code_base64) > ARTIFACT_MAX * 4 // 3 + 4:
            raise PayloadTooLarge(f"code_base64 decodes to more than {ARTIFACT_MAX} bytes")
        try:
            code = base64.b64decode(body.code_base64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("code_base64 is not valid base64") from None
        if len(code) > ARTIFACT_MAX:
            raise PayloadTooLarge(f"the artifact is {len(code)} bytes; the limit is {ARTIFACT_MAX}")
        if packages.is_zip(code):
            return code  # a package: checked with its handler by _check_code
        if runtime == "wasm" and code.startswith(WASM_MAGIC):
            return code  # a prebuilt module: the compiler validates it
        if runtime == "provided":
            return code  # the bootstrap itself: a script, or a prebuilt executable (a static Go binary)
        try:
            code.decode()
        except UnicodeDecodeError:
            raise InvalidRequest(f"{runtime} code must be UTF-8 source text") from None
        if len(code) > SOURCE_MAX:
            raise PayloadTooLarge(f"the source is {len(code)} bytes; the limit is {SOURCE_MAX}")
    return code


def _handler(handler: str | None, runtime: str) -> str:
    return runtimes.check_handler(runtime, handler or runtimes.get(runtime).default_handler)


async def _check_code(runtime: str, code: bytes, handler: str, memory_mb: int) -> None:
    """Refuse a bad package (which entry, and why; one the function's memory cannot unpack), or Python
    that does not parse (which line), now rather than on every call later."""
    if packages.is_zip(code):
        # Reads every entry: off the loop.
        await asyncio.to_thread(packages.check, code, runtime, handler, memory_mb=memory_mb)
        return
    if runtime == "provided":
        packages.check_bootstrap(code, memory_mb)
        return
    if runtime != "python3":
        return
    try:
        compile(code, runtimes.get(runtime).source_filename(handler), "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise InvalidRequest(f"the code does not compile: {exc.msg} (line {exc.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise InvalidRequest(f"the code does not compile: {exc}") from None


def _code_kind(code: bytes, runtime: str) -> str:
    if packages.is_zip(code):
        return "zip"
    if runtime == "provided":
        try:
            code.decode()
        except UnicodeDecodeError:
            return "executable"  # a prebuilt bootstrap: never shown or edited as text
        return "source"
    return "module" if code.startswith(WASM_MAGIC) else "source"


async def _layer(node, runtime: str, code: bytes, tenant: str):
    """The dependency layer a package's requirements.txt or package.json resolves to; None without one.

    Resolved inside the request, like a build: 201 once the layer is stored (or found in the cache),
    422 with pip's or npm's output when a package is unknown or versions conflict.
    """
    if not packages.is_zip(code):
        return None
    spec = await asyncio.to_thread(manifests.spec_of, runtime, code)
    return await node.compiler.layer(spec, tenant=tenant) if spec is not None else None


async def _build(node, runtime: str, code: bytes, tenant: str):
    """Build compiled code (or take it from the build cache); None for interpreted runtimes.

    Runs inside the request: the API answers 201 once the artifact exists, 422 with the compiler's
    output when the build fails or passes its time limit.
    """
    if not runtimes.get(runtime).compiled:
        return None
    return await node.compiler.build(runtime, code, tenant=tenant)


@router.post("/functions", status_code=201, response_model=schemas.FunctionOut,
             responses={409: {"description": "name taken"}, 413: {"description": "code too large"},
                        422: {"description": "invalid, or the build failed (compiler output in detail)"}})
async def create_function(body: schemas.FunctionCreate, request: Request) -> Response:
    fn, build, layer = await create(_node(request), auth.tenant(request), body)
    return JSON(schemas.function_view(fn, build, layer), status_code=201,
                headers={"Location": f"/api/v1/functions/{fn.name}"})


async def create(node, tenant: str, body: schemas.FunctionCreate, **extra):
    """The create both APIs run (/api/v1 and the Lambda API), so checks, builds and layers cannot drift
    apart; ``extra`` goes to the store (``description``, ``role``). Returns (function, build, layer)."""
    runtime = runtimes.normalise(body.runtime)
    handler = _handler(body.handler, runtime)
    code = _source(body, runtime)
    await _check_code(runtime, code, handler, body.memory_mb)
    if runtimes.get(runtime).compiled or packages.is_zip(code):
        # A taken name answers 409 now, not after a build of minutes (the insert still decides races).
        try:
            await node.store.get_function(body.name, tenant)
        except NotFound:
            pass
        else:
            raise Conflict(f"a function named {body.name!r} already exists")
    build = await _build(node, runtime, code, tenant)
    layer = await _layer(node, runtime, code, tenant)
    fn = await node.store.create_function(
        name=body.name, runtime=runtime, handler=handler, env=body.env or {}, memory_mb=body.memory_mb,
        timeout_s=body.timeout_s, concurrency=body.concurrency, code=code, code_kind=_code_kind(code, runtime),
        max_retries=body.max_retries, isolation=body.isolation, tenant=tenant,
        artifact_sha256=build.artifact_sha256 if build else None,
        layer_sha256=layer.artifact_sha256 if layer else None, **extra,
    )
    node.pool.prepare(fn.deployment())
    return fn, build, layer


@router.get("/functions", response_model=schemas.FunctionList)
async def list_functions(
    request: Request,
    runtime: str | None = Query(None, max_length=64),
    limit: int = Query(50, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=(1 << 63) - 1),  # a 64-bit integer: what SQLite and PostgreSQL take
) -> Response:
    runtime = runtimes.normalise(runtime) if runtime else None
    fns, total = await _node(request).store.list_functions(runtime=runtime, limit=limit, offset=offset,
                                                            tenant=auth.tenant(request))
    return JSON({"functions": [schemas.function_view(f) for f in fns], "total": total, "limit": limit,
                 "offset": offset})


@router.get("/functions/{name}", response_model=schemas.FunctionOut)
async def get_function(name: str, request: Request) -> Response:
    return JSON(schemas.function_view(await _node(request).store.get_function(name, auth.tenant(request))))


@router.put("/functions/{name}", response_model=schemas.FunctionOut)
async def update_function(name: str, body: schemas.FunctionUpdate, request: Request) -> Response:
    fn, build, layer = await update(_node(request), auth.tenant(request), name, body)
    return JSON(schemas.function_view(fn, build, layer))


async def update(node, tenant: str, name: str, body: schemas.FunctionUpdate, **extra):
    """The update both APIs run (see ``create``); ``extra`` goes to the store. Returns (function, build, layer)."""
    current = await node.store.get_function(name, tenant)
    runtime = runtimes.normalise(body.runtime) if body.runtime else current.runtime
    has_code = body.code is not None or body.code_base64 is not None
    if runtime != current.runtime and not has_code:
        raise InvalidRequest(f"changing the runtime from {current.runtime} to {runtime} needs new code")
    handler = _handler(body.handler or current.handler, runtime) if (body.handler or body.runtime) else None
    code = _source(body, runtime) if has_code else None
    sized = body.memory_mb is not None and current.code_kind in ("zip", "executable")  # memory must hold its files
    if code is not None or handler is not None or sized:
        await _check_code(runtime, code if code is not None else await node.store.get_code(current.code_sha256),
                          handler or current.handler, body.memory_mb or current.memory_mb)
    build = await _build(node, runtime, code, tenant) if code is not None else None
    layer = await _layer(node, runtime, code, tenant) if code is not None else None
    fn = await node.store.update_function(
        current.id, code=code, code_kind=_code_kind(code, runtime) if code is not None else None,
        runtime=runtime if runtime != current.runtime else None, handler=handler, env=body.env,
        memory_mb=body.memory_mb, timeout_s=body.timeout_s, concurrency=body.concurrency,
        max_retries=body.max_retries, isolation=body.isolation, tenant=tenant,
        artifact_sha256=build.artifact_sha256 if build else None,
        layer_sha256=layer.artifact_sha256 if layer else None, **extra,
    )
    # Only $LATEST moved: published versions keep their machines.
    node.pool.retire_function(fn.id, keep_version_id=fn.version_id, latest_only=True)
    node.pool.prepare(fn.deployment())
    return fn, build, layer


@router.delete("/functions/{name}", status_code=204, responses={404: {"description": "no such function"}})
async def delete_function(name: str, request: Request) -> Response:
    node = _node(request)
    fn = await node.store.delete_function(name, auth.tenant(request))
    node.pool.retire_function(fn.id)
    return Response(status_code=204)


async def _event(request: Request) -> bytes:
    """The raw event bytes, checked to be JSON and within the limit; passed to the machine untouched."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > EVENT_MAX:
        raise PayloadTooLarge(f"the event is {declared} bytes; the limit is {EVENT_MAX}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > EVENT_MAX:
            raise PayloadTooLarge(f"the event is over {EVENT_MAX} bytes")
        chunks.append(chunk)
    return fast.check_event(b"".join(chunks))


QUALIFIER = Query(None, max_length=129, description="$LATEST, a published version number or an alias; the same "
                  "as name:qualifier in the path")

# A repeated key (per tenant) answers with the first invocation instead of running again.
IDEMPOTENCY_KEY = Header(None, alias="Idempotency-Key", max_length=256, pattern=r"^[ -~]*[!-~][ -~]*$",
                         description="1 to 256 printable ASCII characters; a repeat returns the first invocation")


@router.post("/functions/{name}/invoke", response_model=schemas.InvokeOut, openapi_extra=EVENT_BODY,
             responses={404: {}, 409: {"description": "Idempotency-Key used for another request"}, 413: {},
                        429: {"description": "queue full, or (with an Idempotency-Key) the tenant's storage budget "
                                             "is full; see Retry-After"}, 503: {}})
async def invoke(name: str, request: Request, idempotency_key: str | None = IDEMPOTENCY_KEY,
                 qualifier: str | None = QUALIFIER) -> Response:
    """Calls without an Idempotency-Key are answered by ``fast.FastInvoke`` before they get here; both
    run ``fast.invoke_sync``. ``{name}`` may be ``name:qualifier``."""
    body = await fast.invoke_sync(_node(request), name, auth.tenant(request), request.scope, request.receive,
                                  idempotency_key, qualifier)
    return Response(body, media_type=JSON.media_type)


@router.post("/functions/{name}/async", status_code=202, response_model=schemas.AsyncOut,
             openapi_extra=EVENT_BODY,
             responses={404: {}, 409: {"description": "Idempotency-Key used for another request"}, 413: {},
                        422: {"description": "invalid, or a callback URL NIMBUS_CALLBACK_ALLOW does not allow"},
                        429: {"description": "the tenant's stored invocations fill its storage budget; see "
                                             "Retry-After"},
                        503: {}})
async def invoke_async(
    name: str,
    request: Request,
    idempotency_key: str | None = IDEMPOTENCY_KEY,
    callback_header: str | None = Header(None, alias="X-Nimbus-Callback-Url", max_length=2048,
                                         description="POSTed the result once the invocation ends"),
    callback_query: str | None = Query(None, alias="callback_url", max_length=2048,
                                       description="the same as the X-Nimbus-Callback-Url header"),
    qualifier: str | None = QUALIFIER,
) -> Response:
    node = _node(request)
    if callback_header and callback_query and callback_header != callback_query:
        raise InvalidRequest("give the callback URL once: X-Nimbus-Callback-Url and callback_url differ")
    base, qualifier = names.merge_qualifier(name, qualifier)
    # Resolved now: the call runs the version its qualifier named when it was queued, whatever moves later.
    fn, version = await node.store.lookup_qualified(base, auth.tenant(request), qualifier)
    event = await _event(request)
    inv = await node.scheduler.submit_async(fn, event, callback_url=callback_header or callback_query or None,
                                            idempotency_key=idempotency_key, executed_version=version)
    return JSON({"invocation_id": inv.id, "status": inv.status}, status_code=202,
                headers={"Location": f"/api/v1/invocations/{inv.id}"})


@router.get("/functions/{name}/invocations", response_model=schemas.InvocationList)
async def list_invocations(name: str, request: Request, limit: int = Query(50, ge=1, le=1000)) -> Response:
    node = _node(request)
    fn = await node.store.get_function(name, auth.tenant(request))
    invs, truncated = await node.store.list_invocations_page(fn.id, limit=limit, max_bytes=LIST_BYTES_MAX)
    return JSON({"invocations": [schemas.invocation_view(i) for i in invs], "truncated": truncated})


# ---------------------------------------------------------------- published versions


@router.post("/functions/{name}/versions", status_code=201, response_model=schemas.VersionOut,
             responses={200: {"description": "$LATEST was published already: that version"}, 404: {}, 422: {}})
async def publish_version(name: str, request: Request, body: schemas.PublishIn | None = None) -> Response:
    """Publish $LATEST as the next version number (201); when it is published already, that version (200)."""
    node = _node(request)
    tenant = auth.tenant(request)
    before = await node.store.get_function(name, tenant)
    version = await node.store.publish_version(before.id, tenant, description=body.description if body else None)
    fresh = version.id != before.version_id or before.published is None
    return JSON(schemas.version_view(version), status_code=201 if fresh else 200,
                headers={"Location": f"/api/v1/functions/{version.function_name}/versions/{version.published}"})


@router.get("/functions/{name}/versions", response_model=schemas.VersionList, responses={404: {}})
async def list_versions(name: str, request: Request) -> Response:
    found = await _node(request).store.list_published(name, auth.tenant(request))
    return JSON({"versions": [schemas.version_view(v) for v in found]})


@router.get("/functions/{name}/versions/{number}", response_model=schemas.VersionOut, responses={404: {}})
async def get_version(name: str, number: str, request: Request) -> Response:
    return JSON(schemas.version_view(await _node(request).store.get_published(name, auth.tenant(request), number)))


@router.delete("/functions/{name}/versions/{number}", status_code=204,
               responses={404: {}, 409: {"description": "an alias routes calls to this version"}})
async def delete_version(name: str, number: str, request: Request) -> Response:
    node = _node(request)
    gone = await node.store.delete_published(name, auth.tenant(request), number)
    node.pool.retire_version(gone.id, str(gone.published))
    return Response(status_code=204)


# ---------------------------------------------------------------- aliases


@router.post("/functions/{name}/aliases", status_code=201, response_model=schemas.AliasOut,
             responses={404: {"description": "no such function or version"}, 409: {"description": "alias exists"},
                        422: {"description": "bad alias name, version or weights"}})
async def create_alias(name: str, body: schemas.AliasCreate, request: Request) -> Response:
    alias = await _node(request).store.create_alias(
        name, auth.tenant(request), body.name, version=body.version, additional=body.additional,
        description=body.description)
    return JSON(schemas.alias_view(alias), status_code=201,
                headers={"Location": f"/api/v1/functions/{alias.function_name}/aliases/{alias.name}"})


@router.get("/functions/{name}/aliases", response_model=schemas.AliasList, responses={404: {}})
async def list_aliases(name: str, request: Request) -> Response:
    found = await _node(request).store.list_aliases(name, auth.tenant(request))
    return JSON({"aliases": [schemas.alias_view(a) for a in found]})


@router.get("/functions/{name}/aliases/{alias}", response_model=schemas.AliasOut, responses={404: {}})
async def get_alias(name: str, alias: str, request: Request) -> Response:
    return JSON(schemas.alias_view(await _node(request).store.get_alias(name, auth.tenant(request), alias)))


@router.put("/functions/{name}/aliases/{alias}", response_model=schemas.AliasOut, responses={404: {}, 422: {}})
async def update_alias(name: str, alias: str, body: schemas.AliasUpdate, request: Request) -> Response:
    """Point the alias elsewhere. A rollback is one of these; every node sees it within the function cache
    interval (NIMBUS_FUNCTION_CACHE_S)."""
    updated = await _node(request).store.update_alias(
        name, auth.tenant(request), alias, version=body.version, additional=body.additional,
        description=body.description)
    return JSON(schemas.alias_view(updated))


@router.delete("/functions/{name}/aliases/{alias}", status_code=204, responses={404: {}})
async def delete_alias(name: str, alias: str, request: Request) -> Response:
    await _node(request).store.delete_alias(name, auth.tenant(request), alias)
    return Response(status_code=204)
