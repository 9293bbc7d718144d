"""The deploy page: create a function, or update one, from pasted code, an uploaded file or zip, or a folder.

The form becomes the API's own bodies (``schemas.FunctionCreate`` / ``FunctionUpdate``), run by
``gateway.functions.create`` / ``update``: every check, build and layer is the API's. A build (go, rust)
or a layer (requirements.txt, package.json) can take minutes, so a deploy is a background job of this
node, which the page polls every second for its stage. Jobs live in this node's memory only (a bounded
table, each job its tenant's), and are forgotten ten minutes after they end.
"""

import asyncio
import base64
import io
import json
import logging
import secrets
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import RedirectResponse, Response

from nimbus import errors, runtimes
from nimbus.console import starters, web
from nimbus.errors import InvalidRequest, NotFound, Overloaded, PayloadTooLarge
from nimbus.gateway import functions, schemas
from nimbus.gateway.problems import STATUS_OF

log = logging.getLogger("nimbus.console")

router = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)
VIEWER = Depends(web.viewer)
CHECKED = Depends(web.checked)  # signed in, and the form carries its CSRF token

STAGES = ("checking", "building", "resolving layer", "storing", "done")
JOBS_MAX = 256  # jobs a node remembers (running or ended less than JOB_TTL_S ago)
RUNNING_PER_TENANT = 4  # deploys of one tenant running at once on this node
JOB_TTL_S = 600.0
FOLDER_FILES_MAX = 1000  # files of an uploaded folder
PASTED_MAX = 2 * functions.SOURCE_MAX  # the form's text fields; the API's SOURCE_MAX then answers 413 with its size
SHOWN_CODE_MAX = functions.SOURCE_MAX  # current source pre-filled on the update form
# Always left out of an uploaded folder, as `nimbus deploy` leaves them out of a zipped one.
LEFT_OUT = [".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", ".DS_Store", ".nimbusignore"]


# ---------------------------------------------------------------- the jobs


@dataclass
class Job:
    """One deploy in flight or just ended: what the progress fragment shows."""

    id: str
    tenant: str
    name: str
    action: str  # create | update
    runtime: str
    started: float = field(default_factory=time.monotonic)
    stage: str = "checking"
    stages: list[tuple[str, float]] = field(default_factory=lambda: [("checking", 0.0)])
    ended: float | None = None
    error: str | None = None
    status: int | None = None
    version: int | None = None
    build_log: str = ""
    layer_log: str = ""
    task: asyncio.Task | None = field(default=None, repr=False)

    def enter(self, stage: str) -> None:
        if stage != self.stage:
            self.stage = stage
            self.stages.append((stage, time.monotonic() - self.started))

    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started


class Jobs:
    """The node's deploy jobs, by random id; a tenant sees only its own (another's id is a 404)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, j in self.jobs.items() if j.ended is not None and now - j.ended > JOB_TTL_S]:
            del self.jobs[key]

    def add(self, job: Job) -> None:
        self._prune()
        running = [j for j in self.jobs.values() if j.ended is None]
        if sum(j.tenant == job.tenant for j in running) >= RUNNING_PER_TENANT:
            raise Overloaded(f"{RUNNING_PER_TENANT} of your deploys are running on this node; wait for one to "
                             "end", retry_after=5)
        if len(self.jobs) >= JOBS_MAX:
            ended = sorted((j for j in self.jobs.values() if j.ended is not None), key=lambda j: j.ended or 0)
            if not ended:
                raise Overloaded("this node is running as many deploys as it can; try again soon", retry_after=5)
            del self.jobs[ended[0].id]
        self.jobs[job.id] = job

    def get(self, key: str, tenant: str) -> Job:
        self._prune()
        job = self.jobs.get(key)
        if job is None or job.tenant != tenant:
            raise NotFound("no such deploy on this node (a deploy is forgotten ten minutes after it ends)")
        return job


def _jobs(request: Request) -> Jobs:
    state = request.app.state
    found = getattr(state, "console_deploy_jobs", None)
    if found is None:
        found = state.console_deploy_jobs = Jobs()
    return found


class _Staged:
    """A part of the node whose named methods first move the job to a stage (``create`` and ``update`` run
    unchanged against it: the stages are the calls they make)."""

    def __init__(self, inner: Any, job: Job, stages: dict[str, str]) -> None:
        self._inner, self._job, self._stages = inner, job, stages

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._inner, name)
        stage = self._stages.get(name)
        if stage is None:
            return found

        def entering(*args, **kwargs):
            self._job.enter(stage)
            return found(*args, **kwargs)

        return entering


class _WatchedNode:
    """The node as ``create``/``update`` see it during a job: its compiler and store report stages."""

    def __init__(self, node: Any, job: Job) -> None:
        self._node = node
        self.compiler = _Staged(node.compiler, job, {"build": "building", "layer": "resolving layer"})
        self.store = _Staged(node.store, job, {"create_function": "storing", "update_function": "storing"})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._node, name)


async def _run(node: Any, job: Job, body: schemas.FunctionCreate | schemas.FunctionUpdate) -> None:
    watched = _WatchedNode(node, job)
    try:
        if isinstance(body, schemas.FunctionCreate):
            fn, build, layer = await functions.create(watched, job.tenant, body)
        else:
            fn, build, layer = await functions.update(watched, job.tenant, job.name, body)
        job.version = fn.version
        job.build_log = build.log if build is not None else ""
        job.layer_log = layer.log if layer is not None else ""
        job.enter("done")
    except errors.NimbusError as exc:
        job.error = errors.redact(str(exc))  # BuildFailed: the message and the compiler's or pip's output
        job.status = next(code for kind, code in STATUS_OF if isinstance(exc, kind))
    except asyncio.CancelledError:
        job.error, job.status = "the deploy was stopped: the node is shutting down", 503
        raise
    except Exception:
        log.exception("console deploy %s of %r failed", job.id, job.name)
        job.error, job.status = "the deploy failed inside the node; its log says why", 500
    finally:
        job.ended = time.monotonic()


# ---------------------------------------------------------------- the form


async def _form(request: Request):
    try:
        return await request.form(max_files=FOLDER_FILES_MAX + 1, max_fields=40, max_part_size=PASTED_MAX)
    except HTTPException as exc:  # python-multipart's limits
        raise InvalidRequest(f"the form could not be read: {exc.detail}") from None


def _text(form, key: str, limit: int = 4096) -> str:
    value = form.get(key)
    if value is None or isinstance(value, UploadFile):
        return ""
    if len(value) > limit:
        raise PayloadTooLarge(f"{key} is over {limit} characters")
    return value


def _number(text: str, what: str, kind: type) -> Any:
    text = text.strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise InvalidRequest(f"{what} must be a {'whole ' if kind is int else ''}number, not {text[:40]!r}") from None


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments skipped), or a JSON object of strings. The API's
    rules on names, reserved names and size apply after this (``schemas._check_env``)."""
    if not text.strip():
        return {}
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InvalidRequest(f"the environment is not valid JSON: {exc}") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise InvalidRequest("the environment as JSON must be an object of strings")
        return value
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"environment line {number} is not KEY=VALUE: {line[:80]!r}")
        env[key.strip()] = value
    return env


def _explain(exc: ValidationError) -> str:
    """The API's validation errors as one sentence per field."""
    said = []
    for item in exc.errors()[:5]:
        where = ".".join(str(part) for part in item.get("loc", ())) or "form"
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        if where == "name" and item.get("type") == "string_pattern_mismatch":
            message = "use lower-case letters, digits and '-', starting with a letter (at most 63 characters)"
        said.append(f"{where}: {message}")
    return "; ".join(said)


def _bad_path(path: str) -> str | None:
    if "\0" in path or "\\" in path:
        return "has a NUL or a backslash in it"
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' part"
    return None


def zip_folder(files: list[tuple[str, bytes]]) -> bytes:
    """Zip a folder the browser sent as files named by their relative paths: the folder's own name is
    dropped, what ``nimbus deploy`` leaves out (and the folder's .gitignore, .nimbusignore) is left out.
    ``packages.check`` (in ``create``) then checks the package as any zip."""
    import pathspec

    if len(files) > FOLDER_FILES_MAX:
        raise PayloadTooLarge(f"the folder has {len(files)} files; the console takes at most {FOLDER_FILES_MAX} "
                              "(zip it, or use `nimbus deploy`)")
    for path, _ in files:
        why = _bad_path(path)
        if why:
            raise InvalidRequest(f"the folder's file {path[:200]!r} {why}")
    tops = {path.split("/", 1)[0] for path, _ in files}
    if len(tops) == 1 and all("/" in path for path, _ in files):
        files = [(path.split("/", 1)[1], data) for path, data in files]
    named = dict(files)
    if len(named) != len(files):
        raise InvalidRequest("the folder names one file twice")
    lines = list(LEFT_OUT)
    for rules in (".gitignore", ".nimbusignore"):
        if rules in named:
            lines += named[rules].decode(errors="replace").splitlines()
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    buffer, kept = io.BytesIO(), 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for path, data in sorted(files):
            parents = path.split("/")[:-1]
            if spec.match_file(path) or any(spec.match_file("/".join(parents[:i]) + "/")
                                            for i in range(1, len(parents) + 1)):
                continue
            archive.writestr(path, data)
            kept += 1
    if not kept:
        raise InvalidRequest("the folder has no files to deploy (after .gitignore and .nimbusignore)")
    return buffer.getvalue()


async def _uploads(form, key: str) -> list[tuple[str, bytes]]:
    found, total = [], 0
    for item in form.getlist(key):
        if not isinstance(item, UploadFile) or not item.filename:
            continue
        data = await item.read(functions.ARTIFACT_MAX + 1 - total)
        total += len(data)
        if total > functions.ARTIFACT_MAX:
            raise PayloadTooLarge(f"the upload is over {functions.ARTIFACT_MAX >> 20} MiB, the limit")
        found.append((item.filename, data))
    return found


async def _code(form, source: str) -> dict[str, str]:
    """The ``code`` or ``code_base64`` field of the API's body, from where the form says the code is."""
    if source == "paste":
        return {"code": _text(form, "code", PASTED_MAX)}
    if source == "file":
        uploaded = await _uploads(form, "file")
        if not uploaded:
            raise InvalidRequest("choose a file to upload (source or .zip)")
        return {"code_base64": base64.b64encode(uploaded[0][1]).decode()}
    if source == "folder":
        uploaded = await _uploads(form, "folder")
        if not uploaded:
            raise InvalidRequest("choose a folder to upload")
        zipped = await asyncio.to_thread(zip_folder, uploaded)
        return {"code_base64": base64.b64encode(zipped).decode()}
    if source == "keep":
        return {}
    raise InvalidRequest("say where the code comes from: paste, file, folder or keep")


async def body_of(form, updating: bool) -> schemas.FunctionCreate | schemas.FunctionUpdate:
    """The API's request body for this form (its validation errors as ``InvalidRequest``)."""
    runtime = _text(form, "runtime", 64).strip()
    fields: dict[str, Any] = {
        "runtime": runtime or None,
        "handler": _text(form, "handler", 256).strip() or None,
        "memory_mb": _number(_text(form, "memory_mb", 32), "memory", int),
        "timeout_s": _number(_text(form, "timeout_s", 32), "the timeout", float),
        "env": parse_env(_text(form, "env", 64 << 10)),
        **await _code(form, _text(form, "source", 16) or "paste"),
    }
    if not updating and "code" not in fields and "code_base64" not in fields:
        raise InvalidRequest("a new function needs code: paste it, or upload a file or a folder")
    try:
        if updating:
            return schemas.FunctionUpdate(**{k: v for k, v in fields.items() if v is not None})
        name = _text(form, "name", 128).strip()
        return schemas.FunctionCreate(name=name, **{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise InvalidRequest(_explain(exc)) from None


# ---------------------------------------------------------------- the routes


def _runtime_options(node: Any) -> list[dict[str, str]]:
    """Every runtime, the node's pre-warmed ones first, each with its starter and default handler."""
    warm = [r for r in node.settings.runtimes if r in runtimes.RUNTIMES]
    ordered = warm + [r for r in runtimes.RUNTIMES if r not in warm]
    return [{"id": r, "handler": starters.handler(r), "starter": starters.starter(r),
             "note": "" if r in warm else "not pre-warmed here", "compiled": "yes" if runtimes.get(r).compiled else ""}
            for r in ordered]


@router.get("/deploy")
async def deploy_page(request: Request, function: str | None = Query(None, max_length=64),
                      viewer: web.Viewer = VIEWER) -> Response:
    node = web.node(request)
    options = _runtime_options(node)
    current, code, source = None, "", "paste"
    if function:
        current = await node.store.get_function(function, viewer.tenant)  # another tenant's: 404
        if current.code_kind == "source" and current.code_size <= SHOWN_CODE_MAX:
            try:
                code = (await node.store.get_code(current.code_sha256)).decode()
            except UnicodeDecodeError:
                code, source = "", "keep"
        else:
            source = "keep"
    runtime = current.runtime if current else options[0]["id"]
    return web.render(request, "deploy.html", {
        "current": current, "options": options, "runtime": runtime,
        "handler": current.handler if current else starters.handler(runtime),
        "code": code if current else starters.starter(runtime), "source": source,
        "env": "\n".join(f"{k}={v}" for k, v in current.env.items()) if current else "",
        "memory_mb": current.memory_mb if current else 128,
        "timeout_s": f"{current.timeout_s:g}" if current else "30",
        "folder_max": FOLDER_FILES_MAX, "source_max_kib": functions.SOURCE_MAX >> 10,
        "artifact_max_mib": functions.ARTIFACT_MAX >> 20,
    })


@router.post("/deploy")
async def deploy(request: Request, viewer: web.Viewer = CHECKED) -> Response:
    node = web.node(request)
    form = await _form(request)
    try:
        target = _text(form, "function", 64).strip()
        # Updating another tenant's function is a 404 before anything is read or started.
        current = await node.store.get_function(target, viewer.tenant) if target else None
        body = await body_of(form, updating=current is not None)
    finally:
        await form.close()
    if isinstance(body, schemas.FunctionCreate):
        name, runtime = body.name, body.runtime
    else:
        assert current is not None
        name, runtime = current.name, body.runtime or current.runtime
    job = Job(id=secrets.token_urlsafe(16), tenant=viewer.tenant, name=name,
              action="create" if current is None else "update", runtime=runtime)
    _jobs(request).add(job)
    job.task = asyncio.create_task(_run(node, job, body), name=f"nimbus-console-deploy-{job.id[:8]}")
    if not web.is_htmx(request):
        return RedirectResponse(f"{web.ROOT}/deploy/jobs/{job.id}", status_code=303)
    return web.render(request, "deploy_job.html", {"job": job}, status=202)


@router.get("/deploy/jobs/{job_id}")
async def job_status(job_id: str, request: Request, viewer: web.Viewer = VIEWER) -> Response:
    """A deploy's progress: a fragment for htmx's polling, a page otherwise."""
    job = _jobs(request).get(job_id[:64], viewer.tenant)
    template = "deploy_job.html" if web.is_htmx(request) else "deploy_job_page.html"
    return web.render(request, template, {"job": job})
