"""Deadlines for slow HTTP clients: one for a request's headers, one for its body.

uvicorn closes idle kept-alive connections (``timeout_keep_alive``) but waits forever for a client that
sends its headers, or its body, a byte at a time: each such client holds a connection, a parser and, for
a body, the part already received. :func:`protocol_class` subclasses uvicorn's HTTP protocol (httptools,
or h11 where that is not installed) with two timers: from the connection (or the end of the previous
response) to the end of the headers, then from there to the end of the body. When one fires before the
app has started its response the client gets a ``408`` and the connection is closed; the app, still
reading, sees the client go (``http.disconnect``). No per-chunk work is added: a request stores when its
deadlines are due, and one sweep per loop (``_Sweeper``) closes the connections past them.
"""

import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def _timeout_response(detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": "Request Timeout", "status": 408, "detail": detail}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class _Sweeper:
    """The deadlines of one event loop's connections, checked every ``interval`` seconds.

    Why not a timer per deadline: arming and cancelling ``call_later`` twice per request was 3% of a
    warm call's CPU under load. Here a request only stores when its deadline is due; one timer per loop
    runs while there are connections, and a deadline fires up to ``interval`` late.
    """

    def __init__(self, loop, interval: float, registry: dict) -> None:
        self.loop, self.interval, self._registry = loop, interval, registry
        self.watched: set = set()
        self._handle = None

    def add(self, protocol) -> None:
        self.watched.add(protocol)
        if self._handle is None:
            self._handle = self.loop.call_later(self.interval, self._sweep)

    def discard(self, protocol) -> None:
        self.watched.discard(protocol)

    def _sweep(self) -> None:
        self._handle = None
        now = self.loop.time()
        for protocol in [p for p in self.watched if p._due is not None and p._due <= now]:
            protocol._expired()
        if self.watched:
            self._handle = self.loop.call_later(self.interval, self._sweep)
        elif self._registry.get(id(self.loop)) is self:
            del self._registry[id(self.loop)]  # no connections left: no timer, nothing kept


class _Deadlines:
    """Mixed into a uvicorn HTTP protocol class; ``header_timeout_s`` and ``body_timeout_s`` set per class,
    and ``_sweepers`` (loop id → ``_Sweeper``) too."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    _sweepers: dict = {}
    _due: float | None = None  # loop time the current deadline is due, None when none is armed
    _what = ""
    _seconds = 0.0
    _sweeper: _Sweeper | None = None

    def _arm(self, seconds: float, what: str) -> None:
        self._due, self._what, self._seconds = self.loop.time() + seconds, what, seconds

    def _disarm(self) -> None:
        self._due = None

    def _expired(self) -> None:
        self._due = None
        if self.transport.is_closing():
            return
        cycle = getattr(self, "cycle", None)
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_timeout_response(f"the request's {self._what} did not arrive within "
                                                   f"{self._seconds:g} s"))
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sweeper = self._sweepers.get(id(self.loop))
        if sweeper is None:
            interval = min(max(min(self.header_timeout_s, self.body_timeout_s) / 10, 0.05), 1.0)
            sweeper = self._sweepers[id(self.loop)] = _Sweeper(self.loop, interval, self._sweepers)
        self._sweeper = sweeper
        sweeper.add(self)
        self._arm(self.header_timeout_s, "headers")

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._sweeper is not None:
            self._sweeper.discard(self)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request's headers, on a kept-alive connection
            self._arm(self.header_timeout_s, "headers")


class _HttpToolsDeadlines(_Deadlines):
    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


class _H11Deadlines(_Deadlines):
    def handle_events(self) -> None:
        import h11

        their_state = self.conn.their_state
        super().handle_events()
        now = self.conn.their_state
        if now is not their_state:
            if now is h11.SEND_BODY:
                self._arm(self.body_timeout_s, "body")
            elif now is h11.DONE:
                self._disarm()


def protocol_class(header_timeout_s: float, body_timeout_s: float) -> type:
    """uvicorn's HTTP protocol (what ``http="auto"`` picks) with the two deadlines."""
    base = AutoHTTPProtocol
    mixin = _HttpToolsDeadlines if hasattr(base, "on_headers_complete") else _H11Deadlines
    return type(f"Nimbus{base.__name__}", (mixin, base),
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s, "_sweepers": {}})


__all__ = ["protocol_class"]
