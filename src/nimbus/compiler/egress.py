"""The egress proxy of a sandboxed dependency build: the package index, and nothing else.

Building a source distribution runs its ``setup.py`` (or build backend), which is a tenant's choice of
code. It runs in the builder sandbox, whose network namespace holds only its own loopback; the one way
out is this proxy, which listens on a Unix socket bind-mounted into the sandbox (a forwarder inside
relays ``127.0.0.1:<port>`` to it, see :mod:`nimbus.compiler.layers`). It speaks just enough HTTP to
decide where a connection goes:

* ``CONNECT host:port`` (how pip reaches an https index): a tunnel, if ``(host, port)`` is allowed;
* an absolute-form request (``GET http://host:port/path``, how pip reaches an http index through a
  proxy): forwarded as origin-form with ``Connection: close``, if ``(host, port)`` is allowed. The
  upstream connection is fixed by the first request's target, so whatever bytes follow on it can only
  reach that same server.

Anything else gets ``403`` and is recorded in :attr:`EgressProxy.refused`, so the build can fail naming
the host even when the package swallowed the error. Hosts are compared by name: the proxy resolves them
on the node, the sandbox resolves nothing. Request heads, connection counts and connect times are bounded;
the build's wall-clock limit bounds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("nimbus.compiler.egress")

HEAD_MAX = 16 << 10  # a request head; pip's are a few hundred bytes
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
MAX_CONNECTIONS = 64  # at once, per build: pip opens a handful
REFUSED_MAX = 32  # distinct refused targets remembered
CHUNK = 64 << 10
# What an index on pypi.org links its files to.
INDEX_FILE_HOSTS = {"pypi.org": ("files.pythonhosted.org",), "test.pypi.org": ("test-files.pythonhosted.org",)}
HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
               b"te", b"trailer", b"upgrade"}


def normal_host(host: str) -> str:
    """A host name as the proxy compares it: lower case, no trailing dot, IPv6 literals without brackets."""
    host = host.strip().lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def allowed_targets(urls: Iterable[str]) -> frozenset[tuple[str, int]]:
    """The ``(host, port)`` pairs a build may reach: those of the index URLs (http and https only), plus
    the file host of pypi.org. A URL's user info is never part of the result."""
    out: set[tuple[str, int]] = set()
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            continue
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            continue
        host = normal_host(parts.hostname)
        out.add((host, port))
        for files in INDEX_FILE_HOSTS.get(host, ()):
            out.add((files, 443))
    return frozenset(out)


def split_target(target: str, default_port: int) -> tuple[str, int] | None:
    """``host:port`` (or ``[v6]:port``) as a pair, ``default_port`` when none is given; None when it is not one."""
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if rest else str(default_port))
    elif target.count(":") == 1:
        host, port = target.split(":")
    elif ":" not in target:
        host, port = target, str(default_port)
    else:
        return None  # a bare IPv6 literal: ambiguous
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    return normal_host(host), int(port)


class EgressProxy:
    """An HTTP proxy on a Unix socket that connects only to ``allowed`` ``(host, port)`` pairs.

    Use as ``async with EgressProxy(path, allowed) as proxy:``; the socket exists (mode 0666, in a
    directory the caller keeps private) while the block runs. ``refused`` lists ``host:port`` of every
    connection it would not make, first come first.
    """

    def __init__(self, path: Path, allowed: Iterable[tuple[str, int]], *, max_connections: int = MAX_CONNECTIONS,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.allowed = frozenset((normal_host(host), port) for host, port in allowed)
        self.refused: list[str] = []
        self.connections = 0  # tunnels and forwards made
        self.connect_timeout_s = connect_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> EgressProxy:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=HEAD_MAX)
        os.chmod(self.path, 0o666)  # the sandbox's uid connects; the private directory keeps host users out
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # ------------------------------------------------------------------ one client connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._slots.locked():
                await _answer(writer, 503, "too many connections from one build")
                return
            async with self._slots:
                await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _answer(writer, 431, "request head too large")
            return
        except TimeoutError:
            return
        lines = head[:-4].split(b"\r\n")
        try:
            method, target, version = lines[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            await _answer(writer, 400, "not an HTTP request")
            return
        if method == "CONNECT":
            where = split_target(target, 443)
            forward = None
        elif target.startswith("http://"):
            parts = urlsplit(target)
            try:
                where = (normal_host(parts.hostname or ""), parts.port or 80)
            except ValueError:
                where = None
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            headers = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in HOP_HEADERS]
            request = f"{method} {path} {version}".encode()
            forward = b"\r\n".join([request, *headers, b"Connection: close"]) + b"\r\n\r\n"
        else:
            await _answer(writer, 405, "only CONNECT and absolute-form http requests are proxied")
            return
        if where is None or not where[0]:
            await _answer(writer, 400, f"cannot read a host and port from {target[:200]!r}")
            return
        if where not in self.allowed:
            self._refuse(*where)
            await _answer(writer, 403, f"builds may reach only the package index; {where[0]}:{where[1]} is not it")
            return
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                up_reader, up_writer = await asyncio.open_connection(*where)
        except (OSError, TimeoutError) as exc:
            await _answer(writer, 502, f"cannot connect to {where[0]}:{where[1]}: {exc.__class__.__name__}")
            return
        self.connections += 1
        try:
            if forward is None:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up_writer.write(forward)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    def _refuse(self, host: str, port: int) -> None:
        name = f"{host}:{port}"
        log.warning("egress proxy refused a build's connection to %s", name)
        if name not in self.refused and len(self.refused) < REFUSED_MAX:
            self.refused.append(name)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; ``drain`` keeps at most a buffer's worth in the node's memory."""
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _answer(writer: asyncio.StreamWriter, status: int, text: str) -> None:
    reasons = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
               502: "Bad Gateway", 503: "Service Unavailable"}
    body = f"nimbus egress proxy: {text}\n".encode()
    writer.write(f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(ConnectionError, OSError):
        await writer.drain()


__all__ = ["EgressProxy", "allowed_targets", "normal_host", "split_target"]
