"""What the host knows about each runtime: its canonical id, aliases, default handler, code file name.

How the agent loads and calls a handler lives in ``nimbus.agent`` (it may import nothing from here).
"""

import re
from dataclasses import dataclass

from nimbus.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Runtime:
    id: str
    alias: re.Pattern
    default_handler: str
    suffix: str  # source file suffix; the handler's module part names the file
    artifact: str | None = None  # compiled runtimes: the file name the built artifact gets in the machine
    # Runtimes whose one file is always called this, whatever the handler says (provided: "bootstrap").
    entry: str | None = None

    @property
    def compiled(self) -> bool:
        """True when code is built into an artifact at create time (the machine never sees the source)."""
        return self.artifact is not None

    def source_filename(self, handler: str) -> str:
        """The file a single-source function is written to, from ``module.function``."""
        return handler.rsplit(".", 1)[0] + self.suffix

    def machine_filename(self, handler: str) -> str:
        """The file name the machine's agent writes the code (or artifact) to."""
        return self.artifact or self.entry or self.source_filename(handler)


RUNTIMES: dict[str, Runtime] = {
    "python3": Runtime("python3", re.compile(r"^python(3(\.\d+)?)?$"), "main.handler", ".py"),
    "nodejs": Runtime("nodejs", re.compile(r"^node(js)?(\d+(\.x)?)?$"), "index.handler", ".js"),
    # Compiled: the handler is fixed by the contract (docs/architecture.md#runtime-contract) and kept only for display.
    "go": Runtime("go", re.compile(r"^go(lang)?(1(\.\d+){0,2})?(\.x)?$"), "main.Handle", ".go", artifact="bootstrap"),
    "rust": Runtime("rust", re.compile(r"^rust(1(\.\d+){0,2})?$"), "main.main", ".rs", artifact="bootstrap"),
    "wasm": Runtime("wasm", re.compile(r"^wasm(32)?(-wasi(p1)?)?$|^wasi$"), "module._start", ".wasm",
                    artifact="module.cwasm"),
    # Lambda's custom runtimes: an executable "bootstrap" that serves the Runtime API; not built here.
    "provided": Runtime("provided", re.compile(r"^provided(\.al2(023)?)?$"), "function.handler", "",
                        entry="bootstrap"),
}

# module.function; the module may be dotted (pkg.mod, python3) or a path (lib/index, a package's file), and
# its names may hold hyphens (auto-confirm.handler), as Lambda loads any file name. Tenant input: every
# path segment starts with a letter, digit or underscore, so "..", ".hidden", "-opt", absolute paths and
# empty segments cannot be named; nothing but [A-Za-z0-9_.-] and "/" gets through (no NUL, no backslash).
HANDLER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*\.[A-Za-z_$][A-Za-z0-9_$]*$")
# A custom runtime's handler is free-form (Lambda takes any 1-128 characters: "bootstrap", "not.used"); only
# its bootstrap reads it, from _HANDLER. Still tenant input that reaches an environment and shell scripts: no
# whitespace, NUL, backslash, quote or shell metacharacter, and path-like segments as HANDLER_RE's (each starts
# with a letter, digit or underscore: no leading "-", "." or "/", no ".." and no empty segment).
PROVIDED_HANDLER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.$:-]*(/[A-Za-z0-9_][A-Za-z0-9_.$:-]*)*$")
PROVIDED_HANDLER_MAX = 128
# What the API schema lets through; the runtime's own rule is applied by check_handler.
ANY_HANDLER_PATTERN = f"(?:{HANDLER_RE.pattern})|(?:{PROVIDED_HANDLER_RE.pattern})"


def normalise(name: str) -> str:
    """Map a runtime name or versioned alias (``python3.11``, ``nodejs20.x``) to its canonical id."""
    key = name.strip().lower()
    for runtime in RUNTIMES.values():
        if runtime.alias.match(key):
            return runtime.id
    known = ", ".join(sorted(RUNTIMES))
    raise InvalidRequest(f"unknown runtime {name!r}; known runtimes: {known} "
                         "(versioned aliases such as python3.11 work)")


def get(runtime_id: str) -> Runtime:
    return RUNTIMES[runtime_id]


def check_handler(runtime_id: str, handler: str) -> str:
    """``handler`` if ``runtime_id`` takes it; ``InvalidRequest`` saying what it must look like otherwise."""
    if runtime_id == "provided":
        # fullmatch: $ alone also matches before a final newline
        if len(handler) > PROVIDED_HANDLER_MAX or not PROVIDED_HANDLER_RE.fullmatch(handler):
            raise InvalidRequest(f"handler {handler!r} is not valid for the provided runtime: 1 to "
                                 f"{PROVIDED_HANDLER_MAX} of A-Z a-z 0-9 _ . $ : - and /, each /-separated part "
                                 "starting with a letter, digit or _ (e.g. function.handler or bootstrap; only "
                                 "the bootstrap reads it)")
        return handler
    if not HANDLER_RE.fullmatch(handler):
        raise InvalidRequest(f"handler {handler!r} must look like module.function (e.g. main.handler)")
    return handler
