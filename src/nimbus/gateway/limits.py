"""A cap on request bodies, enforced before a byte is buffered: oversized input is a 413, not memory."""

from nimbus.errors import PayloadTooLarge
from nimbus.gateway.problems import problem

# The largest legitimate body: a 50 MiB artifact in base64 (x4/3) plus the JSON around it.
DEFAULT_MAX_BODY = 70 << 20


class BodyLimit:
    """Pure ASGI middleware: refuses a declared Content-Length over the cap, and stops a stream that grows past it."""

    def __init__(self, app, max_bytes: int = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await problem(400, "Content-Length is not a number")(scope, receive, send)
                    return
                break
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"the request body is over {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)

    async def _refuse(self, scope, receive, send) -> None:
        response = problem(413, f"the request body is over {self.max_bytes} bytes", headers={"Connection": "close"})
        await response(scope, receive, send)
