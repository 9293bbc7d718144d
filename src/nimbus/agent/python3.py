"""The ``python3`` runtime: import the handler into the agent's own process and call it there.

Running in-process makes a hot call cost a function call plus JSON. The handler's module stays imported
between calls (Lambda's warm-start semantics), and so does the event loop that runs ``async def``
handlers, so clients bound to it survive from one call to the next. ``inspect``, ``asyncio`` and
``traceback`` cost tens of milliseconds to import, so they are avoided or imported only when needed.
"""

import importlib
import json
import os
import sys

from nimbus import protocol
from nimbus.agent.base import Call, FunctionSpec, InvocationError, check_result_size, new_trace_id, too_deep

_CO_VARARGS = 0x04  # code.co_flags bit for a ``*args`` parameter


class CognitoIdentity:
    """``context.identity``: empty unless a mobile SDK sent one, which Nimbus's API never does."""

    __slots__ = ("cognito_identity_id", "cognito_identity_pool_id")

    def __init__(self) -> None:
        self.cognito_identity_id = None
        self.cognito_identity_pool_id = None

    def __repr__(self) -> str:
        return (f"CognitoIdentity([cognito_identity_id={self.cognito_identity_id},"
                f"cognito_identity_pool_id={self.cognito_identity_pool_id}])")


class LambdaContext:
    """What the handler gets as ``context``, with the names, types and repr of Lambda's Python runtime."""

    __slots__ = ("function_name", "function_version", "invoked_function_arn", "invocation_id", "aws_request_id",
                 "memory_limit_in_mb", "log_group_name", "log_stream_name", "identity", "client_context", "_call")

    def __init__(self, spec: FunctionSpec, call: Call) -> None:
        self.function_name = spec.name
        self.function_version = spec.version
        self.invoked_function_arn = spec.arn
        self.invocation_id = call.invocation_id
        self.aws_request_id = call.invocation_id
        self.memory_limit_in_mb = str(spec.memory_mb)  # a string on Lambda: it comes from the environment
        self.log_group_name = spec.log_group_name
        self.log_stream_name = spec.log_stream_name
        self.identity = CognitoIdentity()
        self.client_context = None
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


def encode_result(value) -> bytes:
    """The handler's return value as compact JSON bytes, or ``ResultNotSerializable``/``ResultTooLarge``."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default)
        output = text.encode("utf-8")
    except (TypeError, ValueError, ArithmeticError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvocationError("ResultNotSerializable", f"the result is not JSON-serialisable: {exc}") from None
    return check_result_size(output)


class PythonRuntime:
    """Loads ``module.function`` from the task directory and calls it in this process."""

    checks_nesting = True  # invoke() checks the event's depth on the value it parses anyway

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
        importlib.invalidate_caches()
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
