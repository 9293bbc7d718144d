"""The commands on functions and what they leave behind: deploy, invoke, ls, get, rm, invocations, logs,
and the node's dependency layers (layers, gc). Each is one or a few calls of the REST API.
"""

import base64
import enum
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from nimbus.cli.client import DEFAULT_URL, Api, UrlOption, fail
from nimbus.cli.output import Progress, duration, note, number, print_json, table, when

# Builds of compiled runtimes run the toolchain on the node before the response comes back.
DEPLOY_TIMEOUT_S = 600.0
# A synchronous call may run for the function's whole timeout (at most 900 s) after waiting in the queue.
INVOKE_TIMEOUT_S = 960.0
LIST_PAGE = 1000  # the API's largest page
LOGS_POLL_S = 0.5
# Runtimes whose code the node compiles on deploy; only used to word the progress line.
COMPILED_RUNTIME_PREFIXES = ("go", "rust", "wasm")
DEPENDENCY_MANIFESTS = ("requirements.txt", "package.json")  # a folder with one deploys with a layer
FINISHED = frozenset({"succeeded", "failed", "timed_out"})


class Isolation(enum.StrEnum):
    """The API's ``isolation`` values, so a typo is refused (and the choices shown) before anything is sent."""

    SHARED = "shared"
    PER_CALL = "per-call"


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


def deploy(
    file: Annotated[
        Path, typer.Argument(exists=True, readable=True,
                             help="The source file (or artifact, or a provided function's bootstrap), or a folder: "
                                  "zipped as a package (python3, nodejs, provided: with its bootstrap at the top), "
                                  "leaving out what .gitignore and .nimbusignore list.")
    ],
    name: Annotated[
        str, typer.Option("--name", "-n", help="Function name: a-z, 0-9 and '-', starting with a letter.")
    ],
    runtime: Annotated[
        str, typer.Option("--runtime", "-r", help="python3, nodejs, go, rust, wasm, provided (or an alias: python3.12, "
                                                      "provided.al2023).")
    ],
    handler: Annotated[
        str | None, typer.Option(help="module.function; default per runtime (provided: free-form, "
                                        "read by the bootstrap as $_HANDLER).", show_default=False)
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.", show_default=False)
    ] = None,
    memory: Annotated[
        int | None, typer.Option(help="Memory limit in MiB (default 128).", show_default=False)
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Per-call time limit in seconds (default 30).", show_default=False)
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Machines the function may use at once (default 10).", show_default=False)
    ] = None,
    isolation: Annotated[
        Isolation | None,
        typer.Option(help="shared: a machine serves call after call (default); per-call: a fresh machine for "
                          "every call, destroyed after it.", show_default=False)
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
            fields["code_base64"] = base64.b64encode(raw).decode("ascii")  # a WASI module, a bootstrap binary
    optional = {"handler": handler, "env": _env_pairs(env), "memory_mb": memory, "timeout_s": timeout,
                "concurrency": concurrency, "isolation": isolation.value if isolation is not None else None}
    fields.update({key: value for key, value in optional.items() if value is not None})

    compiled = runtime.strip().lower().startswith(COMPILED_RUNTIME_PREFIXES)
    manifests = [m for m in DEPENDENCY_MANIFESTS if file.is_dir() and (file / m).is_file()]
    message = f"building {name} ({runtime})" if compiled else f"deploying {name} ({runtime})"
    if manifests:
        message = f"deploying {name} ({runtime}), resolving {' and '.join(manifests)} into a layer"
    with Api(url, timeout=DEPLOY_TIMEOUT_S) as api, Progress(message):
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


def invoke(
    name: Annotated[str, typer.Argument(help="Function name or id; NAME:QUALIFIER runs a published version "
                                              "(NAME:3), an alias (NAME:prod) or NAME:$LATEST.")],
    data: Annotated[
        str | None,
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
    print_json(result)
    if async_:
        note(f"queued; follow it with: nimbus logs --wait {result.get('invocation_id')}")
        return
    if result.get("status") != "succeeded":
        error = result.get("error") or {}
        reason = f": {error.get('type')}: {error.get('message')}" if error else ""
        note(f"invocation {result.get('invocation_id')} {result.get('status')}{reason}")
        raise typer.Exit(1)


def list_functions(
    runtime: Annotated[str | None, typer.Option(help="Only functions of this runtime.", show_default=False)] = None,
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
        print_json({"functions": functions, "total": len(functions)})
        return
    if not functions:
        note("no functions" + (f" with runtime {runtime}" if runtime else "") + " (deploy one with 'nimbus deploy')")
        return
    rows = [
        [fn["name"], fn["runtime"], str(fn["version"]), number(fn["memory_mb"], " MB"), number(fn["timeout_s"], " s"),
         when(fn.get("updated_at"))]
        for fn in functions
    ]
    typer.echo(table(["NAME", "RUNTIME", "VERSION", "MEMORY", "TIMEOUT", "UPDATED"], rows))


def list_layers(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table.")] = False,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """List dependency layers: what each holds, its size and the functions that mount it."""
    with Api(url) as api:
        found = api.call("GET", "/api/v1/layers")["layers"]
    if as_json:
        print_json({"layers": found})
        return
    if not found:
        note("no layers (a package with requirements.txt or package.json makes one)")
        return
    rows = [[layer["sha256"][:12], layer["runtime"], number(layer["size"] // 1024, " KiB"), layer["platform"],
             ", ".join(layer["functions"]) or "(unused)", when(layer.get("created_at"))] for layer in found]
    typer.echo(table(["LAYER", "RUNTIME", "SIZE", "PLATFORM", "FUNCTIONS", "CREATED"], rows))


def gc(
    grace: Annotated[float, typer.Option(help="Keep what was stored less than this many seconds ago.")] = 60.0,
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Remove build-cache entries and dependency layers no function version uses (an admin key when auth is on)."""
    with Api(url) as api:
        freed = api.call("POST", "/api/v1/gc", params={"grace_s": grace})
    typer.echo(f"removed {freed['layers']} layers, {freed['builds']} cached builds, {freed['artifacts']} stored "
               f"blobs ({freed['bytes']} bytes) and {freed['unpacked']} unpacked layer directories on the node")


def get(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Show one function (its latest version) as JSON."""
    with Api(url) as api:
        print_json(api.call("GET", f"/api/v1/functions/{name}"))


def rm(
    name: Annotated[str, typer.Argument(help="Function name or id.")],
    url: UrlOption = DEFAULT_URL,
) -> None:
    """Delete a function; its machines are destroyed."""
    with Api(url) as api:
        api.call("DELETE", f"/api/v1/functions/{name}")
    typer.echo(f"deleted {name}")


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
        print_json({"invocations": found})
        return
    if not found:
        note(f"no invocations of {name} yet")
        return
    rows = [
        [inv["invocation_id"], inv["status"], inv.get("start") or "-", duration(inv.get("duration_ms")),
         when(inv.get("created_at"))]
        for inv in found
    ]
    typer.echo(table(["ID", "STATUS", "START", "DURATION_MS", "CREATED"], rows))


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
        note("(the logs were cut: showing their end)")
    if text:
        typer.echo(text, nl=not text.endswith("\n"))
    note(_status_line(inv))


def _status_line(inv: dict) -> str:
    details = [part for part in (
        inv.get("start"),
        f"{duration(inv.get('duration_ms'))} ms" if inv.get("duration_ms") is not None else None,
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
