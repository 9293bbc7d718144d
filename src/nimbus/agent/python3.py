"""The ``python3`` runtime: import the handler into the agent's own process and call it there.

Running in-process makes a hot call cost a function call plus JSON. The handler's module stays imported
between calls (Lambda's warm-start semantics), and so does the event loop that runs ``async def``
handlers, so clients bound to it survive from one call to the next. ``inspect``, ``asyncio`` and
``traceback`` cost tens of milliseconds to import, so they are avoided or imported only when needed.

The root logger gets the handler Lambda's Python runtime (awslambdaric) gives it, so the documented
``logging.getLogger().setLevel(logging.INFO)`` pattern writes Lambda's lines: tab-separated text with the
request id, or JSON with ``AWS_LAMBDA_LOG_FORMAT=JSON`` (and ``AWS_LAMBDA_LOG_LEVEL``). Importing
``logging`` adds about 5 ms to a cold start, so it is configured the moment the function's code imports
it (:class:`_LoggingHook`), never imported for a function that does not.
"""

import importlib
import json
import os
import sys

from nimbus import protocol
from nimbus.agent.base import Call, FunctionSpec, InvocationError, check_result_size, new_trace_id, too_deep

_CO_VARARGS = 0x04  # code.co_flags bit for a ``*args`` parameter
TEXT_LOG_FORMAT = "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s\n"
TEXT_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
JSON_DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # awslambdaric's: whole seconds
# LogRecord attributes that are not a caller's ``extra``: JSON lines leave them out.
_RECORD_FIELDS = frozenset({
    "name", "msg", "args", "levelname", "levelno", "pathname", "filename", "module", "exc_info", "exc_text",
    "stack_info", "lineno", "funcName", "created", "msecs", "relativeCreated", "thread", "threadName",
    "processName", "process", "taskName", "message", "asctime", "aws_request_id",
})

_request_id = ""  # the call in progress, or the last one (Lambda's runtime keeps it between calls too)


def _log_settings() -> tuple[bool, str]:
    """``(json, level)`` from the function's environment, read as Lambda's runtime reads it.

    JSON without a level logs at INFO: that is the application log level Lambda sets for JSON.
    """
    as_json = os.environ.get("AWS_LAMBDA_LOG_FORMAT", "").upper() == "JSON"
    level = os.environ.get("AWS_LAMBDA_LOG_LEVEL", "").upper()
    level = "DEBUG" if level == "TRACE" else level
    return as_json, level or ("INFO" if as_json else "")


def configure_logging(logging) -> None:
    """Give the root logger Lambda's handler (``logging`` is passed in: the agent never imports it itself)."""
    import time

    class LambdaHandler(logging.Handler):
        """Writes each record to stdout as one line (or a line and its traceback), with the request id."""

        def emit(self, record):
            try:
                text = self.format(record)
                stream = sys.stdout
                stream.write(text if text.endswith("\n") else text + "\n")
                stream.flush()
            except RecursionError:
                raise
            except Exception:
                self.handleError(record)

    class JsonFormatter(logging.Formatter):
        """Lambda's JSON line: timestamp, level, message, logger, requestId, errors, and any ``extra``."""

        def format(self, record):
            level = min(50, max(0, record.levelno)) // 10 * 10
            error = record.exc_info if isinstance(record.exc_info, tuple) and record.exc_info[0] else None
            stack = None
            if error is not None:
                import traceback

                stack = traceback.format_tb(error[2])
            msg = record.msg
            line = {
                "timestamp": time.strftime(JSON_DATE_FORMAT, time.gmtime(record.created)),
                "level": logging.getLevelName(level),
                "message": msg if isinstance(msg, dict) and not record.args else record.getMessage(),
                "logger": record.name,
                "stackTrace": stack,
                "errorType": error[0].__name__ if error else None,
                "errorMessage": str(error[1]) if error else None,
                "requestId": record.__dict__.get("aws_request_id"),
                "location": f"{record.pathname}:{record.funcName}:{record.lineno}" if error else None,
            }
            line.update((key, value) for key, value in record.__dict__.items()
                        if key not in _RECORD_FIELDS and key not in line)
            line = {key: value for key, value in line.items() if value is not None}
            return json.dumps(line, ensure_ascii=False, default=str) + "\n"

    def add_request_id(record) -> bool:
        record.aws_request_id = _request_id
        return True

    as_json, level = _log_settings()
    logging.Formatter.converter = time.gmtime  # as Lambda's runtime sets it, for the function's formatters too
    handler = LambdaHandler()
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter(TEXT_LOG_FORMAT, TEXT_DATE_FORMAT))
    handler.addFilter(add_request_id)
    root = logging.getLogger()
    if isinstance(logging.getLevelName(level), int):
        root.setLevel(level)
    root.addHandler(handler)


class _ConfiguringLoader:
    """``logging``'s own loader, which configures the module once it has run (then steps aside)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        configure_logging(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _LoggingHook:
    """A meta path finder that sees the first import of ``logging`` and has it configured as it loads.

    Whoever imports it (the function, a library, asyncio), the root handler is there before any code
    can log, as on Lambda, where the runtime configures logging before it loads the function.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "logging":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ConfiguringLoader(spec.loader)
                return spec
        return None


def _prepare_logging() -> None:
    """Configure ``logging`` now if something imported it already, or as soon as something does."""
    logging = sys.modules.get("logging")
    if logging is not None:
        configure_logging(logging)
    elif not any(isinstance(finder, _LoggingHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LoggingHook())


class CognitoIdentity:
    """``context.identity``: empty unless a mobile SDK sent one, which Nimbus's API never does."""

    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self) -> None:
        self.cognito_identity_id = None
        self.cognito_identity_pool_id = None

    def __repr__(self) -> str:
        return (f"CognitoIdentity([cognito_identity_id={self.cognito_identity_id},"
                f"cognito_identity_pool_id={self.cognito_identity_pool_id}])")


class _Fields:
    """An object whose slots are read from a dict, absent keys as None (awslambdaric's make_obj_from_dict)."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, fields: dict) -> None:
        for name in self.__slots__:
            setattr(self, name, fields.get(name))


class Client(_Fields):
    """``context.client_context.client``: the calling app, as a mobile SDK describes it."""

    __slots__ = ("installation_id", "app_title", "app_version_name", "app_version_code", "app_package_name")


class ClientContext(_Fields):
    """``context.client_context``: what the caller sent as X-Amz-Client-Context (sync calls only)."""

    __slots__ = ("custom", "env", "client")

    def __init__(self, fields: dict) -> None:
        super().__init__(fields)
        if isinstance(self.client, dict):
            self.client = Client(self.client)


class LambdaContext:
    """What the handler gets as ``context``, with the names, types and repr of Lambda's Python runtime."""

    __slots__ = ("function_name", "function_version", "invoked_function_arn", "invocation_id", "aws_request_id",
                 "memory_limit_in_mb", "log_group_name", "log_stream_name", "identity", "client_context", "_call")

    def __init__(self, spec: FunctionSpec, call: Call) -> None:
        self.function_name = spec.name
        self.function_version = spec.version
        self.invoked_function_arn = call.arn(spec)
        self.invocation_id = call.invocation_id
        self.aws_request_id = call.invocation_id
        self.memory_limit_in_mb = str(spec.memory_mb)  # a string on Lambda: it comes from the environment
        self.log_group_name = spec.log_group_name
        self.log_stream_name = spec.log_stream_name
        self.identity = CognitoIdentity()
        self.client_context = None if call.client_context is None else ClientContext(call.client_context)
        self._call = call

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the host stops waiting for this call."""
        return self._call.remaining_ms()

    def __repr__(self) -> str:
        return (f"LambdaContext([aws_request_id={self.aws_request_id},log_group_name={self.log_group_name},"
                f"log_stream_name={self.log_stream_name},function_name={self.function_name},"
                f"memory_limit_in_mb={self.memory_limit_in_mb},function_version={self.function_version},"
                f"invoked_function_arn={self.invoked_function_arn},client_context={self.client_context},"
                f"identity={self.identity}])")


def _wants_arguments(handler) -> int:
    """How many of ``(event, context)`` to pass: fewer than two only when the handler clearly takes fewer.

    Reads the code object instead of ``inspect.signature`` (which takes ~30 ms to import); anything it
    cannot read (builtins, ``functools.partial``) gets both arguments, as Lambda would give it.
    """
    target, bound = handler, 0
    for _ in range(10):  # see through functools.wraps decorators, as inspect.signature does
        wrapped = getattr(target, "__wrapped__", None)
        if wrapped is None:
            break
        target = wrapped
    if not hasattr(target, "__code__") and not hasattr(target, "__func__"):
        target = type(target).__call__ if callable(target) else None  # an instance with __call__
        bound = 1
    if hasattr(target, "__func__"):  # a bound method: self is already supplied
        target, bound = target.__func__, 1
    code = getattr(target, "__code__", None)
    if code is None or code.co_flags & _CO_VARARGS:
        return 2
    return max(0, min(2, code.co_argcount - bound))


def _is_machinery(filename: str) -> bool:
    """A frame of this module or of the import system, which sits between the agent and user code."""
    return filename == __file__ or filename.startswith("<frozen importlib")


def _user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without the agent's own frames at the top."""
    import traceback

    tb = exc.__traceback__
    while tb is not None and _is_machinery(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _from_exception(exc: BaseException, type_: str | None = None, fatal: bool = False) -> InvocationError:
    return InvocationError(type_ or type(exc).__name__, str(exc), _user_traceback(exc), fatal)


def _exited(exc: SystemExit) -> InvocationError:
    """``sys.exit()`` in user code: fatal, since Lambda's runtime would have ended there."""
    return InvocationError("RuntimeExit", f"the function called sys.exit({exc.code!r})", _user_traceback(exc), True)


def _json_default(value):
    """Serialise ``Decimal`` as a number, as Lambda's Python runtime does (DynamoDB returns them)."""
    decimal = sys.modules.get("decimal")  # not imported: the value cannot be a Decimal
    if decimal is not None and isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Made once: json.dumps with options builds a new encoder for every result.
_RESULT_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)


def encode_result(value) -> bytes:
    """The handler's return value as compact JSON bytes, or ``ResultNotSerializable``/``ResultTooLarge``."""
    try:
        text = _RESULT_ENCODER.encode(value)
        output = text.encode("utf-8")
    except (TypeError, ValueError, ArithmeticError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvocationError("ResultNotSerializable", f"the result is not JSON-serialisable: {exc}") from None
    return check_result_size(output)


class PythonRuntime:
    """Loads ``module.function`` from the task directory and calls it in this process."""

    checks_nesting = True  # invoke() checks the event's depth on the value it parses anyway
    forkable = True  # all it loaded lives in this process: a fork has it (nimbus.agent.forks)

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.handler = None
        self.arguments = 2
        self.loop = None  # created on the first awaitable result

    def load(self) -> None:
        """Import the handler's module (its top level runs once per machine) and find the function."""
        module_name, function_name = self.spec.handler_parts
        module_name = module_name.replace("/", ".")  # "api/app.handler" names the module api.app
        sys.dont_write_bytecode = True  # a machine imports its code once: a cache would only cost a write
        if self.spec.task_dir not in sys.path:
            sys.path.insert(0, self.spec.task_dir)
        # The layer is the function's site-packages: after its own modules and the standard library, as
        # site-packages come in any Python. Its files are read-only; bytecode it ships is used as is.
        if self.spec.layer is not None and self.spec.layer not in sys.path:
            sys.path.append(self.spec.layer)
        # The bundled SDK (boto3) last, as Lambda's /var/runtime: a boto3 the function pins wins.
        if self.spec.sdk is not None and self.spec.sdk not in sys.path:
            sys.path.append(self.spec.sdk)
        importlib.invalidate_caches()
        _prepare_logging()
        try:
            module = importlib.import_module(module_name)
        except SyntaxError as exc:
            raise _from_exception(exc, "SyntaxError", fatal=True) from None
        except ImportError as exc:  # the module itself, or something it imports, is missing
            raise _from_exception(exc, "ImportModuleError", fatal=True) from None
        except SystemExit as exc:
            raise _exited(exc) from None
        except BaseException as exc:  # whatever the module's top level raised
            raise _from_exception(exc, fatal=True) from None
        handler = getattr(module, function_name, None)
        if handler is None:
            raise InvocationError("HandlerNotFound", f"module {module_name!r} has no {function_name!r}", fatal=True)
        if not callable(handler):
            raise InvocationError("HandlerNotFound", f"{self.spec.handler!r} is not callable", fatal=True)
        self.handler = handler
        self.arguments = _wants_arguments(handler)

    def invoke(self, event: bytes, call: Call) -> bytes:
        """Run one call and return its JSON result."""
        try:
            payload = json.loads(event)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise InvocationError("InvalidEvent", f"the event is not valid JSON: {exc}") from None
        except RecursionError:  # deeper than the decoder's stack: the agent must live on
            raise too_deep() from None
        if protocol.nesting_over(event, payload):
            raise too_deep()
        args = (payload, LambdaContext(self.spec, call))[: self.arguments]
        global _request_id
        _request_id = call.invocation_id
        os.environ["_X_AMZN_TRACE_ID"] = new_trace_id()  # per call, as Lambda's runtime sets it
        try:
            value = self.handler(*args)
            if hasattr(value, "__await__"):
                value = self._run_awaitable(value)
        except SystemExit as exc:
            raise _exited(exc) from None
        except Exception as exc:
            raise _from_exception(exc) from None
        except BaseException as exc:  # KeyboardInterrupt and the like: the process state is unknown
            raise _from_exception(exc, fatal=True) from None
        return encode_result(value)

    def _run_awaitable(self, awaitable):
        """Run an ``async def`` handler's coroutine to completion on the machine's one event loop."""
        if self.loop is None:
            import asyncio

            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
        return self.loop.run_until_complete(awaitable)

    def close(self) -> None:
        """Nothing to release: the process ends with the machine."""


def runtime(spec: FunctionSpec) -> PythonRuntime:
    """Entry point of the runtime registry in ``nimbus.agent.main``."""
    return PythonRuntime(spec)
