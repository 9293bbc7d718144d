"""The host's rules for one conversation with an agent, shared by every driver.

Whatever carries the frames (a socketpair for bwrap, a vsock for Firecracker), the host sends only the
request types it knows, stamps each with a fresh id, and believes a reply only when it answers that id
with a type that answers that request and a blob within the result limit. A reply that breaks any of
these was not written by an honest agent, so the machine that sent it is killed.
"""

import asyncio
import contextlib

from nimbus import protocol
from nimbus.agent.base import RESULT_MAX

# Which reply types answer which request type.
REPLIES = {
    protocol.PING: frozenset({protocol.PONG}),
    protocol.INIT: frozenset({protocol.INIT_OK, protocol.ERROR}),
    protocol.EXEC: frozenset({protocol.RESULT, protocol.ERROR}),
}
# The largest blob a reply to each request may carry: an Exec's result; nothing for Ping and Init
# (logs and errors travel in the header, itself capped at protocol.HEADER_MAX).
BLOB_LIMITS = {protocol.PING: 0, protocol.INIT: 0, protocol.EXEC: RESULT_MAX}
REPLY_MAX = protocol.HEADER_MAX + RESULT_MAX  # the most one reply can make the node read
DEFAULT_REPLY_BUFFER_BYTES = 256 << 20


class ReplyBudget:
    """The bytes of replies the node reads from all its machines at once, bounded node-wide.

    A read takes its frame's announced size before reading it and gives it back once read. A read that
    does not fit waits for others to finish: the machine has done its work and is only blocked on its
    write, and the call's own timeout still bounds the wait (failing it at once would throw the
    finished result away). ``total`` is never below one largest reply, or such a reply would wait forever.
    """

    def __init__(self, total: int = DEFAULT_REPLY_BUFFER_BYTES) -> None:
        self.total = max(int(total), REPLY_MAX)
        self.used = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, size: int) -> None:
        while self.used + size > self.total:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, size: int):
        await self.acquire(size)
        try:
            yield
        finally:
            self.release(size)


def budget_of(driver) -> ReplyBudget:
    """The driver's reply budget (the node sets one from its settings; a default one otherwise)."""
    budget = getattr(driver, "reply_budget", None)
    if budget is None:
        budget = driver.reply_budget = ReplyBudget()
    return budget


async def read_reply(reader, kind: str, budget: ReplyBudget) -> tuple[dict, bytes]:
    """The reply to a request of type ``kind``; a prefix announcing more than it may carry is refused unread."""
    return await protocol.read_frame(reader, protocol.GUEST_TYPES, BLOB_LIMITS[kind], budget.hold)


def check_request(kind: object) -> None:
    """Raise ``ProtocolError`` for a request type the host never sends."""
    if kind not in REPLIES:
        raise protocol.ProtocolError(f"the host does not send {kind!r} frames")


def reply_problem(kind: str, rid: int, reply: dict, blob: bytes) -> str | None:
    """What is wrong with ``reply`` as the answer to request ``rid`` of type ``kind``; None when nothing."""
    if reply.get("id") != rid:
        return f"reply id {reply.get('id')!r} does not answer request {rid}"
    if reply["type"] not in REPLIES[kind]:
        return f"{reply['type']!r} does not answer {kind!r}"
    if len(blob) > RESULT_MAX:
        # The agent refuses such results itself: this frame was forged by code that took over the
        # channel, so nothing the machine says can be trusted any more.
        return f"a reply of {len(blob)} bytes is over the result limit of {RESULT_MAX} bytes"
    return None


__all__ = ["BLOB_LIMITS", "REPLIES", "REPLY_MAX", "ReplyBudget", "budget_of", "check_request", "read_reply",
           "reply_problem"]
