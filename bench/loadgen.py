"""A thin HTTP/1.1 load generator on asyncio streams (keep-alive, Content-Length bodies).

httpx costs ~0.2 ms a call on the client side and tops out near 400 req/s at 32 connections on these
2-core machines, so with it every figure (and its floor) measured the client. This one sends a
pre-built request and reads the status line, headers and body; nothing else runs per call.
"""

import asyncio
import time
from urllib.parse import urlsplit


class HTTPClient:
    """One keep-alive connection POSTing one fixed body to one URL."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        path = parts.path or "/"
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.request = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                        f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self) -> tuple[int, bytes]:
        """(status, body) of one call."""
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                return status, await self.reader.readexactly(int(line[15:]))
        if b"chunked" not in head.lower():
            raise RuntimeError(f"neither Content-Length nor chunked: {head[:200]!r}")
        chunks = []
        while size := int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
            chunks.append(await self.reader.readexactly(size + 2))
        await self.reader.readuntil(b"\r\n")
        return status, b"".join(c[:-2] for c in chunks)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def ok(status: int, body: bytes) -> bool:
    """A 200 whose body, if it is an invocation, says it succeeded."""
    return status == 200 and (b'"status"' not in body or b'"succeeded"' in body)


def sequential(url: str, body: bytes, n: int, warmup: int | None = None,
               headers: dict[str, str] | None = None) -> list[float]:
    """Latencies (s) of ``n`` calls one after another on one connection, after a warm-up."""

    async def run():
        client = HTTPClient(url, body, headers)
        await client.connect()
        out = []
        try:
            for _ in range(max(10, n // 10) if warmup is None else warmup):
                await client.post()
            clock = time.perf_counter
            for _ in range(n):
                t = clock()
                status, reply = await client.post()
                out.append(clock() - t)
                if not ok(status, reply):
                    raise SystemExit(f"{url}: {status} {reply[:300]!r}")
        finally:
            client.close()
        return out

    return asyncio.run(run())


def concurrent(url: str, body: bytes, n: int, conc: int, starts: dict | None = None) -> tuple[float, list[float], int]:
    """(calls/s, latencies in s, errors) of ``n`` calls from ``conc`` connections at once.

    ``starts``, if given, counts the invocations' ``start`` (hot, warm, cold) from the replies.
    """

    async def run():
        clients = [HTTPClient(url, body) for _ in range(conc)]
        await asyncio.gather(*(c.connect() for c in clients))
        for c in clients:  # one call each first: connections set up, the server's first-call paths taken
            await c.post()
        latencies, errors, left = [], 0, n
        clock = time.perf_counter

        async def worker(client):
            nonlocal errors, left
            while left > 0:
                left -= 1
                t = clock()
                try:
                    status, reply = await client.post()
                    bad = not ok(status, reply)
                    if starts is not None:
                        i = reply.find(b'"start":"')
                        kind = reply[i + 9:reply.index(b'"', i + 9)].decode() if i >= 0 else "none"
                        starts[kind] = starts.get(kind, 0) + 1
                except (OSError, asyncio.IncompleteReadError, RuntimeError):
                    bad = True
                    client.close()
                    await client.connect()
                latencies.append(clock() - t)
                errors += bad

        t0 = clock()
        await asyncio.gather(*(worker(c) for c in clients))
        elapsed = clock() - t0
        for c in clients:
            c.close()
        return n / elapsed, latencies, errors

    try:
        import uvloop

        return uvloop.run(run())
    except ImportError:
        return asyncio.run(run())
