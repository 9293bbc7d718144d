"""What every console page shares: the templates, the viewer, CSRF, errors as pages, and the security headers.

Pages are rendered on the server (Jinja2, autoescaped: a function's output or logs can never become
markup) and made lively with htmx, which swaps server-rendered fragments; the only scripts are files
under ``/console/static`` (the CSP allows no inline script, no eval and no other origin).

Every route of the console's routers uses ``ConsoleRoute``: a ``NimbusError`` (404, 409, 422…) becomes
an HTML page or fragment with the same status for a browser (problem+json for any other client), a
request without a live session is sent to the login page, and a fresh cookie is set when one was made.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.responses import HTMLResponse, RedirectResponse, Response

from nimbus import __version__, errors
from nimbus.gateway import auth
from nimbus.gateway.problems import STATUS_OF, problem
from nimbus.store.records import DEFAULT_TENANT

ROOT = "/console"
HERE = Path(__file__).parent
COOKIE = "nimbus_console"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"

# No inline script or style, no eval, nothing from another origin; forms post only here; no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]

templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name: output and logs are text, never markup
    undefined=jinja2.StrictUndefined,  # a misspelt name fails the test that renders it, not silently
    trim_blocks=True,
    lstrip_blocks=True,
)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_for(token: str) -> str:
    """The CSRF token of a cookie token: derived from a secret only the browser's cookie holds, so a page on
    another site can neither read nor compute it, and no server-side state is needed for it."""
    return hashlib.sha256(b"nimbus-console-csrf\0" + token.encode()).hexdigest()


class LoginRequired(Exception):
    """Auth is on and the request has no live session."""


@dataclass
class Viewer:
    """Who is looking: their principal (None before login with auth on), and their cookie's CSRF token."""

    principal: auth.Principal | None
    csrf: str
    auth_on: bool
    key_name: str = ""
    new_token: str | None = None  # a cookie token made for this request, to be set on its response

    @property
    def signed_in(self) -> bool:
        return self.principal is not None

    @property
    def tenant(self) -> str:
        return self.principal.tenant if self.principal is not None else DEFAULT_TENANT

    @property
    def admin(self) -> bool:
        """May see the node itself (machines, nodes) and manage keys: an admin key, or anyone with auth off."""
        return not self.auth_on or (self.principal is not None and self.principal.admin)


def node(request: Request):
    return request.app.state.node


async def look(request: Request) -> Viewer:
    """The viewer, from the session cookie (a fresh anonymous token when there is none)."""
    settings = node(request).settings
    if settings.console != "on":
        raise errors.NotFound("the console is off on this node (NIMBUS_CONSOLE=off)")
    token = request.cookies.get(COOKIE)
    new = None
    if token is None or not TOKEN_RE.fullmatch(token):
        token = new = secrets.token_urlsafe(32)
    auth_on = settings.auth == "on"
    principal, name = None, ""
    if not auth_on:
        principal = auth.ANONYMOUS
    elif new is None:
        key = await node(request).store.console_session_key(token_hash(token))
        if key is not None:
            principal, name = auth.Principal(key_id=key.id, tenant=key.tenant, admin=key.admin), key.name
    viewer = Viewer(principal, csrf_for(token), auth_on, key_name=name, new_token=new)
    request.state.console_viewer = viewer
    if principal is not None:  # the API's own helpers (auth.tenant) now scope everything to this tenant
        request.scope.setdefault("state", {})["nimbus.principal"] = principal
    return viewer


async def viewer(request: Request) -> Viewer:
    """A signed-in viewer (any viewer with auth off); ``LoginRequired`` otherwise. The default dependency."""
    found = await look(request)
    if not found.signed_in:
        raise LoginRequired()
    return found


async def admin(request: Request) -> Viewer:
    found = await viewer(request)
    if not found.admin:
        raise Forbidden("this page needs an admin key")
    return found


class Forbidden(errors.NimbusError):
    """403: only admins may see this."""


def _same_origin(request: Request) -> bool:
    """A changing request must come from a console page: no cross-site fetch, and an Origin (when the
    browser sends one) naming this very host."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


async def checked(request: Request) -> Viewer:
    """A signed-in viewer whose request carries the CSRF token of its cookie: every form that changes
    something depends on this. 403 otherwise."""
    found = await viewer(request)
    await require_csrf(request, found)
    return found


async def require_csrf(request: Request, found: Viewer) -> None:
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if found.new_token is not None or not sent or not hmac.compare_digest(sent, found.csrf):
        raise CsrfRefused("the form's CSRF token is missing or does not match this browser's session: reload the "
                          "page and send the form again")
    if not _same_origin(request):
        raise CsrfRefused("the request came from another site")


class CsrfRefused(Exception):
    """403: a changing request without this browser's CSRF token, or from another site."""


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def wants_html(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return is_htmx(request) or "text/html" in accept or not accept or accept == "*/*"


def render(request: Request, name: str, context: dict[str, Any] | None = None, *, status: int = 200,
           headers: dict[str, str] | None = None) -> HTMLResponse:
    """A page or fragment from ``templates/``; every template sees ``viewer``, ``csrf``, ``path`` and ``version``."""
    found = getattr(request.state, "console_viewer", None)
    values = {"viewer": found, "csrf": found.csrf if found else "", "path": request.url.path,
              "version": __version__, "root": ROOT, "htmx": is_htmx(request)}
    values.update(context or {})
    return HTMLResponse(templates.get_template(name).render(values), status_code=status, headers=headers)


def _error_status(exc: Exception) -> int:
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, errors.NimbusError):
        return next(code for kind, code in STATUS_OF if isinstance(exc, kind))
    return 500


def error_page(request: Request, status: int, detail: str, *, title: str | None = None) -> Response:
    if not wants_html(request):
        return problem(status, detail, title=title)
    template = "error_fragment.html" if is_htmx(request) else "error.html"
    response = render(request, template, {"status": status, "title": title or "Something went wrong",
                                          "detail": errors.redact(detail)}, status=status)
    if is_htmx(request) and status >= 400:
        response.headers["HX-Retarget"] = "#messages"
        response.headers["HX-Reswap"] = "innerHTML"
    return response


def login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    location = f"{ROOT}/login?next={quote(target, safe='/')}"
    if is_htmx(request):
        return Response(status_code=401, headers={"HX-Redirect": location})
    if not wants_html(request):
        return problem(401, "sign in to the console first", headers={"Location": location})
    return RedirectResponse(location, status_code=303)


class ConsoleRoute(APIRoute):
    """Turns errors into pages, sends the signed-out to the login page, and sets the cookie made for a request."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except LoginRequired:
                response = login_redirect(request)
            except CsrfRefused as exc:
                response = error_page(request, 403, str(exc), title="Refused")
            except RequestValidationError as exc:
                where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'input'}: {e.get('msg')}"
                                  for e in exc.errors()[:5])
                response = error_page(request, 422, where or "the request is malformed", title="Invalid input")
            except errors.NimbusError as exc:
                response = error_page(request, _error_status(exc), str(exc))
            found = getattr(request.state, "console_viewer", None)
            if found is not None and found.new_token is not None:
                set_cookie(request, response, found.new_token, max_age=None)
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return route


def set_cookie(request: Request, response: Response, token: str, *, max_age: float | None) -> None:
    """The session cookie: HttpOnly (no script reads it), SameSite=Strict (no other site sends it), Secure
    over TLS, scoped to the console's paths."""
    response.set_cookie(COOKIE, token, max_age=int(max_age) if max_age else None, path=ROOT, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


class SecurityHeaders:
    """Pure ASGI middleware: the CSP and friends on every console response, static files included."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == ROOT or path.startswith(ROOT + "/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)
