"""The HTTP API (DESIGN §3): FastAPI routers over the store and the scheduler.

``build_api`` makes the ASGI app; the composition root (``nimbus.app``) puts the running node's parts
on ``app.state.node`` from its lifespan.
"""

from contextlib import AbstractAsyncContextManager
from collections.abc import Callable

from fastapi import FastAPI

from nimbus import __version__
from nimbus.gateway import functions, invocations, limits, problems, system


def build_api(lifespan: Callable[[FastAPI], AbstractAsyncContextManager] | None = None) -> FastAPI:
    app = FastAPI(title="Nimbus", version=__version__, lifespan=lifespan,
                  description="Self-hosted serverless functions in sandboxed machines.")
    problems.install(app)
    app.include_router(functions.router)
    app.include_router(invocations.router)
    app.include_router(system.router)
    app.add_middleware(limits.BodyLimit)
    return app
