"""Request and response bodies of the HTTP API (docs/architecture.md#http-api), and the JSON views of store records."""

import re
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from nimbus.runtimes import ANY_HANDLER_PATTERN

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_MAX_BYTES = 4096  # Lambda's limit on a function's environment
RESERVED_ENV_PREFIXES = ("NIMBUS_", "AWS_LAMBDA_")
# Lambda's LoggingConfig, which a function sets through its environment here: the runtimes read them.
ALLOWED_ENV_KEYS = frozenset({"AWS_LAMBDA_LOG_FORMAT", "AWS_LAMBDA_LOG_LEVEL"})
# Lambda's reserved names (the AWS_LAMBDA_ ones are in the prefix) and the sandbox's basics: the agent sets them.
RESERVED_ENV_KEYS = frozenset({
    "PATH", "HOME", "LANG", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR", "TZ", "_HANDLER",
    "_X_AMZN_TRACE_ID",
})

MEMORY_MB = Field(128, ge=64, le=10240, description="memory limit of each machine, MiB")
TIMEOUT_S = Field(30.0, gt=0, le=900, description="per-call time limit, seconds")
CONCURRENCY = Field(10, ge=1, le=1000, description="machines this function may use at once")
MAX_RETRIES = Field(2, ge=0, le=10, description="retries of a failed async invocation, with backoff")
Isolation = Literal["shared", "per-call"]  # nimbus.deployment.ISOLATIONS
ISOLATION_TEXT = ("shared: a machine that served a call stays idle for the next one (Lambda's model); per-call: "
                  "every call runs on a fresh machine, destroyed after it, so two calls share nothing (no /tmp, "
                  "no globals, no thread left behind); concurrency still bounds how many run at once")


def _check_env(env: dict[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return env
    for key in env:
        if not ENV_KEY.fullmatch(key):  # not match: its $ also matches before a trailing newline
            raise ValueError(f"environment variable name {key!r} must match {ENV_KEY.pattern}")
    reserved = sorted(key for key in env if key not in ALLOWED_ENV_KEYS
                      and (key in RESERVED_ENV_KEYS or key.startswith(RESERVED_ENV_PREFIXES)))
    if reserved:
        raise ValueError(f"reserved environment variables cannot be set: {', '.join(reserved)}")
    for key in env:
        if "\0" in env[key]:  # no process environment can hold it: every call would fail to start
            raise ValueError(f"environment variable {key!r} holds a NUL character")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > ENV_MAX_BYTES:
        raise ValueError(f"the environment is {size} bytes; the limit is {ENV_MAX_BYTES}")
    return env


class _Code(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str | None = Field(None, description="source text (one file)")
    code_base64: str | None = Field(None, description="a file or artifact, base64-encoded")
    handler: str | None = Field(None, max_length=256, pattern=ANY_HANDLER_PATTERN,
                                 description="module.function; default per runtime (provided: free-form, e.g. "
                                 "bootstrap, read only by the bootstrap)")
    env: dict[str, str] | None = Field(None, json_schema_extra={
        # the names and values _check_env takes (all but its size limit), stated in the OpenAPI document
        "propertyNames": {"pattern": ENV_KEY.pattern,
                          "not": {"anyOf": [{"enum": sorted(RESERVED_ENV_KEYS)},
                                            {"pattern": "^(?!(" + "|".join(sorted(ALLOWED_ENV_KEYS)) + ")$)("
                                             + "|".join(RESERVED_ENV_PREFIXES) + ")"}]}},
        "additionalProperties": {"type": "string", "pattern": "^[^\\x00]*$"},
    }, description=f"environment variables, at most {ENV_MAX_BYTES} bytes in all; some names are reserved")

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str] | None) -> dict[str, str] | None:
        return _check_env(env)

    @field_validator("*")
    @classmethod
    def _unicode(cls, value):
        """JSON's "\\ud800" escape parses to a lone surrogate: text that cannot be stored or run."""
        texts = [*value.keys(), *value.values()] if isinstance(value, dict) else [value]
        for text in texts:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError:
                    raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
        return value


class FunctionCreate(_Code):
    # the OpenAPI document states the "exactly one of code or code_base64" rule of _one_code
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["code"], "properties": {"code": {"type": "string"}}},
        {"required": ["code_base64"], "properties": {"code_base64": {"type": "string"}}},
    ]})

    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits and '-', starting with a letter")
    runtime: str = Field(max_length=64, examples=["python3", "nodejs", "go", "rust", "wasm", "provided"],
                         description="python3, nodejs, go, rust, wasm, provided (a custom runtime: an executable "
                         "bootstrap), or an alias such as python3.11 or provided.al2023")
    # Strict: JSON true/false are not numbers (lax mode would take false as 0).
    memory_mb: StrictInt = MEMORY_MB
    timeout_s: StrictFloat = TIMEOUT_S
    concurrency: StrictInt = CONCURRENCY
    max_retries: StrictInt = MAX_RETRIES
    isolation: Isolation = Field("shared", description=ISOLATION_TEXT)

    @model_validator(mode="after")
    def _one_code(self) -> "FunctionCreate":
        if (self.code is None) == (self.code_base64 is None):
            raise ValueError("give exactly one of 'code' (source text) or 'code_base64'")
        return self


class FunctionUpdate(_Code):
    # the OpenAPI document states the rules of _something: not empty, and not both kinds of code
    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "not": {
        "required": ["code", "code_base64"],
        "properties": {"code": {"type": "string"}, "code_base64": {"type": "string"}},
    }})

    runtime: str | None = Field(None, max_length=64)
    memory_mb: StrictInt | None = Field(None, ge=64, le=10240)
    timeout_s: StrictFloat | None = Field(None, gt=0, le=900)
    concurrency: StrictInt | None = Field(None, ge=1, le=1000)
    max_retries: StrictInt | None = Field(None, ge=0, le=10)
    isolation: Isolation | None = Field(None, description=ISOLATION_TEXT + "; absent keeps it")

    @model_validator(mode="after")
    def _something(self) -> "FunctionUpdate":
        if self.code is not None and self.code_base64 is not None:
            raise ValueError("give at most one of 'code' or 'code_base64'")
        if not self.model_fields_set:
            raise ValueError("nothing to change: give code and/or settings")
        return self


class BuildOut(BaseModel):
    """How a compiled version's artifact was made; only in the answer to the create or update that built it."""

    toolchain: str
    cached: bool = Field(description="true when this tenant asked for the same build before and it came from "
                         "the build cache; a build another tenant ran says false (the cache is shared, that "
                         "fact is not)")
    duration_ms: float = Field(description="how long this request's build took; when cached, this tenant's "
                               "first request's")
    log: str = Field(description="the toolchain's output (warnings), clipped")


class LayerBuildOut(BaseModel):
    """How a version's dependency layer was resolved; only in the answer to the create or update that made it."""

    sha256: str
    platform: str
    cached: bool = Field(description="true when this tenant asked for the same layer before and it came from "
                         "the cache; a layer another tenant resolved says false (the cache is shared, that "
                         "fact is not)")
    duration_ms: float = Field(description="how long this request's resolve took; when cached, this tenant's "
                               "first request's")
    size: int = Field(description="bytes of the layer archive")
    log: str = Field(description="pip's or npm's output, clipped")


class FunctionOut(BaseModel):
    id: str
    name: str
    runtime: str
    handler: str
    env: dict[str, str]
    memory_mb: int
    timeout_s: float
    concurrency: int
    max_retries: int = 2
    isolation: Isolation = Field(description=ISOLATION_TEXT)
    version: int = Field(description="the revision number of $LATEST (every PUT makes one)")
    published: int | None = Field(None, description="the published version number of this revision, if any")
    description: str = ""
    role: str | None = Field(None, description="the Lambda API's execution role: stored and echoed, it grants "
                             "nothing")
    code_sha256: str
    code_size: int
    code_kind: str = Field("source", description="source (one file), zip (a package), module (prebuilt wasm), or "
                           "executable (a provided function's prebuilt bootstrap)")
    artifact_sha256: str | None = Field(None, description="compiled runtimes: the built artifact the machines run")
    artifact_size: int | None = None
    build: BuildOut | None = None
    layer_sha256: str | None = Field(None, description="packages with requirements.txt or package.json: the "
                                     "dependency layer its machines mount read-only at /opt/layer")
    layer: LayerBuildOut | None = None
    created_at: datetime
    updated_at: datetime


class FunctionList(BaseModel):
    functions: list[FunctionOut]
    total: int
    limit: int
    offset: int


class ErrorOut(BaseModel):
    type: str
    message: str
    stack: str = ""
    attempts: int | None = Field(None, description="async calls that failed for good: how often they were tried")


class InvokeOut(BaseModel):
    invocation_id: str
    status: str = Field(description="succeeded | failed | timed_out")
    output: Any = None
    error: ErrorOut | None = None
    start: str | None = Field(None, description="cold | warm | forked | hot: how its machine came (forked: from the "
                              "version's function template)")
    restored: bool = Field(False, description="the machine came from a snapshot instead of booting (firecracker)")
    duration_ms: float | None = None
    executed_version: str = Field("$LATEST", description="the version that ran: $LATEST or a published number")


class AsyncOut(BaseModel):
    invocation_id: str
    status: str = "queued"


class InvocationOut(BaseModel):
    invocation_id: str
    function: str
    version: int
    mode: str
    status: str
    start: str | None
    restored: bool = False
    output: Any = None
    error: ErrorOut | None = None
    logs: str
    logs_truncated: bool
    duration_ms: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    executed_version: str = Field("$LATEST", description="the version that ran: $LATEST or a published number")
    next_attempt_at: datetime | None = Field(None, description="a queued retry waits until then (backoff)")
    callback_status: str | None = Field(None, description="pending | delivered | failed; null without callback_url")
    callback_attempts: int = 0
    trigger: str = Field("api", description="what started the call: api | url | schedule")


class InvocationList(BaseModel):
    invocations: list[InvocationOut]
    truncated: bool = Field(False, description="true when the listing stopped before `limit` rows because their "
                                               "outputs and logs passed 16 MiB; ask for fewer or fetch each by id")


def function_view(fn, build=None, layer=None) -> dict:
    view = {
        "id": fn.id, "name": fn.name, "runtime": fn.runtime, "handler": fn.handler, "env": fn.env,
        "memory_mb": fn.memory_mb, "timeout_s": fn.timeout_s, "concurrency": fn.concurrency,
        "max_retries": fn.max_retries, "isolation": fn.isolation, "version": fn.version, "published": fn.published,
        "description": fn.description, "role": fn.role,
        "code_sha256": fn.code_sha256, "code_size": fn.code_size, "code_kind": fn.code_kind,
        "artifact_sha256": fn.artifact_sha256,
        "artifact_size": fn.artifact_size, "layer_sha256": fn.layer_sha256, "created_at": fn.created_at,
        "updated_at": fn.updated_at,
    }
    if build is not None:
        view["build"] = {"toolchain": build.toolchain, "cached": build.cached, "duration_ms": build.duration_ms,
                         "log": build.log}
    if layer is not None:
        view["layer"] = {"sha256": layer.artifact_sha256, "platform": layer.toolchain, "cached": layer.cached,
                         "duration_ms": layer.duration_ms, "size": len(layer.artifact), "log": layer.log}
    return view


def _output(raw: bytes | None):
    """The function's JSON output, passed through as it came (validated once by the scheduler)."""
    return orjson.Fragment(raw) if raw is not None else None


def invoke_view(inv) -> dict:
    return {"invocation_id": inv.id, "status": inv.status, "output": _output(inv.output), "error": inv.error,
            "start": inv.start, "restored": inv.restored, "duration_ms": inv.duration_ms,
            "executed_version": inv.executed_version}


def invocation_view(inv) -> dict:
    return {
        "invocation_id": inv.id, "function": inv.function_name, "version": inv.version, "mode": inv.mode,
        "status": inv.status, "start": inv.start, "restored": inv.restored, "output": _output(inv.output),
        "error": inv.error, "logs": inv.logs, "logs_truncated": inv.logs_truncated, "duration_ms": inv.duration_ms,
        "created_at": inv.created_at, "started_at": inv.started_at, "finished_at": inv.finished_at,
        "attempts": inv.attempts, "executed_version": inv.executed_version,
        "next_attempt_at": inv.not_before if inv.status == "queued" else None,
        "callback_status": inv.callback_status, "callback_attempts": inv.callback_attempts,
        "trigger": inv.trigger,
    }


# ---------------------------------------------------------------- versions and aliases

DESCRIPTION = Field("", max_length=256)


class PublishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, max_length=256, description="the version's description")


class VersionOut(BaseModel):
    """A published version: an immutable revision's settings and code under its number."""

    version: str = Field(description="the published number, as text (Lambda's Version)")
    revision: int = Field(description="the revision number (the function's version when it was made)")
    revision_id: str
    description: str
    runtime: str
    handler: str
    env: dict[str, str]
    memory_mb: int
    timeout_s: float
    concurrency: int
    max_retries: int
    isolation: Isolation = Field(description=ISOLATION_TEXT)
    code_sha256: str
    code_size: int
    artifact_sha256: str | None = None
    layer_sha256: str | None = None
    created_at: datetime


class VersionList(BaseModel):
    versions: list[VersionOut]


_WEIGHTS = Field(None, description="at most one published version → the share of calls (0 to 1) it gets",
                 examples=[{"4": 0.1}])


class AliasCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="letters, digits, '-' and '_', not all digits")
    version: StrictInt | str = Field(description="a published number, or $LATEST (without additional)",
                                     examples=["3"])
    additional: dict[str, StrictFloat | StrictInt] | None = _WEIGHTS
    description: str = DESCRIPTION


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: StrictInt | str | None = None
    additional: dict[str, StrictFloat | StrictInt] | None = Field(
        None, description="replaces the weighted version; {} removes it; absent keeps it")
    description: str | None = Field(None, max_length=256)


class AliasOut(BaseModel):
    name: str
    function: str
    version: str
    additional: dict[str, float]
    description: str
    revision_id: str
    created_at: datetime
    updated_at: datetime


class AliasList(BaseModel):
    aliases: list[AliasOut]


def version_view(v) -> dict:
    return {
        "version": str(v.published), "revision": v.version, "revision_id": v.id, "description": v.description,
        "runtime": v.runtime, "handler": v.handler, "env": v.env, "memory_mb": v.memory_mb, "timeout_s": v.timeout_s,
        "concurrency": v.concurrency, "max_retries": v.max_retries, "isolation": v.isolation,
        "code_sha256": v.code_sha256, "code_size": v.code_size, "artifact_sha256": v.artifact_sha256,
        "layer_sha256": v.layer_sha256, "created_at": v.created_at,
    }


def alias_view(a) -> dict:
    return {
        "name": a.name, "function": a.function_name, "version": str(a.version),
        "additional": {str(k): w for k, w in a.additional.items()}, "description": a.description,
        "revision_id": a.revision_id, "created_at": a.created_at, "updated_at": a.updated_at,
    }
