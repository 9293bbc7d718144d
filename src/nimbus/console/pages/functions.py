"""The Functions list, a function's page and an invocation's page (with its live tail).

Everything is read through the store with the viewer's tenant, so another tenant's function or
invocation is a 404 exactly like an unknown one. Code is highlighted on the server by Pygments with CSS
classes (``static/code.css``): no style attribute, no script. A function's output and logs are only ever
text in ``<pre>``, autoescaped.
"""

import asyncio
import io
import re
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from fastapi import APIRouter, Depends, Form, Query, Request
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_for_filename
from pygments.util import ClassNotFound
from starlette.responses import RedirectResponse, Response

from nimbus import packages, runtimes
from nimbus.console import web
from nimbus.errors import NotFound
from nimbus.gateway.schemas import NAME_PATTERN
from nimbus.store.records import FINISHED_STATUSES, utcnow

router = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)

PAGE_SIZE = 50
RECENT_CALLS = 50
HIGHLIGHT_MAX = 20 << 10  # Pygments costs ~2.4 µs a byte: larger files are shown plain, within the page budget
SHOW_MAX = 256 << 10  # text shown of one file, output or event; the rest is left out, saying so
TREE_MAX = 500  # entries of a package's file tree shown
PRETTY_MAX = 1 << 20  # JSON larger than this is shown as it came, not re-indented
CACHE_MAX = 64  # highlighted files kept: code is immutable by its sha256, so a view is highlighted once

NAME_RE = re.compile(NAME_PATTERN)
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
FORMATTER = HtmlFormatter(cssclass="code", linenos="inline", wrapcode=True)
_highlighted: OrderedDict[tuple[str, str], Markup] = OrderedDict()
VIEWER = Depends(web.viewer)
CHECKED = Depends(web.checked)  # every route that changes something
_highlighted_lock = threading.Lock()  # highlighting runs in worker threads


def _name(name: str) -> str:
    """A function name as the API allows it; anything else cannot exist (and never reaches the database)."""
    if not NAME_RE.fullmatch(name):
        raise NotFound(f"function {name!r} not found")
    return name


# ---------------------------------------------------------------- formatting


def ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "never"
    seconds = max(((now or utcnow()) - when).total_seconds(), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def stamp(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC") if when is not None else "—"


def size(n: int | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("bytes", "KiB", "MiB"):
        if value < 1024 or unit == "MiB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} bytes"


def duration(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def badge(status: str | None) -> str:
    """The console.css badge class of a status or start kind."""
    return {"timed_out": "timeout"}.get(status or "", status or "")


HELPERS = {"ago": ago, "stamp": stamp, "size": size, "duration": duration, "badge": badge}


@dataclass
class Shown:
    """Text to show in a ``<pre>``: at most ``SHOW_MAX`` characters of it, and whether some were left out."""

    text: str
    total: int
    json: bool = False

    @property
    def cut(self) -> bool:
        return self.total > len(self.text)


def shown(raw: bytes | None) -> Shown | None:
    """Raw JSON bytes (an event or an output) as text: re-indented when it parses and is not huge."""
    if raw is None:
        return None
    if len(raw) <= PRETTY_MAX:
        try:
            text = orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode()
            return Shown(text[:SHOW_MAX], len(text), json=True)
        except orjson.JSONDecodeError:
            pass
    text = raw[:SHOW_MAX * 4].decode("utf-8", errors="replace")
    return Shown(text[:SHOW_MAX], len(raw))


# ---------------------------------------------------------------- code


@dataclass
class Entry:
    name: str
    path: str
    size: int | None = None  # None: a folder
    children: list["Entry"] = field(default_factory=list)


@dataclass
class CodeView:
    kind: str  # source | zip | binary
    filename: str = ""
    html: Markup | None = None
    plain: str | None = None
    note: str = ""
    tree: list[Entry] = field(default_factory=list)
    entries: int = 0
    listed: int = 0


def _highlight(key: tuple[str, str], filename: str, text: str) -> Markup:
    """Pygments' own HTML for a file (escaped by Pygments, classes only), cached by the code's sha256."""
    with _highlighted_lock:
        found = _highlighted.get(key)
        if found is not None:
            _highlighted.move_to_end(key)
            return found
    try:
        lexer = get_lexer_for_filename(filename, stripnl=False)
    except ClassNotFound:
        lexer = TextLexer(stripnl=False)
    made = Markup(highlight(text, lexer, FORMATTER))  # Pygments escapes the text itself
    with _highlighted_lock:
        _highlighted[key] = made
        while len(_highlighted) > CACHE_MAX:
            _highlighted.popitem(last=False)
    return made


def _text_view(view: CodeView, key: tuple[str, str], data: bytes) -> None:
    """Fill ``view`` with one file's text: highlighted when small, plain when large, a note when binary."""
    if b"\0" in data[:8192]:
        view.note = f"{view.filename} is a binary file ({size(len(data))}): not shown."
        return
    text = data[:SHOW_MAX].decode("utf-8", errors="replace")
    if len(data) <= HIGHLIGHT_MAX:
        view.html = _highlight(key, view.filename, text)
        return
    view.plain = text
    view.note = (f"{view.filename} is {size(len(data))}: shown without highlighting"
                 + (f", its first {size(SHOW_MAX)} only." if len(data) > SHOW_MAX else "."))


def _tree(infos: list[zipfile.ZipInfo]) -> list[Entry]:
    root = Entry("", "")
    folders: dict[str, Entry] = {"": root}
    for info in infos:
        parts = info.filename.rstrip("/").split("/")
        parent = root
        for depth, part in enumerate(parts[:-1]):
            path = "/".join(parts[:depth + 1])
            if path not in folders:
                folders[path] = Entry(part, path)
                parent.children.append(folders[path])
            parent = folders[path]
        if info.is_dir():
            path = "/".join(parts)
            if path not in folders:
                folders[path] = Entry(parts[-1], path)
                parent.children.append(folders[path])
        else:
            parent.children.append(Entry(parts[-1], info.filename, info.file_size))
    return root.children


def code_view(fn, code: bytes, wanted: str | None) -> CodeView:
    """What the Code section shows: the source, a package's tree and one file of it, or a note for a binary."""
    if fn.code_kind == "zip" or packages.is_zip(code):
        view = CodeView("zip")
        try:
            with zipfile.ZipFile(io.BytesIO(code)) as archive:
                infos = archive.infolist()
                view.entries = len(infos)
                listed = sorted(infos[:TREE_MAX * 4], key=lambda i: i.filename)[:TREE_MAX]
                view.tree = _tree(listed)
                view.listed = len(listed)
                files = {i.filename: i for i in infos if not i.is_dir()}
                if wanted is None:
                    wanted = next((c for c in packages.handler_candidates(fn.runtime, fn.handler) if c in files),
                                  None)
                if wanted is not None:
                    info = files.get(wanted)
                    if info is None:
                        raise NotFound(f"the package of {fn.name!r} has no file {wanted!r}")
                    view.filename = wanted
                    with archive.open(info) as opened:
                        data = opened.read(SHOW_MAX + 1)
                    _text_view(view, (fn.code_sha256, wanted), data)
                    if info.file_size > len(data):
                        view.note = view.note or f"{wanted} is {size(info.file_size)}: its first part only."
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError):
            view.note = "The package could not be read as a zip file."
        return view
    if fn.code_kind == "module" or fn.runtime == "wasm" and code.startswith(b"\0asm"):
        return CodeView("binary", note=f"A prebuilt WebAssembly module ({size(len(code))}): binary, not shown.")
    if fn.code_kind == "executable":
        return CodeView("binary", note=f"A prebuilt bootstrap ({size(len(code))}): binary, not shown.")
    rt = runtimes.RUNTIMES.get(fn.runtime)
    view = CodeView("source", filename=(rt.entry or rt.source_filename(fn.handler)) if rt is not None else "code")
    _text_view(view, (fn.code_sha256, ""), code)
    return view


# ---------------------------------------------------------------- the list


@router.get("/functions")
async def function_list(request: Request, viewer: web.Viewer = VIEWER,
                        q: str = Query("", max_length=64), page: int = Query(1, ge=1, le=100_000),
                        deleted: str | None = Query(None, max_length=64)) -> Response:
    store = web.node(request).store
    q = q.strip()
    found, total = await store.search_functions(tenant=viewer.tenant, contains=q, limit=PAGE_SIZE,
                                                offset=(page - 1) * PAGE_SIZE)
    activity = await store.function_activity([fn.id for fn, _ in found], tenant=viewer.tenant)
    pages = max((total + PAGE_SIZE - 1) // PAGE_SIZE, 1)
    context = {"rows": [(fn, last, activity.get(fn.id)) for fn, last in found], "total": total, "q": q,
               "page": page, "pages": pages, "now": utcnow(),
               "deleted": deleted if deleted and NAME_RE.fullmatch(deleted) else None, **HELPERS}
    # The live search swaps only the results; a history restore (Back) asks for the whole page.
    fragment = request.headers.get("hx-target") == "results" and not request.headers.get("hx-history-restore-request")
    return web.render(request, "functions_results.html" if fragment else "functions.html", context,
                      headers={"Vary": "HX-Request, HX-Target"})


# ---------------------------------------------------------------- one function


@router.get("/functions/{name}")
async def function_page(name: str, request: Request, viewer: web.Viewer = VIEWER,
                        file: str | None = Query(None, max_length=1024),
                        published: int | None = Query(None, ge=1)) -> Response:
    store = web.node(request).store
    fn = await store.get_function(_name(name), viewer.tenant)
    versions, aliases, urls, schedules, calls, code = await asyncio.gather(
        store.list_published(fn.id, viewer.tenant), store.list_aliases(fn.id, viewer.tenant),
        store.function_urls(fn.id, tenant=viewer.tenant), store.list_schedules(fn.id, viewer.tenant),
        store.recent_calls(fn.id, tenant=viewer.tenant, limit=RECENT_CALLS), store.get_code(fn.code_sha256))
    # Reading a zip and highlighting are CPU work: off the event loop.
    view = await asyncio.to_thread(code_view, fn, code, file)
    context = {"fn": fn, "versions": versions, "aliases": aliases, "urls": urls, "schedules": schedules,
               "calls": calls, "code": view, "now": utcnow(), "published": published,
               "env": sorted(fn.env.items()), **HELPERS}
    return web.render(request, "function_page.html", context)


@router.post("/functions/{name}/publish")
async def publish(name: str, request: Request, viewer: web.Viewer = CHECKED,
                  description: str = Form("", max_length=256)) -> Response:
    """As ``POST /api/v1/functions/{name}/versions``: the latest revision gets the next number (or keeps its own)."""
    store = web.node(request).store
    before = await store.get_function(_name(name), viewer.tenant)
    version = await store.publish_version(before.id, viewer.tenant, description=description.strip() or None)
    return RedirectResponse(f"{web.ROOT}/functions/{before.name}?published={version.published}", status_code=303)


@router.post("/functions/{name}/delete")
async def delete(name: str, request: Request, viewer: web.Viewer = CHECKED) -> Response:
    """As ``DELETE /api/v1/functions/{name}``: the store deletes it, and the pool retires its machines."""
    node = web.node(request)
    fn = await node.store.delete_function(_name(name), viewer.tenant)
    node.pool.retire_function(fn.id)
    return RedirectResponse(f"{web.ROOT}/functions?deleted={fn.name}", status_code=303)


# ---------------------------------------------------------------- one invocation


async def _invocation(request: Request, viewer: web.Viewer, invocation_id: str):
    if not ID_RE.fullmatch(invocation_id):
        raise NotFound(f"invocation {invocation_id!r} not found")
    return await web.node(request).store.get_invocation(invocation_id, viewer.tenant)


def _invocation_context(inv) -> dict:
    error = inv.error if isinstance(inv.error, dict) else None
    stack = (error or {}).get("stack") or ""
    if isinstance(stack, list):
        stack = "\n".join(str(line) for line in stack)
    return {"inv": inv, "finished": inv.status in FINISHED_STATUSES, "output": shown(inv.output),
            "event": shown(inv.event), "error": error, "stack": str(stack), "now": utcnow(),
            "waited_ms": (inv.started_at - inv.created_at).total_seconds() * 1000 if inv.started_at else None,
            **HELPERS}


@router.get("/invocations/{invocation_id}")
async def invocation_page(invocation_id: str, request: Request, viewer: web.Viewer = VIEWER) -> Response:
    inv = await _invocation(request, viewer, invocation_id)
    return web.render(request, "invocation.html", _invocation_context(inv))


@router.get("/invocations/{invocation_id}/live")
async def invocation_live(invocation_id: str, request: Request,
                          viewer: web.Viewer = VIEWER) -> Response:
    """The status, result and logs block, polled every second while the call runs; once it has ended the
    block comes back without its trigger, and the polling stops."""
    inv = await _invocation(request, viewer, invocation_id)
    return web.render(request, "invocation_live.html", _invocation_context(inv))
