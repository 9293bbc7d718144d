"""Result callbacks: an async invocation's outcome POSTed to its ``callback_url`` once it ends.

Why it is built this way:

- **Durable.** Finishing an invocation with a callback marks it ``callback_status = pending`` in the same
  write; delivery state lives in the store (``callback_status``, ``callback_attempts``, and the finished
  row's free lease columns and ``not_before`` for the delivery's own lease and backoff), so a restart,
  or another node, resumes pending deliveries. Delivery is at least once: receivers dedupe on
  ``X-Nimbus-Invocation-Id``.
- **Outbound only where allowed.** A platform that POSTs to any URL a caller names is an SSRF gadget
  into the operator's network, so ``NIMBUS_CALLBACK_ALLOW`` lists the hosts, IPs and CIDRs callbacks may
  reach; empty refuses every callback. The URL is checked when the call is enqueued (422) and again
  before each delivery (the list may have changed since). Redirects are not followed: a 3xx could point
  anywhere.
"""

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
import orjson

from nimbus.errors import InvalidRequest
from nimbus.store import InvocationRecord, Store

log = logging.getLogger("nimbus.callbacks")

URL_MAX = 2048  # the column's width
MAX_ATTEMPTS = 10  # deliveries tried before callback_status becomes ``failed``
POST_TIMEOUT_S = 10.0
LEASE_S = 60.0  # longer than one POST can take, so a delivery's lease needs no renewal
CONCURRENCY = 16
BACKOFF_MAX_S = 600.0
_HOSTNAME = re.compile(r"^(\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class AllowList:
    """Where callbacks may go: host names (exact; ``.example.com`` also takes its subdomains), IPs, CIDRs.

    A host name matches only a name entry: it is not resolved, so naming a host trusts its DNS, and a
    CIDR admits only URLs that spell an IP in it.
    """

    def __init__(self, text: str = "") -> None:
        self.names: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for part in (p.strip().lower().rstrip(".") for p in text.split(",")):
            if not part:
                continue
            try:
                self.networks.append(ipaddress.ip_network(part.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if not _HOSTNAME.match(part):
                raise ValueError(f"NIMBUS_CALLBACK_ALLOW: {part!r} is not a host name, IP or CIDR")
            self.names.add(part)

    def __bool__(self) -> bool:
        return bool(self.names or self.networks)

    def check(self, url: str) -> str:
        """``url`` if callbacks may POST to it; else ``InvalidRequest`` saying why (a 422)."""
        if len(url) > URL_MAX:
            raise InvalidRequest(f"the callback URL is {len(url)} characters; the limit is {URL_MAX}")
        if not self:
            raise InvalidRequest("callbacks are off on this node (NIMBUS_CALLBACK_ALLOW is empty)")
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").rstrip(".")
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError as exc:
            raise InvalidRequest(f"the callback URL is malformed: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise InvalidRequest("the callback URL must be an absolute http:// or https:// URL")
        if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
            raise InvalidRequest("the callback URL holds whitespace or control characters")
        if not self.allows(host):
            raise InvalidRequest(f"callbacks to {host!r} are not allowed (NIMBUS_CALLBACK_ALLOW)")
        return url

    def allows(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            host = host.lower()
            return host in self.names or any(
                name.startswith(".") and (host.endswith(name) or host == name[1:]) for name in self.names
            )
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        return any(ip.version == net.version and ip in net for net in self.networks)


def backoff(attempt: int, base_s: float, cap_s: float = BACKOFF_MAX_S) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, …): base·2^(n-1), capped, ±10 %.

    The jitter keeps a burst of failures from retrying in lockstep.
    """
    delay = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.9, 1.1)


def payload(inv: InvocationRecord) -> bytes:
    """What the callback receives: the invocation's result, as ``GET /api/v1/invocations/{id}`` shows it."""
    return orjson.dumps({
        "invocation_id": inv.id, "function": inv.function_name, "version": inv.version, "mode": inv.mode,
        "status": inv.status, "start": inv.start,
        "output": orjson.Fragment(inv.output) if inv.output is not None else None,
        "error": inv.error, "logs": inv.logs, "logs_truncated": inv.logs_truncated, "duration_ms": inv.duration_ms,
        "created_at": inv.created_at, "started_at": inv.started_at, "finished_at": inv.finished_at,
        "attempts": inv.attempts,
    })


class Deliverer:
    """Claims pending deliveries from the store and POSTs them, retrying with backoff."""

    def __init__(self, store: Store, allow: AllowList, owner: str, *, poll_s: float, base_s: float,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.store = store
        self.allow = allow
        self.owner = owner
        self.poll_s = poll_s
        self.base_s = base_s
        self.max_attempts = max_attempts
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        # trust_env off: a proxy from the environment would carry the POST somewhere the allow list never saw.
        self._client = httpx.AsyncClient(timeout=POST_TIMEOUT_S, follow_redirects=False, trust_env=False)
        self._loop_task = asyncio.create_task(self._loop(), name="callback-delivery")

    def wake(self) -> None:
        self._wakeup.set()

    async def close(self) -> None:
        """Stop claiming and cancel deliveries in flight; their leases are handed back by the scheduler."""
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # not wait_for: see Pool._prewarm_loop
                async with asyncio.timeout(self.poll_s):
                    await self._wakeup.wait()
            self._wakeup.clear()
            free = CONCURRENCY - len(self._tasks)
            if free <= 0:
                continue
            try:
                claimed = await self.store.claim_callbacks(self.owner, limit=free, lease_s=LEASE_S)
            except Exception:
                log.exception("claiming result callbacks failed")
                continue
            for inv in claimed:
                task = asyncio.create_task(self._deliver(inv), name=f"callback-{inv.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(claimed) == free:
                self._wakeup.set()

    async def _deliver(self, inv: InvocationRecord) -> None:
        attempt = inv.callback_attempts
        outcome, why = "failed", ""
        try:
            self.allow.check(inv.callback_url or "")
        except InvalidRequest as exc:
            why = str(exc)
        else:
            try:
                resp = await self._client.post(
                    inv.callback_url, content=payload(inv),
                    headers={"Content-Type": "application/json", "X-Nimbus-Invocation-Id": inv.id,
                             "User-Agent": "nimbus-callback"},
                )
                if 200 <= resp.status_code < 300:
                    outcome = "delivered"
                else:
                    outcome, why = "retry", f"answered {resp.status_code}"
            except httpx.HTTPError as exc:
                outcome, why = "retry", f"{type(exc).__name__}: {exc}"
        not_before = None
        if outcome == "retry":
            if attempt >= self.max_attempts:
                outcome = "failed"
            else:
                outcome = "pending"
                not_before = datetime.now(UTC) + timedelta(seconds=backoff(attempt, self.base_s))
        if outcome != "delivered":
            log.warning("callback of invocation %s, attempt %d: %s (%s)", inv.id, attempt, why, outcome)
        try:
            await self.store.callback_done(inv.id, owner=self.owner, attempt=attempt, status=outcome,
                                           not_before=not_before)
        except Exception:
            log.exception("could not record the callback of %s; its lease will run out and it is tried again",
                          inv.id)
