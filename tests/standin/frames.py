"""The guest protocol's frames (docs/architecture.md#frame-protocol) as the tests send them: ping, init of a python3 handler, exec.

Used over whatever carries the frames: a vsock bridge of a stand-in, or a real vsock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import textwrap

from nimbus import protocol

WAIT_S = 30.0  # generous bound for an answer that should come at once; never asserted on

HANDLER = """
    import os

    def handler(event, context):
        print("handling", event["n"])
        return {"doubled": event["n"] * 2, "function": context.function_name, "pid": os.getpid()}
"""


def handler_code() -> bytes:
    return textwrap.dedent(HANDLER).encode()


def init_header(rid: int) -> dict:
    return {"type": "init", "id": rid, "runtime": "python3", "handler": "main.handler", "filename": "main.py",
            "env": {}, "memory_mb": 128, "timeout_s": 30.0, "function_name": "doubler", "function_version": "1"}


def exec_header(rid: int) -> dict:
    return {"type": "exec", "id": rid, "invocation_id": "inv-vsock", "deadline_ms": 29000}


async def exchange(reader, writer, header: dict, blob: bytes = b"") -> tuple[dict, bytes]:
    writer.write(protocol.encode(header, blob))
    await writer.drain()
    async with asyncio.timeout(WAIT_S):
        reply, reply_blob = await protocol.read_frame(reader, protocol.GUEST_TYPES)
    assert reply["id"] == header["id"]
    return reply, reply_blob


async def ping_init_exec(reader, writer, n: int = 21) -> dict:
    """ping → pong, init of the python3 handler → init_ok, exec → result; returns the handler's output."""
    reply, _ = await exchange(reader, writer, {"type": "ping", "id": 1})
    assert reply["type"] == "pong", reply
    reply, _ = await exchange(reader, writer, init_header(2), handler_code())
    assert reply["type"] == "init_ok", reply
    reply, output = await exchange(reader, writer, exec_header(3), json.dumps({"n": n}).encode())
    assert reply["type"] == "result", reply
    assert f"handling {n}" in reply["logs"]
    return json.loads(output)


@contextlib.asynccontextmanager
async def streams(sock: socket.socket):
    """Asyncio streams over a connected socket (a vsock connection), closed on the way out."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
