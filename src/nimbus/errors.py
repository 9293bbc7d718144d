"""Nimbus's own exception tree; third-party errors are mapped into it at the boundary.

    NimbusError
    ├── StoreError
    │   ├── NotFound            a function, version or invocation that does not exist (404)
    │   └── Conflict            a name already taken (409)
    ├── InvalidRequest          input the API refuses (422); ``PayloadTooLarge`` (413) below it
    │   └── PayloadTooLarge
    ├── Overloaded              the queue is full (429, with Retry-After)
    │   └── OverBudget          the tenant's stored invocations fill its byte budget
    ├── Unavailable             the node is shutting down or cannot reach a machine (503)
    ├── ProtocolError           a frame that breaks the guest protocol (defined in protocol.py,
    │                           which must stay stdlib-only, and re-exported here)
    ├── InitFailed              the function's code did not load (a function error: the call fails)
    └── MachineError            a machine failed to start, answer or stay alive
        ├── MachineStartError
        ├── MachineDied         the machine went away mid-request
        └── MachineTimeout      the request ran past its deadline; the machine was killed
"""

import os

from nimbus.protocol import ProtocolError

REDACTED = "[redacted]"
REDACT_MIN = 6  # shorter values ("1", "true", "/root") are everywhere in ordinary text and rarely secrets
# Variables every process has whose values are paths or words, not secrets; blanking them would only
# garble ordinary messages (a working directory, a shell).
NOT_SECRET = frozenset({"PATH", "PWD", "OLDPWD", "HOME", "SHELL", "TERM", "USER", "LOGNAME", "LANG", "LANGUAGE",
                        "LC_ALL", "LC_CTYPE", "SHLVL", "_", "TMPDIR", "TZ", "VIRTUAL_ENV", "HOSTNAME"})


def redact(text: str) -> str:
    """``text`` with every value of the node's environment (of ``REDACT_MIN`` characters or more) replaced.

    What a tenant is shown (a resolver's output, a problem's detail) may quote the node's environment
    only through a bug; this is the last line of defence against such a bug leaking an API key or a
    database password. Longest values first, so a value containing another is replaced whole.
    """
    if not text:
        return text
    values = {v for k, v in os.environ.items() if len(v) >= REDACT_MIN and k not in NOT_SECRET}
    for value in sorted(values, key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    return text


class NimbusError(Exception):
    """Base of every error Nimbus raises on purpose."""


class StoreError(NimbusError):
    """The metadata store could not do what was asked."""


class NotFound(StoreError):
    """No such function, version or invocation."""


class Conflict(StoreError):
    """The name is taken."""


class InvalidRequest(NimbusError):
    """Input the API refuses, with a message that says why."""


class PayloadTooLarge(InvalidRequest):
    """Code, event or result over its size limit."""


class Overloaded(NimbusError):
    """The queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverBudget(Overloaded):
    """The tenant's stored invocations hold as many bytes as its budget allows; retention frees them."""


class Unavailable(NimbusError):
    """The node cannot serve this now (shutting down, no machine could be had)."""


class InitFailed(NimbusError):
    """The function's code failed to load in a machine; ``error`` is its {type, message, stack}."""

    def __init__(self, error: dict, start: str | None = None) -> None:
        super().__init__(f"{error.get('type')}: {error.get('message')}")
        self.error = error
        self.start = start


class MachineError(NimbusError):
    """A machine misbehaved; it is destroyed and never reused."""


class MachineStartError(MachineError):
    """The machine did not boot or its agent did not answer."""


class MachineDied(MachineError):
    """The machine's process or channel went away during a request."""


class MachineTimeout(MachineError):
    """The request ran past its deadline; the machine has been killed."""


__all__ = [
    "Conflict",
    "InitFailed",
    "InvalidRequest",
    "MachineDied",
    "MachineError",
    "MachineStartError",
    "MachineTimeout",
    "NimbusError",
    "NotFound",
    "OverBudget",
    "Overloaded",
    "PayloadTooLarge",
    "ProtocolError",
    "StoreError",
    "Unavailable",
    "redact",
]
