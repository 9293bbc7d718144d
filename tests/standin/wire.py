"""HTTP/1.1 on a Unix socket, just enough for Firecracker's API: one request read, one response written.

Shared by the API stand-ins (``tests/unit/test_firecracker_api.py``'s in-process one and the stand-in
executable). Requests carry a ``Content-Length`` body or none; chunked bodies are refused. Connections
are kept alive (the client, httpx, reuses them) until the client hangs up or asks to close.
"""

from __future__ import annotations

import asyncio
import http
import json
from dataclasses import dataclass, field

HEAD_MAX_BYTES = 64 * 1024


class BadRequest(Exception):
    """The bytes are not an HTTP request this server can read; answer 400 and close."""


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def wants_close(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        return connection == "close" or (self.version == "HTTP/1.0" and connection != "keep-alive")


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request on the connection; None when the client hung up between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too long") from None
    request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(f"not an HTTP request line: {request_line!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"not a header line: {line!r}")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest("chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest(f"bad Content-Length {headers['content-length']!r}") from None
    try:
        body = await reader.readexactly(length) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return Request(parts[0], parts[1], parts[2], headers, body)


def response(status: int, body: bytes = b"", content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
    if status != 204:  # a 204 carries no body and no length
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def json_response(status: int, value) -> bytes:
    return response(status, json.dumps(value).encode())


def fault(status: int, message: str) -> bytes:
    """Firecracker's error answer: ``{"fault_message": …}``."""
    return json_response(status, {"fault_message": message})
