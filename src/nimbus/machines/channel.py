"""The host's end of one conversation with an agent, shared by every driver.

Whatever carries the frames (a socketpair for bwrap, a vsock for Firecracker), the host sends only the
request types it knows, stamps each with a fresh id, and believes a reply only when it answers that id
with a type that answers that request and a blob within the result limit. A reply that breaks any of
these was not written by an honest agent, so the machine that sent it is killed. :class:`Channel` is
that write-frame / read-reply / timeout / abort shape, once; each machine says only how it dies.
"""

import asyncio
import contextlib
from typing import Protocol

from nimbus import protocol
from nimbus.agent.contract import RESULT_MAX
from nimbus.errors import MachineDied, MachineTimeout, ProtocolError

# Which reply types answer which request type.
REPLIES = {
    protocol.PING: frozenset({protocol.PONG}),
    protocol.INIT: frozenset({protocol.INIT_OK, protocol.ERROR}),
    protocol.EXEC: frozenset({protocol.RESULT, protocol.ERROR}),
    protocol.SNAPSHOT: frozenset({protocol.SNAPSHOT_OK, protocol.ERROR}),
}
# The largest blob a reply to each request may carry: an Exec's result; nothing for Ping and Init
# (logs and errors travel in the header, itself capped at protocol.HEADER_MAX).
BLOB_LIMITS = {protocol.PING: 0, protocol.INIT: 0, protocol.EXEC: RESULT_MAX, protocol.SNAPSHOT: 0}
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
        if not self._waiters:  # the usual case: every reply fit
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


async def read_reply(reader, kind: str, budget: ReplyBudget) -> tuple[dict, bytes]:
    """The reply to a request of type ``kind``; a prefix announcing more than it may carry is refused unread."""
    return await protocol.read_frame(reader, protocol.GUEST_TYPES, BLOB_LIMITS[kind], budget)


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


class Peer(Protocol):
    """What a machine tells its channel: how it ended, and how to end it when a request breaks it."""

    id: str
    uses: int

    def exit_note(self) -> str:
        """How its process ended ("still running" while it runs), for a request to a dead machine."""

    def tail_note(self) -> str:
        """``"; its output ends: …"`` (or nothing), appended to every error."""

    def kill_now(self) -> None:
        """Kill it without awaiting anything (the request was cancelled)."""

    async def abort(self) -> None:
        """Kill it and release what it holds: a request broke it."""

    async def died(self, kind: str) -> MachineDied:
        """The error for a channel that closed under a request of type ``kind``."""

    async def died_mid_frame(self) -> bool:
        """Whether a frame cut short by end-of-stream was cut by the machine's death (not forged)."""


class Channel:
    """A machine's request/reply stream to its agent: one request at a time, replies checked.

    ``attach`` gives it the stream (again after a reconnect: request ids keep counting).
    """

    def __init__(self, peer: Peer, driver) -> None:
        self.peer = peer
        self.budget: ReplyBudget = driver.reply_budget  # the driver's, shared by all its machines
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.seq = 0

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def exchange(self, header: dict, blob: bytes, timeout: float | None, *,
                       alive: bool = True) -> tuple[dict, bytes]:
        """Send one frame and return the checked reply; any failure ends the machine (see ``Machine``).

        ``alive``: whether the machine is running (False: ``MachineDied``, nothing sent).
        """
        peer = self.peer
        kind = header.get("type")
        check_request(kind)
        if not alive:
            raise MachineDied(f"machine {peer.id} is not running ({peer.exit_note()}){peer.tail_note()}")
        self.seq += 1
        rid = self.seq
        data = protocol.encode({**header, "id": rid}, blob)  # oversized: ProtocolError, nothing sent
        if kind == protocol.EXEC:
            peer.uses += 1
        try:
            async with asyncio.timeout(timeout):
                self.writer.write(data)
                await self.writer.drain()
                reply, reply_blob = await read_reply(self.reader, kind, self.budget)
        except TimeoutError:
            await peer.abort()
            raise MachineTimeout(
                f"machine {peer.id} gave no reply to {kind} within {timeout:g}s and was killed{peer.tail_note()}"
            ) from None
        except (EOFError, ConnectionError):
            error = await peer.died(kind)
            await peer.abort()
            raise error from None
        except ProtocolError as exc:
            if self.reader.at_eof() and await peer.died_mid_frame():
                error = await peer.died(kind)
                await peer.abort()
                raise error from None
            await peer.abort()
            raise ProtocolError(f"machine {peer.id}: {exc}; machine killed") from None
        except BaseException:  # cancelled mid-request: the channel is out of step, so the machine is done
            peer.kill_now()  # no awaiting while cancelled; stop()/kill() will reap and release
            raise
        problem = reply_problem(kind, rid, reply, reply_blob)
        if problem is not None:
            await peer.abort()
            raise ProtocolError(f"machine {peer.id}: {problem}; machine killed")
        return reply, reply_blob


__all__ = ["BLOB_LIMITS", "REPLIES", "REPLY_MAX", "Channel", "Peer", "ReplyBudget", "check_request",
           "read_reply", "reply_problem"]
