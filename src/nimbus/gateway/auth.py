"""API keys, tenants and the per-caller rate limit: one pure ASGI middleware in front of every route.

With ``NIMBUS_AUTH=on`` every request but ``/health`` (probes) and the API's description (``/openapi.json``,
``/docs``, ``/redoc``: no tenant data in them) needs ``Authorization: Bearer <key>``; a missing, unknown or
revoked key is a 401 with ``WWW-Authenticate``. ``/metrics`` carries every tenant's function names, so it
needs an admin key. The key's tenant scopes everything the handlers touch (``tenant(request)``); with
auth off every caller is the ``default`` tenant.

A key is ``nmb_`` + 43 URL-safe characters (32 random bytes); the store holds only its sha256 and the
first characters (``prefix``) so a listing can name it. Look-ups are cached in memory for
``NIMBUS_AUTH_CACHE_S`` (default 10 s): a warm call pays no database round trip, and a key revoked on
another node stops working within that time (at once on the node that revoked it).

The rate limit is a token bucket per key (per client address when auth is off, and for requests whose
key is not yet known to be valid, so guessing keys costs the guesser, not the database):
``NIMBUS_RATE_LIMIT`` tokens per second, ``NIMBUS_RATE_BURST`` at most (0: one second's worth).

The web console (``/console``) logs in with a session cookie instead (console/session.py): this middleware
only rate-limits it by client address.

Function URLs (``/fn/``) need a key only when their config says ``auth: key`` (gateway/urls.py decides):
this middleware admits them with or without one, notes a valid key, and still applies the rate limit.

The Lambda API (``/2015-03-31/``, boto3) authenticates with SigV4 instead: with auth on, the access key
id is an API key's id and the secret its SigV4 secret; this middleware checks the header and the clock
and looks the key up (refusing with AWS's 403s), and leaves the signature, which covers the body, to the
Lambda API to verify once it has read the body (``scope["state"]["nimbus.sigv4"]``). With auth off any
signature, or none, is accepted, as local emulators do.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import sys
import time
from dataclasses import dataclass

from nimbus.errors import NimbusError, NotFound
from nimbus.gateway.lambda_api import errors as lambda_errors
from nimbus.gateway.lambda_api import sigv4
from nimbus.gateway.problems import problem
from nimbus.store.lookups import LookupCache
from nimbus.store.records import DEFAULT_TENANT

log = logging.getLogger("nimbus.auth")

KEY_PREFIX = "nmb_"
KEY_BYTES = 32
PREFIX_SHOWN = len(KEY_PREFIX) + 8  # what listings show; fits api_keys.prefix (16)
KEY_MAX = 256  # longer bearer tokens are not ours: refused without hashing
DEFAULT_CACHE_S = 10.0
CACHE_MAX = 10_000  # cached look-ups; past it the cache starts over (a guesser cannot grow it without bound)
BUCKETS_MAX = 100_000  # rate-limit buckets; full ones are forgotten past it (a full bucket is no bucket)

OPEN_PATHS = frozenset({"/health"})  # no key, no rate limit: load balancers and orchestrators probe it
PUBLIC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})  # no key; rate-limited
# Admin keys only: /metrics names every tenant's functions; /api/v1/nodes the node's addresses and load.
ADMIN_PATHS = frozenset({"/metrics", "/api/v1/nodes"})
LAMBDA_ROOT = "/2015-03-31/"  # the Lambda API: SigV4, and AWS's error shapes
URL_ROOT = "/fn/"  # function URLs: a key only if the URL's config asks for one (gateway/urls.py)
CONSOLE_ROOT = "/console"  # the web console: its own login (a session cookie, console/session.py), no bearer key
SECRET_BYTES = 30  # a SigV4 secret: 40 URL-safe characters, as long as AWS's

REALM = 'Bearer realm="nimbus"'


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key (None when auth is off), its tenant, and whether it may manage keys."""

    key_id: str | None
    tenant: str
    admin: bool = False


ANONYMOUS = Principal(key_id=None, tenant=DEFAULT_TENANT)


def new_key() -> str:
    """A fresh API key: recognisable by its prefix, unguessable by its 32 random bytes."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def new_secret() -> str:
    """A SigV4 secret access key, kept by the store as it is (an HMAC key must be known to check a MAC)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_key(key: str) -> str:
    """What the store keeps instead of the key: sha256 of the whole key, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[:PREFIX_SHOWN]


def principal(request) -> Principal:
    """The caller the middleware admitted; a request that did not pass through it fails closed (500)."""
    return request.scope["state"]["nimbus.principal"]


def tenant(request) -> str:
    """The tenant every store call of this request is scoped to."""
    return request.scope["state"]["nimbus.principal"].tenant


def auth_on(request) -> bool:
    return request.app.state.node.settings.auth == "on"


class Buckets:
    """Token buckets by caller, O(1) per request: ``rate`` tokens per second up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self._state: dict[str, list[float]] = {}  # caller -> [tokens, last refill (monotonic)]

    def take(self, caller: str) -> float:
        """Spend one token of ``caller``'s bucket: 0 when allowed, else the seconds until one is there."""
        now = time.monotonic()
        state = self._state.get(caller)
        if state is None:
            if len(self._state) >= BUCKETS_MAX:
                self._forget_full(now)
            self._state[caller] = [self.burst - 1, now]
            return 0.0
        tokens = min(self.burst, state[0] + (now - state[1]) * self.rate)
        state[1] = now
        if tokens >= 1:
            state[0] = tokens - 1
            return 0.0
        state[0] = tokens
        return (1 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        full = [caller for caller, (tokens, last) in self._state.items()
                if tokens + (now - last) * self.rate >= self.burst]
        for caller in full:
            del self._state[caller]
        if len(self._state) >= BUCKETS_MAX:  # a flood of distinct callers: start over rather than grow
            self._state.clear()


class Guard:
    """The per-app state of authentication: the look-up cache and the rate-limit buckets.

    Built with the app and configured from the node's settings on the first request, because the settings
    arrive with the node (the lifespan), after the middleware stack exists.
    """

    def __init__(self) -> None:
        self.cache_s = DEFAULT_CACHE_S
        self._keys = LookupCache(self.cache_s, CACHE_MAX)  # key hash -> Principal, or None when unknown
        # SigV4 access key id -> (principal and secret, or None when unknown; key hash)
        self._sigv4 = LookupCache(self.cache_s, CACHE_MAX)
        self._settings = None
        self.buckets: Buckets | None = None

    def configure(self, settings) -> None:
        self._settings = settings
        if settings.auth_cache_s != self.cache_s:
            self.cache_s = settings.auth_cache_s
            self._keys = LookupCache(self.cache_s, CACHE_MAX)
            self._sigv4 = LookupCache(self.cache_s, CACHE_MAX)
        self.buckets = Buckets(settings.rate_limit, settings.rate_burst) if settings.rate_limit > 0 else None

    def forget(self, key_hash: str) -> None:
        """Drop a cached look-up: a key revoked on this node stops working with the next request."""
        self._keys.forget(lambda hashed, _: hashed == key_hash)
        self._sigv4.forget(lambda _, entry: entry[1] == key_hash)

    def forget_all(self) -> None:
        """Drop every cached look-up (revocations on other nodes may have been missed)."""
        self._keys.clear()
        self._sigv4.clear()

    def cached_sigv4(self, access_key: str) -> tuple[bool, tuple[Principal, str] | None]:
        known, entry = self._sigv4.peek(access_key)
        return known, entry[0] if known else None

    async def look_up_sigv4(self, store, access_key: str) -> tuple[Principal, str] | None:
        """The principal and secret of a live access key id, None for an unknown or revoked one; cached as
        ``look_up``."""

        async def read() -> tuple[tuple[Principal, str] | None, str | None]:
            try:
                record, secret = await store.get_sigv4_key(access_key)
            except NotFound:
                return None, None
            return (Principal(key_id=record.id, tenant=record.tenant, admin=record.admin), secret), record.key_hash

        found, _ = await self._sigv4.get(access_key, read)
        return found

    def cached(self, key_hash: str) -> tuple[bool, Principal | None]:
        known, who = self._keys.peek(key_hash)
        return known, who

    async def look_up(self, store, key_hash: str) -> Principal | None:
        """The principal of a live key, None for an unknown or revoked one; remembered for ``cache_s``, and
        read once for all the requests that miss together (``LookupCache``)."""

        async def read() -> Principal | None:
            try:
                record = await store.get_api_key_by_hash(key_hash)
            except NotFound:
                return None
            return Principal(key_id=record.id, tenant=record.tenant, admin=record.admin)

        who: Principal | None = await self._keys.get(key_hash, read)
        return who


def _bearer(scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer":
                return ""
            return token.strip()
    return None


def _unauthorized(detail: str, *, invalid: bool):
    challenge = REALM + (', error="invalid_token"' if invalid else "")
    return problem(401, detail, title="Unauthorized", headers={"WWW-Authenticate": challenge})


def _too_many(wait_s: float, buckets: Buckets, who: str):
    return problem(429, f"rate limit exceeded for this {who}: {buckets.rate:g} requests/s, "
                   f"bursts of {buckets.burst:g}", title="Too Many Requests",
                   headers={"Retry-After": str(max(1, math.ceil(wait_s)))})


class AuthMiddleware:
    """Admits a request as a ``Principal`` (in ``scope["state"]``), or answers 401, 403 or 429 itself."""

    def __init__(self, app, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        state = scope.setdefault("state", {})
        if path in OPEN_PATHS:
            state["nimbus.principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        guard = self.guard
        node = getattr(scope["app"].state, "node", None)
        if node is None:  # not started (or stopping): nothing to check keys against
            await problem(503, "the node is not running")(scope, receive, send)
            return
        if guard._settings is not node.settings:
            guard.configure(node.settings)
        buckets = guard.buckets
        address = "addr:" + (scope["client"][0] if scope.get("client") else "-")

        if path.startswith(URL_ROOT):
            await self._function_url(scope, receive, send, guard, node, address)
            return

        if path == CONSOLE_ROOT or path.startswith(CONSOLE_ROOT + "/"):
            # A browser sends no bearer key: the console resolves its session cookie into the principal
            # itself (and refuses every page without one when auth is on). The rate limit still applies.
            if buckets is not None and (wait := buckets.take(address)):
                await _refuse_rate(path, wait, buckets, "client address", scope, receive, send)
                return
            await self.app(scope, receive, send)
            return

        if node.settings.auth != "on":
            if buckets is not None and (wait := buckets.take(address)):
                await _refuse_rate(path, wait, buckets, "client address", scope, receive, send)
                return
            state["nimbus.principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return

        if path.startswith(LAMBDA_ROOT):
            await self._sigv4(scope, receive, send, guard, node, address)
            return

        response = None
        who = None
        token = _bearer(scope)
        if token is None:
            if path not in PUBLIC_PATHS:
                response = _unauthorized("this node needs an API key: send Authorization: Bearer <key>",
                                         invalid=False)
        elif not token.startswith(KEY_PREFIX) or len(token) > KEY_MAX:
            response = _unauthorized("the Authorization header does not carry a Nimbus API key (Bearer nmb_...)",
                                     invalid=True)
        else:
            key_hash = hash_key(token)
            known, who = guard.cached(key_hash)
            # A key not known to be good costs its sender's address a token, before it costs a query.
            if who is None and buckets is not None and (wait := buckets.take(address)):
                await _too_many(wait, buckets, "client address")(scope, receive, send)
                return
            if not known:
                try:
                    who = await guard.look_up(node.store, key_hash)
                except NimbusError as exc:
                    await problem(503, f"cannot check the API key: {exc}")(scope, receive, send)
                    return
            if who is None:
                response = _unauthorized("the API key is unknown or revoked", invalid=True)
        if response is not None:
            await response(scope, receive, send)
            return
        if who is None:  # a public path without a key
            if buckets is not None and (wait := buckets.take(address)):
                await _too_many(wait, buckets, "client address")(scope, receive, send)
                return
            state["nimbus.principal"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        if buckets is not None and (wait := buckets.take("key:" + who.key_id)):
            await _too_many(wait, buckets, "API key")(scope, receive, send)
            return
        if path in ADMIN_PATHS and not who.admin:
            await problem(403, f"{path} shows every tenant's data: it needs an admin key")(scope, receive, send)
            return
        state["nimbus.principal"] = who
        await self.app(scope, receive, send)


    async def _function_url(self, scope, receive, send, guard: Guard, node, address: str) -> None:
        """Admit a function URL request with or without a key: the URL's own ``auth`` decides (gateway/urls.py).

        A valid API key is noted in ``nimbus.url_key`` (and, with auth on, names the tenant); any other
        Authorization header is the function's business, passed on untouched, so it costs no 401 here.
        """
        buckets = guard.buckets
        token = _bearer(scope)
        who = None
        if token and token.startswith(KEY_PREFIX) and len(token) <= KEY_MAX:
            key_hash = hash_key(token)
            known, who = guard.cached(key_hash)
            if who is None and buckets is not None and (wait := buckets.take(address)):
                await _too_many(wait, buckets, "client address")(scope, receive, send)
                return
            if not known:
                try:
                    who = await guard.look_up(node.store, key_hash)
                except NimbusError as exc:
                    await problem(503, f"cannot check the API key: {exc}")(scope, receive, send)
                    return
        if buckets is not None:
            caller, kind = ("key:" + who.key_id, "API key") if who is not None and who.key_id else \
                (address, "client address")
            if wait := buckets.take(caller):
                await _too_many(wait, buckets, kind)(scope, receive, send)
                return
        state = scope["state"]
        state["nimbus.url_key"] = who
        state["nimbus.principal"] = who if who is not None and node.settings.auth == "on" else ANONYMOUS
        await self.app(scope, receive, send)

    async def _sigv4(self, scope, receive, send, guard: Guard, node, address: str) -> None:
        """Admit a Lambda API request by its SigV4 key (the signature itself is checked with the body)."""
        buckets = guard.buckets
        try:
            parsed = sigv4.parse(scope)
            if parsed is None:
                raise lambda_errors.missing_auth()
            sigv4.check_clock(parsed)
            known, found = guard.cached_sigv4(parsed.access_key)
            if found is None and buckets is not None and (wait := buckets.take(address)):
                raise lambda_errors.throttled(f"Rate exceeded for this client address: {buckets.rate:g} "
                                              "requests/s", wait)
            if not known:
                try:
                    found = await guard.look_up_sigv4(node.store, parsed.access_key)
                except NimbusError as exc:
                    raise lambda_errors.LambdaError("ServiceException", 500, f"cannot check the access key: {exc}",
                                                    kind="Service") from None
            if found is None:
                raise lambda_errors.unknown_key()
            who, secret = found
            if buckets is not None and (wait := buckets.take("key:" + who.key_id)):
                raise lambda_errors.throttled(f"Rate exceeded for this access key: {buckets.rate:g} requests/s",
                                              wait)
        except lambda_errors.LambdaError as exc:
            await lambda_errors.send(exc, send)
            return
        scope["state"]["nimbus.principal"] = who
        scope["state"]["nimbus.sigv4"] = (parsed, secret)
        await self.app(scope, receive, send)


async def _refuse_rate(path: str, wait: float, buckets: Buckets, who: str, scope, receive, send) -> None:
    if path.startswith(LAMBDA_ROOT):
        await lambda_errors.send(lambda_errors.throttled(f"Rate exceeded for this {who}: {buckets.rate:g} "
                                                         "requests/s", wait), send)
        return
    await _too_many(wait, buckets, who)(scope, receive, send)


# ---------------------------------------------------------------- the first admin key


FIRST_KEY_NAME = "first-admin"


async def ensure_first_admin_key(store, *, out=None) -> str | None:
    """At the first start with auth on and no key in the store, make an admin key and print it, once.

    Printed on stderr (never logged through handlers that may ship logs elsewhere, never written to disk):
    the operator copies it into NIMBUS_API_KEY. Any key in the store, revoked ones too, means this already
    happened, so a restart never prints another. Returns the key when it made one.
    """
    if await store.list_api_keys(limit=1):
        return None
    key = new_key()
    record = await store.create_api_key(tenant=DEFAULT_TENANT, name=FIRST_KEY_NAME, key_hash=hash_key(key),
                                        admin=True, prefix=display_prefix(key))
    out = out or sys.stderr
    bar = "=" * 78
    out.write(f"\n{bar}\nNIMBUS FIRST ADMIN API KEY (shown once, never again; the node keeps only its hash):\n\n"
              f"    {key}\n\n"
              f"key id {record.id}, tenant {record.tenant}. Use it with: export NIMBUS_API_KEY={key}\n"
              f"then create per-tenant keys with: nimbus keys create --tenant NAME\n{bar}\n\n")
    out.flush()
    log.warning("created the first admin API key %s (id %s); it was printed on stderr once", record.prefix,
                record.id)
    return key


# ---------------------------------------------------------------- the OpenAPI document


SECURITY_SCHEME = {"type": "http", "scheme": "bearer",
                   "description": "an API key (nmb_...) when the node runs with NIMBUS_AUTH=on"}
WWW_AUTHENTICATE = {"WWW-Authenticate": {"description": "the Bearer challenge", "required": True,
                                         "schema": {"type": "string"}}}


def document(app) -> None:
    """Make the OpenAPI document state the bearer scheme and the 401/403/429 the middleware can answer.

    Installed before ``problems.install`` so its pass also makes these answers problem documents.
    """
    generate = app.openapi

    def openapi() -> dict:
        spec = generate()  # ``problems``'s pass above this one caches the finished document
        for path, methods in spec.get("paths", {}).items():
            if path in OPEN_PATHS:
                continue
            for operation in methods.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                # Either a key or none: one document for both modes (the node's NIMBUS_AUTH decides).
                operation["security"] = [{"bearer": []}, {}]
                responses = operation["responses"]
                responses.setdefault("401", {"description": "no API key, or an unknown or revoked one "
                                                            "(NIMBUS_AUTH=on)", "headers": WWW_AUTHENTICATE})
                responses.setdefault("429", {"description": "this key's (or address's) rate limit is spent"})
                if path in ADMIN_PATHS:
                    responses.setdefault("403", {"description": "needs an admin key"})
        spec.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = SECURITY_SCHEME
        return spec

    app.openapi = openapi
