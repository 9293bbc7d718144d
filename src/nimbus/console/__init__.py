"""The web console at ``/console``: server-rendered pages over the same store and scheduler as the API.

``web`` holds what every page shares (templates, the viewer and its session, CSRF, errors, security
headers); ``session`` signs in and out; ``pages/`` has one module per page. docs/console.md tells why it
is built this way (Jinja2 + htmx + uPlot, all shipped in the package: no CDN, no Node build).
"""

from fastapi import APIRouter, Depends, FastAPI
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

from nimbus.console import session, web
from nimbus.console.pages import deploy, functions, invoke, keys, layers, overview
from nimbus.errors import NotFound


def install(app: FastAPI) -> None:
    """Add the console's routes, its static files and its security headers to the node's app."""
    app.add_api_route(web.ROOT, lambda: RedirectResponse(web.ROOT + "/", status_code=307),
                      include_in_schema=False)
    for module in (session, overview, functions, invoke, deploy, keys, layers):
        app.include_router(module.router)
    app.mount(web.ROOT + "/static", StaticFiles(directory=web.HERE / "static"), name="console-static")
    app.include_router(_unknown)  # last: after every page and the static files
    app.add_middleware(web.SecurityHeaders)


_unknown = APIRouter(prefix=web.ROOT, route_class=web.ConsoleRoute, include_in_schema=False)


@_unknown.get("/{rest:path}")
async def unknown_page(rest: str, viewer: web.Viewer = Depends(web.viewer)) -> None:
    """A console path that is no page: the console's own 404 page (signed-out: the login page first)."""
    raise NotFound("there is no such page in the console")
