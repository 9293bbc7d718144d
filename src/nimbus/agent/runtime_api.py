"""A small HTTP/1.1 server for the Lambda Runtime API, on the machine's own loopback.

Custom runtimes (:mod:`nimbus.agent.provided`) talk to the agent the way they talk to Lambda: HTTP on
``$AWS_LAMBDA_RUNTIME_API``. The agent is single-threaded and stdlib-only, and ``http.server`` is built
for a thread per connection and costs tens of milliseconds of imports, so this is a poll loop that
serves only what Lambda's clients send: request line, headers, a body by ``Content-Length`` or chunked,
``Expect: 100-continue`` (curl sends it for bodies over 1 MiB), keep-alive and pipelining. It runs only
while the agent asks it to (:meth:`Server.run`); between calls, requests wait in the kernel.

Everything here comes from the function's own process, so it is bounded as hostile input: the head of a
request (``HEAD_MAX``), a body (``body_max``, else 413 and the body read to the end and dropped), the
number of connections (``CONNECTIONS_MAX``). A ``GET …/next`` may be *parked*: answered later, by
:meth:`Server.answer`, when a call arrives. Nothing on a connection after a parked request is read
until it is answered, so replies keep the order of requests.
"""

import json
import select
import socket
import time

HEAD_MAX = 64 << 10  # request line and headers
CONNECTIONS_MAX = 32
DISCARD_MAX = 64 << 20  # an oversized Content-Length body is read and dropped up to this, then the socket closed
READ_CHUNK = 256 << 10
REASONS = {100: "Continue", 200: "OK", 202: "Accepted", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented"}
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR
PARK = object()  # what a handler returns to answer a request later (Server.answer)


class Request:
    """One parsed request: method, path (no query), lower-cased headers, body."""

    __slots__ = ("method", "path", "headers", "body", "conn")

    def __init__(self, method: str, path: str, headers: dict, body: bytes, conn: "Conn") -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.conn = conn


class Conn:
    """One accepted connection: what was read and not yet parsed, and whether a reply is owed."""

    __slots__ = ("sock", "fd", "buffer", "parked", "close_after", "continued", "discard", "head")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer = bytearray()
        self.parked = False  # a request of this connection waits for Server.answer
        self.close_after = False  # close once the owed reply is sent (Connection: close, HTTP/1.0, errors)
        self.continued = False  # "100 Continue" was sent for the request being read
        self.discard = 0  # bytes of an oversized body still to drop before the 413 is sent
        self.head = None  # (method, path, headers, body length or -1 for chunked) of the request being read


class BadRequest(Exception):
    """The request cannot be parsed: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_body(error_type: str, message: str) -> bytes:
    """The JSON body Lambda's Runtime API answers errors with (``errorMessage``, ``errorType``)."""
    return json.dumps({"errorMessage": message, "errorType": error_type}).encode()


def _parse_head(head: bytes) -> tuple[str, str, dict, bool]:
    """``(method, path, headers, keep_alive)`` from the bytes before the blank line; BadRequest if malformed."""
    lines = head.decode("latin-1").split("\r\n")  # latin-1 takes any byte: HTTP heads are octets
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    if target.startswith(("http://", "https://")):  # absolute form: only the path counts
        slash = target.find("/", target.find("//") + 2)
        target = target[slash:] if slash >= 0 else "/"
    path = target.split("?", 1)[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[0] in " \t":
            raise BadRequest(400, f"malformed header line {line[:100]!r}")
        key = name.lower()
        value = value.strip()
        if key in headers and key in ("content-length", "transfer-encoding"):
            raise BadRequest(400, f"{name} given twice")
        headers[key] = value
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return method, path, headers, keep_alive


def _body_length(headers: dict) -> int:
    """The body's length, -1 when chunked, 0 without a body; BadRequest for a length that is not one."""
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.lower() != "chunked":
            raise BadRequest(501, f"transfer-encoding {coding[:50]!r} is not supported (only chunked)")
        if "content-length" in headers:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding given")
        return -1
    length = headers.get("content-length")
    if length is None:
        return 0
    if not (length.isascii() and length.isdigit()) or len(length) > 18:
        raise BadRequest(400, f"Content-Length {length[:30]!r} is not a number")
    return int(length)


def _dechunk(buffer: bytearray, start: int, body_max: int) -> tuple[bytes, int] | None:
    """A whole chunked body from ``buffer[start:]``: ``(body, end)``, or None if more must be read.

    Raises ``BadRequest`` when it is malformed, and ``OverLimit`` past ``body_max``.
    """
    body = bytearray()
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            if len(buffer) - at > 1024:
                raise BadRequest(400, "a chunk size line is too long")
            return None
        size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise BadRequest(400, f"bad chunk size {size_text[:20]!r}") from None
        if size < 0:
            raise BadRequest(400, "bad chunk size")
        if len(body) + size > body_max:
            raise OverLimit()
        data_start = line_end + 2
        if size == 0:  # the last chunk, then trailers up to a blank line (ignored)
            trailer_end = buffer.find(b"\r\n", data_start)
            while trailer_end > data_start:
                data_start = trailer_end + 2
                trailer_end = buffer.find(b"\r\n", data_start)
            if trailer_end < 0:
                return None
            return bytes(body), trailer_end + 2
        if len(buffer) < data_start + size + 2:
            return None
        if buffer[data_start + size:data_start + size + 2] != b"\r\n":
            raise BadRequest(400, "a chunk does not end with CRLF")
        body += buffer[data_start:data_start + size]
        at = data_start + size + 2


class OverLimit(Exception):
    """A body is over the server's limit."""


class Server:
    """The listening socket and its connections; ``handler(request)`` answers each request.

    ``handler`` returns ``(status, body, headers)`` or :data:`PARK`. ``over_limit(request_path)`` is
    called for a body over ``body_max`` (its ``(status, body)`` is the answer), so the owner can record
    what that means (a response too large fails the call).
    """

    def __init__(self, handler, over_limit, body_max: int, host: str = "127.0.0.1", port: int = 9001) -> None:
        self.handler = handler
        self.over_limit = over_limit
        self.body_max = body_max
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # not inheritable (PEP 446)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((host, port))
        except OSError:  # the port is taken in this network namespace: any port will do, the env says which
            self.listener.bind((host, 0))
        self.listener.listen(CONNECTIONS_MAX)
        self.listener.setblocking(False)
        host, port = self.listener.getsockname()[:2]
        self.address = f"{host}:{port}"
        self.conns: dict[int, Conn] = {}
        self.poller = select.poll()
        self.poller.register(self.listener.fileno(), select.POLLIN)

    # ------------------------------------------------------------------ the loop

    def run(self, done, end_fd: int = -1, timeout_s: float | None = None) -> str:
        """Serve until ``done()`` is true ("done"), ``end_fd`` is readable ("ended") or the time is up ("timeout")."""
        if end_fd >= 0:
            self.poller.register(end_fd, select.POLLIN)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            # Requests already read but not parsed (pipelined behind one just answered) come first.
            for conn in list(self.conns.values()):
                if conn.buffer and not conn.parked:
                    self._process(conn)
            while not done():
                wait_ms = None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return "timeout"
                    wait_ms = int(left * 1000) + 1
                events = self.poller.poll(wait_ms)
                for fd, event in events:
                    if fd == end_fd:
                        continue
                    if fd == self.listener.fileno():
                        self._accept()
                    elif fd in self.conns:
                        self._readable(self.conns[fd], event)
                if done():
                    return "done"
                if end_fd >= 0 and any(fd == end_fd for fd, _ in events):
                    return "ended"
            return "done"
        finally:
            if end_fd >= 0:
                self.poller.unregister(end_fd)

    def answer(self, conn: Conn, status: int, body: bytes, headers: dict | None = None) -> None:
        """Send the reply a parked request was owed, then go on with what that connection sent after it."""
        conn.parked = False
        self._send(conn, status, body, headers)
        if conn.buffer and conn.fd in self.conns:
            self._process(conn)

    def alive(self, conn: Conn) -> bool:
        """The connection is still open (its client did not hang up while its request was parked)."""
        return self.conns.get(conn.fd) is conn

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.listener.close()

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if len(self.conns) >= CONNECTIONS_MAX:
            sock.close()  # the runtime's own doing; it sees a reset and may retry later
            return
        sock.setblocking(True)  # read only when poll says so; replies written whole
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock)
        self.conns[conn.fd] = conn
        self.poller.register(conn.fd, select.POLLIN)

    def _drop(self, conn: Conn) -> None:
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            try:
                self.poller.unregister(conn.fd)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    def _readable(self, conn: Conn, event: int) -> None:
        if not event & _READABLE:
            return
        try:
            data = conn.sock.recv(READ_CHUNK)
        except OSError:
            data = b""
        if not data:  # the runtime closed it (or reset it)
            self._drop(conn)
            return
        if conn.discard:
            used = min(conn.discard, len(data))
            conn.discard -= used
            data = data[used:]
            if conn.discard:
                return
            self._refuse_oversized(conn)
            if conn.fd not in self.conns:
                return
        conn.buffer += data
        if len(conn.buffer) > HEAD_MAX + 2 * self.body_max:
            # More than any one request may take, even chunked into tiny pieces, or piled up behind a parked
            # request: the agent's memory is the function's, so the connection goes.
            self._drop(conn)
            return
        if not conn.parked:
            self._process(conn)

    def _process(self, conn: Conn) -> None:
        """Parse and answer every whole request in the buffer, stopping at a parked one."""
        while conn.buffer and not conn.parked and conn.fd in self.conns:
            try:
                request = self._parse(conn)
            except BadRequest as exc:
                conn.close_after = True
                self._send(conn, exc.status, error_body("InvalidRequest", str(exc)))
                return
            except OverLimit:
                self._start_discard(conn)
                return
            if request is None:
                return
            reply = self.handler(request)
            if reply is PARK:
                conn.parked = True
                return
            status, body, headers = reply
            self._send(conn, status, body, headers)

    def _parse(self, conn: Conn) -> Request | None:
        """The next whole request in ``conn.buffer`` (removed from it), or None until more is read."""
        buffer = conn.buffer
        if conn.head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > HEAD_MAX:
                    raise BadRequest(431, f"the request head is over {HEAD_MAX} bytes")
                return None
            if end > HEAD_MAX:
                raise BadRequest(431, f"the request head is over {HEAD_MAX} bytes")
            method, path, headers, keep_alive = _parse_head(bytes(buffer[:end]))
            length = _body_length(headers)
            del buffer[: end + 4]
            conn.head = (method, path, headers, length)
            conn.continued = False
            if not keep_alive:
                conn.close_after = True
            if length > self.body_max:
                conn.discard = length
                raise OverLimit()
        method, path, headers, length = conn.head
        if length >= 0:
            if len(buffer) < length:
                self._continue(conn, headers)
                return None
            body = bytes(buffer[:length])
            del buffer[:length]
        else:
            found = _dechunk(buffer, 0, self.body_max)
            if found is None:
                self._continue(conn, headers)
                return None
            body, end = found
            del buffer[:end]
        conn.head = None
        return Request(method, path, headers, body, conn)

    def _continue(self, conn: Conn, headers: dict) -> None:
        """Tell a client waiting on ``Expect: 100-continue`` to send its body (once per request)."""
        if not conn.continued and headers.get("expect", "").lower() == "100-continue":
            conn.continued = True
            self._write(conn, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _start_discard(self, conn: Conn) -> None:
        """An oversized body: drop what has come of it; answer once it has all come (or now, if chunked)."""
        conn.close_after = True
        if conn.discard == 0 or conn.discard > DISCARD_MAX or \
                (conn.head is not None and conn.head[2].get("expect", "").lower() == "100-continue"):
            conn.discard = 0  # chunked, too big to wait for, or a client that waits for our word: answer now
            conn.buffer.clear()
            self._refuse_oversized(conn)
            return
        used = min(conn.discard, len(conn.buffer))
        del conn.buffer[:used]
        conn.discard -= used
        if not conn.discard:
            self._refuse_oversized(conn)

    def _refuse_oversized(self, conn: Conn) -> None:
        path = conn.head[1] if conn.head is not None else ""
        conn.head = None
        conn.buffer.clear()
        conn.close_after = True
        status, body = self.over_limit(path)
        self._send(conn, status, body)

    def _send(self, conn: Conn, status: int, body: bytes, headers: dict | None = None) -> None:
        head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", "Content-Type: application/json"]
        if headers:
            head += [f"{name}: {value}" for name, value in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        if conn.close_after:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        self._write(conn, data)
        if conn.close_after and conn.fd in self.conns:
            self._drop(conn)

    def _write(self, conn: Conn, data: bytes) -> None:
        try:
            conn.sock.sendall(data)
        except OSError:  # the runtime went away mid-reply
            self._drop(conn)
