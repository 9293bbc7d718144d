"""Request and response bodies of the HTTP API (DESIGN §3), and the JSON views of store records."""

import re
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ENV_MAX_BYTES = 4096  # Lambda's limit on a function's environment
RESERVED_ENV_PREFIXES = ("NIMBUS_", "AWS_LAMBDA_")
RESERVED_ENV_KEYS = frozenset({"PATH", "HOME", "LANG"})

MEMORY_MB = Field(128, ge=64, le=10240, description="memory limit of each machine, MiB")
TIMEOUT_S = Field(30.0, gt=0, le=900, description="per-call time limit, seconds")
CONCURRENCY = Field(10, ge=1, le=1000, description="machines this function may use at once")


def _check_env(env: dict[str, str] | None) -> dict[str, str] | None:
    if env is None:
        return env
    for key in env:
        if not ENV_KEY.match(key):
            raise ValueError(f"environment variable name {key!r} must match {ENV_KEY.pattern}")
        if key in RESERVED_ENV_KEYS or key.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"environment variable {key!r} is reserved by the platform")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in env.items())
    if size > ENV_MAX_BYTES:
        raise ValueError(f"the environment is {size} bytes; the limit is {ENV_MAX_BYTES}")
    return env


class _Code(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str | None = Field(None, description="source text (one file)")
    code_base64: str | None = Field(None, description="a file or artifact, base64-encoded")
    handler: str | None = Field(None, max_length=256, description="module.function; default per runtime")
    env: dict[str, str] | None = None

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str] | None) -> dict[str, str] | None:
        return _check_env(env)


class FunctionCreate(_Code):
    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits and '-', starting with a letter")
    runtime: str = Field(max_length=64, description="python3, nodejs, go, rust, wasm, or a versioned alias such as python3.11")
    memory_mb: int = MEMORY_MB
    timeout_s: float = TIMEOUT_S
    concurrency: int = CONCURRENCY

    @model_validator(mode="after")
    def _one_code(self) -> "FunctionCreate":
        if (self.code is None) == (self.code_base64 is None):
            raise ValueError("give exactly one of 'code' (source text) or 'code_base64'")
        return self


class FunctionUpdate(_Code):
    runtime: str | None = Field(None, max_length=64)
    memory_mb: int | None = Field(None, ge=64, le=10240)
    timeout_s: float | None = Field(None, gt=0, le=900)
    concurrency: int | None = Field(None, ge=1, le=1000)

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
    cached: bool = Field(description="true when the artifact came from the build cache (no build ran)")
    duration_ms: float = Field(description="the build's duration (the original build's, when cached)")
    log: str = Field(description="the toolchain's output (warnings), clipped")


class FunctionOut(BaseModel):
    id: str
    name: str
    runtime: str
    handler: str
    env: dict[str, str]
    memory_mb: int
    timeout_s: float
    concurrency: int
    version: int
    code_sha256: str
    code_size: int
    artifact_sha256: str | None = Field(None, description="compiled runtimes: the built artifact the machines run")
    artifact_size: int | None = None
    build: BuildOut | None = None
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


class InvokeOut(BaseModel):
    invocation_id: str
    status: str = Field(description="succeeded | failed | timed_out")
    output: Any = None
    error: ErrorOut | None = None
    start: str | None = Field(None, description="cold | warm | hot")
    duration_ms: float | None = None


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
    output: Any = None
    error: ErrorOut | None = None
    logs: str
    logs_truncated: bool
    duration_ms: float | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int


class InvocationList(BaseModel):
    invocations: list[InvocationOut]


def function_view(fn, build=None) -> dict:
    view = {
        "id": fn.id, "name": fn.name, "runtime": fn.runtime, "handler": fn.handler, "env": fn.env,
        "memory_mb": fn.memory_mb, "timeout_s": fn.timeout_s, "concurrency": fn.concurrency, "version": fn.version,
        "code_sha256": fn.code_sha256, "code_size": fn.code_size, "artifact_sha256": fn.artifact_sha256,
        "artifact_size": fn.artifact_size, "created_at": fn.created_at, "updated_at": fn.updated_at,
    }
    if build is not None:
        view["build"] = {"toolchain": build.toolchain, "cached": build.cached, "duration_ms": build.duration_ms,
                         "log": build.log}
    return view


def _output(raw: bytes | None):
    """The function's JSON output, passed through as it came (validated once by the scheduler)."""
    return orjson.Fragment(raw) if raw is not None else None


def invoke_view(inv) -> dict:
    return {"invocation_id": inv.id, "status": inv.status, "output": _output(inv.output), "error": inv.error,
            "start": inv.start, "duration_ms": inv.duration_ms}


def invocation_view(inv) -> dict:
    return {
        "invocation_id": inv.id, "function": inv.function_name, "version": inv.version, "mode": inv.mode,
        "status": inv.status, "start": inv.start, "output": _output(inv.output), "error": inv.error,
        "logs": inv.logs, "logs_truncated": inv.logs_truncated, "duration_ms": inv.duration_ms,
        "created_at": inv.created_at, "started_at": inv.started_at, "finished_at": inv.finished_at,
        "attempts": inv.attempts,
    }
