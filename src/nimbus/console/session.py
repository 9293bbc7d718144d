"""Signing in and out of the console with an API key.

The key is checked as the API checks it (its hash, not revoked) and then forgotten: the browser gets a
new random token in an HttpOnly, SameSite=Strict cookie (Secure over TLS) whose hash names a row of
``console_sessions``; the session lasts ``NIMBUS_CONSOLE_SESSION_S`` and ends at once when its key is
revoked. A fresh token at sign-in means a token planted before it (session fixation) is worth nothing.
"""

import secrets

from fastapi import APIRouter, Form, Query, Request
from starlette.responses import RedirectResponse, Response

from nimbus.console import web
from nimbus.errors import NotFound
from nimbus.gateway import auth

router = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)


def _next(target: str | None) -> str:
    """Where to go after signing in: a console path only (never another site, never //host)."""
    if target and target.startswith(web.ROOT) and not target.startswith("//") and "\\" not in target:
        return target
    return web.ROOT + "/"


@router.get("/login")
async def login_page(request: Request, next: str | None = Query(None, max_length=2048)) -> Response:  # noqa: A002
    found = await web.look(request)
    if found.signed_in:
        return RedirectResponse(_next(next), status_code=303)
    return web.render(request, "login.html", {"next": _next(next), "problem": None})


@router.post("/login")
async def login(request: Request, key: str = Form("", max_length=auth.KEY_MAX),
                next: str | None = Form(None, max_length=2048)) -> Response:  # noqa: A002
    found = await web.look(request)
    await web.require_csrf(request, found)
    store = web.node(request).store
    record = None
    key = key.strip()
    if key.startswith(auth.KEY_PREFIX):
        try:
            record = await store.get_api_key_by_hash(auth.hash_key(key))
        except NotFound:
            record = None
    if record is None:
        return web.render(request, "login.html", {"next": _next(next),
                                                  "problem": "That key is unknown or revoked."}, status=401)
    token = secrets.token_urlsafe(32)
    lifetime = web.node(request).settings.console_session_s
    await store.open_console_session(web.token_hash(token), record.id, lifetime)
    response = RedirectResponse(_next(next), status_code=303)
    found.new_token = None  # this response sets the signed-in token instead
    web.set_cookie(request, response, token, max_age=lifetime)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    found = await web.look(request)
    await web.require_csrf(request, found)
    token = request.cookies.get(web.COOKIE)
    if token and web.TOKEN_RE.fullmatch(token):
        await web.node(request).store.close_console_session(web.token_hash(token))
    response = RedirectResponse(web.ROOT + "/login", status_code=303)
    found.new_token = None
    web.set_cookie(request, response, secrets.token_urlsafe(32), max_age=None)
    return response
