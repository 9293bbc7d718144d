"""The host side of Firecracker's vsock device, as ``vsock.md`` describes host-initiated connections.

A host process connects to the device's Unix socket (``uds_path``) and writes ``CONNECT <port>\\n``;
if a guest listens on that port the device answers ``OK <host port>\\n`` (host ports are numbered from
``1 << 30``) and the connection then carries the guest's bytes; if not, the device closes the
connection without a word. These are the pieces the stand-ins share: reading the command, the
acknowledgement, and copying bytes between the host's connection and the (stand-in) guest's socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket

HOST_PORT_BASE = 1 << 30  # Firecracker numbers the host ends of its connections from here
CONNECT_LINE_MAX = 64  # "CONNECT 4294967295\n" is 19 bytes
_CONNECT = re.compile(rb"CONNECT ([0-9]{1,10})\n")


async def read_connect(reader: asyncio.StreamReader) -> bytes | None:
    """The first line the host sent (with its newline), or None when it hung up or sent no line."""
    try:
        line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    return line if len(line) <= CONNECT_LINE_MAX else None


def parse_connect(line: bytes | None) -> int | None:
    """The port of a well-formed ``CONNECT <port>\\n`` line, else None."""
    match = _CONNECT.fullmatch(line or b"")
    if match is None or int(match[1]) > 0xFFFFFFFF:
        return None
    return int(match[1])


def ok_line(host_port: int) -> bytes:
    return f"OK {host_port}\n".encode()


async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then pass the end on (half-close), as a vsock connection would."""
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()


async def bridge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, guest: socket.socket) -> None:
    """Copy both ways between the host's connection and ``guest`` until both directions ended.

    ``guest`` is owned from here on: it is closed when the bridge ends or is cancelled. The host's
    ``writer`` is left for the caller to close.
    """
    guest_reader, guest_writer = await asyncio.open_unix_connection(sock=guest)
    try:
        await asyncio.gather(pump(reader, guest_writer), pump(guest_reader, writer))
    finally:
        guest_writer.close()
        with contextlib.suppress(Exception):
            await guest_writer.wait_closed()
