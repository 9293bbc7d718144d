"""What the agent's parts share: the function being served, one call, the failure they report, limits.

A runtime module (``python3``, ``nodejs``, ``go``, ``rust``, ``wasm``) provides a class built from a
:class:`FunctionSpec` with three methods: ``load()`` (load the handler or start the program, once per
machine), ``invoke(event, call) -> bytes`` (run one call, return the result as JSON bytes) and
``close()``. Both raise :class:`InvocationError` for anything
the host must hear about as an ``error`` frame.

Stdlib only and cheap to import: no dataclasses or typing here (each costs milliseconds at start).
"""

import os
import sys
import time

from nimbus.agent.contract import LAYER_DIR, OPT_DIR, RESULT_MAX, SDK_DIRS
from nimbus.protocol import QUALIFIER_RE

ERROR_TYPE_MAX = 256  # characters of an error's type
# Characters kept of an error's message and of its stack. With the 64 KiB log tail the error header stays
# under protocol.HEADER_MAX even when every character needs a 12-byte JSON escape.
ERROR_TEXT_MAX = 16 * 1024
COMPILED_RUNTIMES = frozenset({"go", "rust", "wasm"})  # built into an artifact; the handler field is ignored
# Runtimes whose handler is not ``module.function``: the compiled ones, and ``provided``, whose bootstrap
# reads ``_HANDLER`` as it likes (Lambda's custom runtimes take any string).
FREE_HANDLER_RUNTIMES = COMPILED_RUNTIMES | {"provided"}
DEFAULT_ACCOUNT_ID = "000000000000"
DEFAULT_REGION = "us-east-1"
RUNTIME_DIR = os.path.dirname(os.path.abspath(__file__))  # what Lambda calls /var/runtime: the agent's own code


def clip(text: str, limit: int) -> str:
    """Cut ``text`` to about ``limit`` characters, keeping its head and its tail (both carry meaning)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n... [{cut} characters cut] ...\n{text[-half:]}"


class InvocationError(Exception):
    """A failure the host hears about as an ``error`` frame: ``{type, message, stack}`` plus ``fatal``.

    ``fatal`` tells the host the machine must not be used again (the runtime died or its state is unknown).
    """

    def __init__(self, type_: str, message: str, stack: str = "", fatal: bool = False) -> None:
        super().__init__(message)
        self.type = clip(str(type_), ERROR_TYPE_MAX)
        self.message = clip(str(message), ERROR_TEXT_MAX)
        self.stack = clip(str(stack), ERROR_TEXT_MAX)
        self.fatal = fatal

    def to_dict(self) -> dict:
        """The ``error`` object of the frame."""
        return {"type": self.type, "message": self.message, "stack": self.stack}


def result_too_large(size: int) -> InvocationError:
    """The error for a result over :data:`RESULT_MAX` (the nodejs runner words it the same way)."""
    return InvocationError("ResultTooLarge", f"result of {size} bytes is over the limit of {RESULT_MAX} bytes (6 MiB)")


def too_deep() -> InvocationError:
    """The error for an event nested deeper than ``protocol.NESTING_MAX`` (the gateway refuses them too)."""
    from nimbus.protocol import NESTING_MAX

    return InvocationError("InvalidEvent", f"the event is nested more than {NESTING_MAX} levels deep")


def check_result_size(output: bytes) -> bytes:
    """Return ``output`` when it fits the result limit; raise ``ResultTooLarge`` otherwise."""
    if len(output) > RESULT_MAX:
        raise result_too_large(len(output))
    return output


def _text(header: dict, key: str, default: str | None = None) -> str:
    value = header.get(key, default)
    if not isinstance(value, str) or not value:
        raise InvocationError("InvalidInit", f"init field {key!r} must be a non-empty string")
    return value


def _number(header: dict, key: str, default: float) -> float:
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvocationError("InvalidInit", f"init field {key!r} must be a positive number")
    return value


def _layer(header: dict) -> str | None:
    """The layer directory the init header names (absent or null: none); only :data:`LAYER_DIR` is valid."""
    value = header.get("layer")
    if value is None:
        return None
    if value != LAYER_DIR:
        raise InvocationError("InvalidInit", f"init field 'layer' must be {LAYER_DIR!r} when present")
    return LAYER_DIR


def _sdk(header: dict, runtime: str) -> str | None:
    """The bundled SDK's directory the init header names (absent or null: none); only the runtime's own
    :data:`SDK_DIRS` entry is valid, so a header cannot put another path on the function's import path."""
    value = header.get("sdk")
    if value is None:
        return None
    if value != SDK_DIRS.get(runtime):
        raise InvocationError("InvalidInit", f"init field 'sdk' must be {SDK_DIRS.get(runtime)!r} when present")
    return value


def _env(header: dict) -> dict:
    env = header.get("env") or {}
    if not isinstance(env, dict):
        raise InvocationError("InvalidInit", "init field 'env' must be an object of strings")
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or not isinstance(value, str) or "\0" in value:
            raise InvocationError("InvalidInit", f"environment variable {key!r} has an invalid name or value")
    return env


def _account(header: dict) -> str:
    value = header.get("account_id", DEFAULT_ACCOUNT_ID)
    if not isinstance(value, str) or len(value) != 12 or not value.isascii() or not value.isdigit():
        raise InvocationError("InvalidInit", "init field 'account_id' must be twelve digits")
    return value


def new_trace_id() -> str:
    """An X-Ray trace header as Lambda sets ``_X_AMZN_TRACE_ID`` for each call (never sampled here)."""
    random = os.urandom(20).hex()
    return f"Root=1-{int(time.time()):08x}-{random[:24]};Parent={random[24:]};Sampled=0"


class FunctionSpec:
    """The function version a machine serves, read (and checked) from the ``init`` header."""

    __slots__ = ("runtime", "handler", "filename", "env", "memory_mb", "timeout_s", "name", "version", "task_dir",
                 "layer", "sdk", "account_id", "region", "machine_id", "log_stream_name")

    def __init__(self, header: dict, task_dir: str) -> None:
        self.runtime = _text(header, "runtime")
        if self.runtime in COMPILED_RUNTIMES:  # the artifact is the whole program: no handler to name or check
            handler = header.get("handler")
            self.handler = handler if isinstance(handler, str) else ""
        else:
            self.handler = _text(header, "handler")
        self.filename = _text(header, "filename")
        self.env = _env(header)
        self.memory_mb = int(_number(header, "memory_mb", 128))
        self.timeout_s = float(_number(header, "timeout_s", 30.0))
        self.name = _text(header, "function_name", "function")
        self.version = str(header.get("function_version", "$LATEST"))
        self.task_dir = task_dir
        self.layer = _layer(header)  # the dependency layer's directory, or None
        self.sdk = _sdk(header, self.runtime)  # the bundled AWS SDK's directory, or None
        self.account_id = _account(header)
        self.region = _text(header, "region", DEFAULT_REGION)
        self.machine_id = os.urandom(16).hex()  # one init per machine: made once, as Lambda names its streams
        day = time.strftime("%Y/%m/%d", time.gmtime())
        self.log_stream_name = f"{day}/[{self.version}]{self.machine_id}"
        if self.runtime not in FREE_HANDLER_RUNTIMES and "." not in self.handler.strip("."):
            raise InvocationError("InvalidInit", f"handler {self.handler!r} must look like 'module.function'")
        if "/" in self.filename or "\0" in self.filename or self.filename in (".", ".."):
            raise InvocationError("InvalidInit", f"filename {self.filename!r} must be a plain file name")

    @property
    def handler_parts(self) -> tuple[str, str]:
        """``("module", "function")`` from ``"module.function"`` (the module part may be dotted)."""
        module, _, function = self.handler.rpartition(".")
        return module, function

    @property
    def arn(self) -> str:
        """The function's ARN as Lambda gives it to the handler (unqualified)."""
        return f"arn:aws:lambda:{self.region}:{self.account_id}:function:{self.name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.name}"

    def environment(self) -> dict:
        """The process environment the function runs with: the sandbox's basics, its own, then Lambda's.

        ``AWS_EXECUTION_ENV`` is the runtime's to add (node knows its own version); ``_X_AMZN_TRACE_ID``
        is set per call.
        """
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        # Lambda's unreserved default, which the function may override: the X-Ray SDK logs, rather than
        # raises, when code traces outside a segment (at import, in a thread).
        env["AWS_XRAY_CONTEXT_MISSING"] = "LOG_ERROR"
        if self.runtime == "provided":
            # Its python3 is the node's own interpreter, which requirements.txt layers are resolved for;
            # /opt/nimbus/bin holds only that link. (A layer keeps no console scripts: no bin to add.)
            env["PATH"] = f"{OPT_DIR}/bin:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(self.env)
        if self.runtime == "provided" and self.layer is not None:
            # Where python3 and node find the layer's packages; after the function's own entries.
            for key in ("PYTHONPATH", "NODE_PATH"):
                own = env.get(key)
                env[key] = f"{own}{os.pathsep}{self.layer}" if own else self.layer
        # Set last so a function cannot pretend to be another one (the API refuses these names too).
        env.update(
            AWS_LAMBDA_FUNCTION_NAME=self.name,
            AWS_LAMBDA_FUNCTION_VERSION=self.version,
            AWS_LAMBDA_FUNCTION_MEMORY_SIZE=str(self.memory_mb),
            AWS_LAMBDA_LOG_GROUP_NAME=self.log_group_name,
            AWS_LAMBDA_LOG_STREAM_NAME=self.log_stream_name,
            AWS_LAMBDA_INITIALIZATION_TYPE="on-demand",
            AWS_REGION=self.region,
            AWS_DEFAULT_REGION=self.region,
            NIMBUS_FUNCTION_NAME=self.name,
            LAMBDA_TASK_ROOT=self.task_dir,
            LAMBDA_RUNTIME_DIR=RUNTIME_DIR,
            TZ=":UTC",
            _HANDLER=self.handler,
        )
        if self.runtime == "python3":
            env["AWS_EXECUTION_ENV"] = f"AWS_Lambda_python{sys.version_info[0]}.{sys.version_info[1]}"
        return env


class Call:
    """One ``exec`` request: its invocation id, the time it has left, and what it alone tells the function:
    the qualifier it was invoked with and the caller's client context (``protocol.call_fields``)."""

    __slots__ = ("invocation_id", "deadline_ms", "started", "qualifier", "client_context")

    def __init__(self, header: dict, spec: FunctionSpec) -> None:
        self.invocation_id = str(header.get("invocation_id") or "")
        qualifier = header.get("qualifier")
        self.qualifier = qualifier if isinstance(qualifier, str) and QUALIFIER_RE.fullmatch(qualifier) else None
        client_context = header.get("client_context")
        self.client_context = client_context if isinstance(client_context, dict) else None
        deadline_ms = header.get("deadline_ms")
        if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, int | float) or deadline_ms < 0:
            deadline_ms = spec.timeout_s * 1000
        self.deadline_ms = float(deadline_ms)
        self.started = time.monotonic()

    def arn(self, spec: FunctionSpec) -> str:
        """The ARN the call was invoked by: the function's, with ``:<qualifier>`` when it named one."""
        return spec.arn if self.qualifier is None else f"{spec.arn}:{self.qualifier}"

    def remaining_ms(self) -> int:
        """Milliseconds left before the host gives up on this call (never negative)."""
        elapsed_ms = (time.monotonic() - self.started) * 1000
        return max(0, int(self.deadline_ms - elapsed_ms))
