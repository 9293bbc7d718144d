"""The ``provided`` runtime: any executable ``bootstrap``, spoken to through Lambda's Runtime API.

The bootstrap is started once per machine and polls ``GET /2018-06-01/runtime/invocation/next`` on
``$AWS_LAMBDA_RUNTIME_API`` (:mod:`nimbus.agent.runtime_api`, on the machine's own loopback), so every
client AWS publishes (awslambdaric, aws-lambda-ric, aws-lambda-go, lambda_runtime…) and any shell
script with curl runs unchanged. Init ends when it first asks for the next invocation; each ``exec``
answers that parked request with the event, and the call ends when the bootstrap posts its response
or error for that request id. Between calls it stays blocked in ``next``, so hot calls reuse it.

Status codes are the ones the official clients expect (Lambda's runtime interface emulator): 200 on
``next``, 202 on posts, 400 ``InvalidRequestID`` for an id that is not the call's, 403
``InvalidStateTransition`` for a second answer (or an init error after init), 413 for a body over 6 MiB.
"""

import json
import os
import time

from nimbus.agent.base import Call, FunctionSpec, InvocationError, new_trace_id
from nimbus.agent.child import Child
from nimbus.agent.contract import INIT_TIMEOUT_S, RESULT_MAX
from nimbus.agent.lines import refuse_constant
from nimbus.agent.runtime_api import PARK, Server, error_body

PREFIX = "/2018-06-01/runtime/"
NEXT = PREFIX + "invocation/next"
INIT_ERROR = PREFIX + "init/error"
OPT_BOOTSTRAP = "/opt/bootstrap"  # Lambda's second place for it (a layer's); the package's comes first
INIT_MARGIN_S = 1.0  # the agent gives up on init this long before the host does, to say why
ERROR_BODY_MAX = RESULT_MAX  # what an error post may carry (its message and stack are clipped anyway)
FINISHED_KEPT = 64  # request ids remembered as answered, to tell a late second answer (403) from a bad id (400)
ACCEPTED = (202, b'{"status":"OK"}', None)
PARK_WAIT_S = 0.005  # how long the agent waits, between calls, for the bootstrap to come back to next


def as_json(body: bytes) -> bytes:
    """The response as the JSON result Nimbus stores: itself when it is JSON, else a JSON string of it.

    Lambda returns a custom runtime's bytes as they are; Nimbus's results are JSON, so text such as
    ``Echoing request: …`` comes back quoted. An empty response is ``null``.
    """
    if not body.strip():
        return b"null"
    try:
        json.loads(body, parse_constant=refuse_constant)
        return body
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return json.dumps(body.decode("utf-8", "replace")).encode()


def posted_error(request, fatal: bool = False) -> InvocationError:
    """The error a runtime posted: ``{errorMessage, errorType, stackTrace}``, else its header, else its text."""
    header_type = request.headers.get("lambda-runtime-function-error-type", "")
    try:
        error = json.loads(request.body) if request.body else {}
    except ValueError:
        error = {"errorMessage": request.body.decode("utf-8", "replace")}
    if not isinstance(error, dict):
        error = {"errorMessage": json.dumps(error)}
    error_type = error.get("errorType")
    if not isinstance(error_type, str) or not error_type:
        error_type = header_type or "Runtime.Unknown"
    message = error.get("errorMessage")
    message = message if isinstance(message, str) else json.dumps(message)
    stack = error.get("stackTrace") or ""
    if isinstance(stack, list):
        stack = "\n".join(str(line) for line in stack)
    return InvocationError(error_type, message, str(stack), fatal=fatal)


class ProvidedRuntime:
    """The bootstrap process and the Runtime API state around it: init, idle, running one call."""

    forkable = False  # a child process and sockets: nothing a fork of the agent would carry over

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.path = ""
        self.child = Child("the bootstrap")
        self.server: Server | None = None
        self.started = False  # the bootstrap asked for its first invocation: init is over
        self.init_error: InvocationError | None = None
        self.waiting = None  # the connection whose ``next`` is parked
        self.call_id = ""  # the request id of the running call; "" between calls
        self.event: tuple[bytes, dict] | None = None  # the running call's, until a ``next`` takes it
        self.outcome: tuple[str, object] | None = None  # ("result", bytes) or ("error", InvocationError)
        self.finished: list[str] = []
        self.acknowledge = None  # the connection whose response/error post gets its 202 after the host's reply

    # ------------------------------------------------------------------ runtime interface

    def prepare(self) -> None:
        """Find the bootstrap and make the package's executable, before the task directory turns read-only."""
        own = os.path.join(self.spec.task_dir, "bootstrap")
        for path in (own, OPT_BOOTSTRAP):
            if os.path.isfile(path):
                self.path = path
                break
        else:
            raise InvocationError("Runtime.InvalidEntrypoint", "no bootstrap: the package has no executable file "
                                  "named 'bootstrap' at its root (nor is there /opt/bootstrap)", fatal=True)
        if self.path == own:
            try:
                os.chmod(own, 0o755)
            except OSError as exc:
                raise InvocationError("Runtime.InvalidEntrypoint", f"cannot make bootstrap executable: {exc}",
                                      fatal=True) from None

    def load(self) -> None:
        """Start the Runtime API and the bootstrap; wait until it asks for its first invocation."""
        if not self.path:
            self.prepare()
        started = time.monotonic()
        self.server = Server(self.on_request, self.on_over_limit, RESULT_MAX)
        os.environ["AWS_LAMBDA_RUNTIME_API"] = self.server.address
        try:
            self.child.spawn([self.path], {})
        except InvocationError as exc:  # ENOEXEC (no #! line), EACCES, ENOENT (its interpreter)…
            raise InvocationError("Runtime.InvalidEntrypoint", f"cannot run bootstrap: {exc.message}"
                                  f"{_interpreter_note(self.path)}", fatal=True) from None
        limit = max(INIT_TIMEOUT_S, self.spec.timeout_s) - INIT_MARGIN_S
        how = self.server.run(lambda: self.started or self.init_error is not None, self.child.pidfd,
                              limit - (time.monotonic() - started))
        if self.init_error is not None:
            raise self.init_error
        if how == "ended" or (how == "timeout" and self.child.exited()):
            self.child.exited()
            raise InvocationError("RuntimeExit", f"the bootstrap {self.child.exit_reason or 'exited'} before it "
                                  "asked for an invocation", fatal=True)
        if how == "timeout":
            raise InvocationError("InitTimeout", f"the bootstrap did not ask for an invocation within {limit:g} s "
                                  f"(GET {NEXT})", fatal=True)

    def invoke(self, event: bytes, call: Call) -> bytes:
        """Hand the event to the bootstrap's ``next`` and wait for its response or error."""
        if self.child.exited():
            raise self.child.died_error(lambda: None)
        call_id = call.invocation_id or os.urandom(16).hex()
        headers = {
            "Lambda-Runtime-Aws-Request-Id": call_id,
            "Lambda-Runtime-Deadline-Ms": str(int(time.time() * 1000) + call.remaining_ms()),
            "Lambda-Runtime-Invoked-Function-Arn": call.arn(self.spec),
            "Lambda-Runtime-Trace-Id": new_trace_id(),
        }
        if call.client_context is not None:
            headers["Lambda-Runtime-Client-Context"] = json.dumps(call.client_context, separators=(",", ":"))
        self.call_id, self.outcome, self.event = call_id, None, (event, headers)
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            self._deliver(waiting)
        how = self.server.run(lambda: self.outcome is not None, self.child.pidfd)
        self._finish(call_id)
        outcome, self.outcome = self.outcome, None
        if outcome is None:  # the bootstrap ended first
            self.child.exited()
            raise InvocationError("RuntimeExit", f"the bootstrap {self.child.exit_reason or 'exited'} during the "
                                  f"call ({how})", fatal=True)
        kind, value = outcome
        if kind == "error":
            raise value
        return as_json(value)

    def after_reply(self, host_fd: int = -1) -> None:
        """Send the 202 the bootstrap's response or error post is owed, now that the host has the result;
        then take its next ``next`` while the host has nothing for us (``host_fd`` readable ends the wait),
        so the next call starts with the request parked instead of reading and parsing it first."""
        conn, self.acknowledge = self.acknowledge, None
        if conn is None or self.server is None or not self.server.alive(conn):
            return
        self.server.answer(conn, *ACCEPTED)
        if host_fd >= 0 and self.waiting is None:
            self.server.run(lambda: self.waiting is not None, host_fd, PARK_WAIT_S)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.child.pid:
            self.child.stop(kill=True)

    # ------------------------------------------------------------------ the Runtime API

    def on_request(self, request):
        """Answer one request of the bootstrap's: a reply, or PARK for a ``next`` with no call yet."""
        path = request.path
        if path == NEXT:
            if request.method != "GET":
                return 405, error_body("MethodNotAllowed", f"{request.method} {path}: use GET"), None
            return self._next(request)
        if path == INIT_ERROR:
            if request.method != "POST":
                return 405, error_body("MethodNotAllowed", f"{request.method} {path}: use POST"), None
            if self.started:
                return 403, error_body("InvalidStateTransition", "init/error after init ended"), None
            self.init_error = posted_error(request, fatal=True)
            return ACCEPTED
        kind, call_id = _invocation_post(path)
        if kind is None:
            return 404, error_body("NotFound", f"no such Runtime API path {path[:200]!r}"), None
        if request.method != "POST":
            return 405, error_body("MethodNotAllowed", f"{request.method} {path[:200]}: use POST"), None
        if call_id != self.call_id or self.event is not None:
            if call_id in self.finished:
                return 403, error_body("InvalidStateTransition", f"invocation {call_id} was answered already"), None
            return 400, error_body("InvalidRequestID", f"invocation {call_id[:100]} is not running"), None
        self.outcome = ("result", request.body) if kind == "response" else ("error", posted_error(request))
        self._finish(call_id)
        # The 202 waits until the host has the answer (after_reply): the caller's reply is not queued behind
        # the bootstrap's wake-up on a busy machine.
        self.acknowledge = request.conn
        return PARK

    def on_over_limit(self, path: str) -> tuple[int, bytes]:
        """A body over 6 MiB: a response for the running call fails it (``ResultTooLarge``)."""
        kind, call_id = _invocation_post(path)
        if kind == "response" and call_id == self.call_id and self.outcome is None and self.event is None:
            self.outcome = ("error", InvocationError(
                "ResultTooLarge", f"the response is over the limit of {RESULT_MAX} bytes (6 MiB)"))
            self._finish(call_id)
        return 413, error_body("RequestEntityTooLarge", f"the body is over the limit of {RESULT_MAX} bytes")

    def _next(self, request):
        self.started = True  # init ends at the first next
        if self.event is not None:
            return self._deliver(request.conn, reply=True)
        if self.call_id or self.waiting is not None:
            why = "a call is running and has no answer yet" if self.call_id else "another next is waiting"
            return 403, error_body("InvalidStateTransition", f"next while {why}"), None
        self.waiting = request.conn
        return PARK

    def _deliver(self, conn, reply: bool = False):
        """Give the running call's event to a ``next``: returned as the reply, or sent to a parked one."""
        event, headers = self.event
        if reply:
            self.event = None
            return 200, event, headers
        if self.server.alive(conn):  # else the runtime gave up on that request: the event waits for its next
            self.event = None
            self.server.answer(conn, 200, event, headers)
        return None

    def _finish(self, call_id: str) -> None:
        if self.call_id == call_id:
            self.call_id = ""
            self.event = None
        if call_id not in self.finished:
            self.finished.append(call_id)
            del self.finished[:-FINISHED_KEPT]


def _interpreter_note(path: str) -> str:
    """What its ``#!`` line asks for, when that is missing: execve's ENOENT names the script instead."""
    try:
        with open(path, "rb") as file:
            first = file.readline(256)
    except OSError:
        return ""
    if not first.startswith(b"#!"):
        return " (it is not an executable binary and has no #! line)" if b"\0" not in first else ""
    interpreter = first[2:].strip().split(b" ")[0].decode("utf-8", "replace")
    if interpreter and not os.path.exists(interpreter):
        return f" (its #! interpreter {interpreter} is not in this machine)"
    return ""


def _invocation_post(path: str) -> tuple[str | None, str]:
    """``("response" | "error", id)`` for ``…/invocation/{id}/response|error``; ``(None, "")`` otherwise."""
    rest = path[len(PREFIX):] if path.startswith(PREFIX + "invocation/") else ""
    parts = rest.split("/")
    if len(parts) != 3 or parts[2] not in ("response", "error") or not parts[1]:
        return None, ""
    return parts[2], parts[1]


def runtime(spec: FunctionSpec) -> ProvidedRuntime:
    """Entry point of the runtime registry in ``nimbus.agent.main``."""
    return ProvidedRuntime(spec)


__all__ = ["ProvidedRuntime", "as_json", "posted_error", "runtime"]
