"""Deadlines for slow HTTP clients: one for a request's headers, one for its body.

uvicorn closes idle kept-alive connections (``timeout_keep_alive``) but waits forever for a client that
sends its headers, or its body, a byte at a time: each such client holds a connection, a parser and, for
a body, the part already received. :func:`protocol_class` subclasses uvicorn's HTTP protocol (httptools,
or h11 where that is not installed) with two timers: from the connection (or the end of the previous
response) to the end of the headers, then from there to the end of the body. When one fires before the
app has started its response the client gets a ``408`` and the connection is closed; the app, still
reading, sees the client go (``http.disconnect``). No per-chunk work is added: the timers are armed and
cancelled once per request.
"""

import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def _timeout_response(detail: str) -> bytes:
    body = json.dumps({"type": "about:blank", "title": "Request Timeout", "status": 408, "detail": detail}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class _Deadlines:
    """Mixed into a uvicorn HTTP protocol class; ``header_timeout_s`` and ``body_timeout_s`` set per class."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    _deadline = None

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, what, seconds)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, what: str, seconds: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = getattr(self, "cycle", None)
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_timeout_response(f"the request's {what} did not arrive within {seconds:g} s"))
        self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.header_timeout_s, "headers")

    def connection_lost(self, exc) -> None:
        self._disarm()
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
                {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s})


__all__ = ["protocol_class"]
