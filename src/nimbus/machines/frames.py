"""The host's rules for one conversation with an agent, shared by every driver.

Whatever carries the frames (a socketpair for bwrap, a vsock for Firecracker), the host sends only the
request types it knows, stamps each with a fresh id, and believes a reply only when it answers that id
with a type that answers that request and a blob within the result limit. A reply that breaks any of
these was not written by an honest agent, so the machine that sent it is killed.
"""

from nimbus import protocol
from nimbus.agent.base import RESULT_MAX

# Which reply types answer which request type.
REPLIES = {
    protocol.PING: frozenset({protocol.PONG}),
    protocol.INIT: frozenset({protocol.INIT_OK, protocol.ERROR}),
    protocol.EXEC: frozenset({protocol.RESULT, protocol.ERROR}),
}


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


__all__ = ["REPLIES", "check_request", "reply_problem"]
