"""The HTTP API (docs/architecture.md#http-api): FastAPI routers over the store and the scheduler.

``build_api`` makes the ASGI app; the composition root (``nimbus.app``) puts the running node's parts
on ``app.state.node`` from its lifespan. ``app.state.guard`` holds what authentication remembers (the
key look-up cache and the rate-limit buckets), so the keys routes can forget a revoked key at once.
"""

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from nimbus import __version__, console
from nimbus.gateway import (
    auth,
    fast,
    functions,
    invocations,
    keys,
    layers,
    limits,
    problems,
    schedules,
    system,
    url_config,
    urls,
)
from nimbus.gateway.lambda_api.routes import LambdaApi


def build_api(lifespan: Callable[[FastAPI], AbstractAsyncContextManager] | None = None) -> FastAPI:
    # FastAPI's own OpenTelemetry hooks are off: a node exports Prometheus metrics, and with them on
    # every request asks OpenTelemetry for its providers (2% of a warm call's CPU under load).
    app = FastAPI(title="Nimbus", version=__version__, lifespan=lifespan,
                  description="Self-hosted serverless functions in sandboxed machines.",
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    auth.document(app)  # before problems: its pass turns the 401/403/429 this adds into problem documents
    problems.install(app)
    app.include_router(functions.router)
    app.include_router(invocations.router)
    app.include_router(layers.router)
    app.include_router(keys.router)
    app.include_router(schedules.router)
    app.include_router(system.router)
    app.include_router(url_config.router)
    console.install(app)  # /console: pages over the same store and scheduler (its own login, CSP)
    app.add_middleware(fast.FastInvoke)  # innermost of ours: behind the key check and the body cap
    app.add_middleware(limits.BodyLimit)
    app.add_middleware(LambdaApi)  # /2015-03-31 (boto3): its own body limits and error shapes, behind auth
    app.add_middleware(urls.FunctionUrls)  # /fn/: plain HTTP to functions, its own 6 MiB limit, behind auth
    # Outermost: a caller without a valid key, or over its rate, is refused before anything else runs.
    app.state.guard = auth.Guard()
    app.add_middleware(auth.AuthMiddleware, guard=app.state.guard)
    return app
