"""The agent's per-call work kept small: frames read ahead from the host's channel, log checks that make no
system call when nothing was written between calls. Same answers as the general paths, fewer calls."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from nimbus import protocol
from nimbus.agent import channel
from nimbus.agent.channel import HOST_READ_AHEAD, FdStream

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def pair():
    """(the host's socket, the agent's stream over the other end, read ahead as the agent reads its channel)."""
    host, theirs = socket.socketpair()
    stream = FdStream(theirs.detach(), read_ahead=HOST_READ_AHEAD)
    yield host, stream
    host.close()
    stream.close()


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The sizes asked of every os.read the stream makes."""
    asked: list[int] = []
    real = os.read

    def counting(fd: int, size: int) -> bytes:
        asked.append(size)
        return real(fd, size)

    monkeypatch.setattr(channel.os, "read", counting)
    return asked


def test_a_warm_calls_frame_takes_one_read(pair, reads):
    host, stream = pair
    host.sendall(protocol.encode({"type": "exec", "id": 1, "invocation_id": "a"}, b'{"hello": "world"}'))
    header, blob = stream.recv_frame(protocol.HOST_TYPES)
    assert header == {"type": "exec", "id": 1, "invocation_id": "a"} and blob == b'{"hello": "world"}'
    assert len(reads) == 1


def test_frames_read_together_are_answered_apart_then_eof(pair):
    host, stream = pair
    host.sendall(protocol.encode({"type": "ping", "id": 1}) + protocol.encode({"type": "exec", "id": 2}, b"[]"))
    host.shutdown(socket.SHUT_WR)
    assert stream.recv_frame(protocol.HOST_TYPES) == ({"type": "ping", "id": 1}, b"")
    assert stream.recv_frame(protocol.HOST_TYPES) == ({"type": "exec", "id": 2}, b"[]")
    with pytest.raises(EOFError):
        stream.recv_frame(protocol.HOST_TYPES)


def test_a_frame_bigger_than_the_read_ahead_is_read_whole(pair):
    host, stream = pair
    blob = os.urandom(3 * HOST_READ_AHEAD + 5)
    writer = threading.Thread(target=host.sendall, args=(protocol.encode({"type": "init", "id": 1}, blob)
                                                         + protocol.encode({"type": "ping", "id": 2}),))
    writer.start()
    assert stream.recv_frame(protocol.HOST_TYPES) == ({"type": "init", "id": 1}, blob)
    assert stream.recv_frame(protocol.HOST_TYPES) == ({"type": "ping", "id": 2}, b"")
    writer.join()


@pytest.mark.parametrize("data, error", [
    (protocol.encode({"type": "exec", "id": 1}, b"{}")[:-1], protocol.ProtocolError),  # closed mid-blob
    (b"\0\0\0", protocol.ProtocolError),  # closed mid-prefix
    (b"\0\0\0\0\0\0\0\0", protocol.ProtocolError),  # an empty header
    (protocol.encode({"type": "result", "id": 1}), protocol.ProtocolError),  # not a host type
    (protocol.PREFIX.pack(3, 0) + b"nan", protocol.ProtocolError),
    (b"", EOFError),
])
def test_a_broken_frame_is_refused_as_the_protocol_refuses_it(pair, data, error):
    host, stream = pair
    host.sendall(data)
    host.shutdown(socket.SHUT_WR)
    with pytest.raises(error):
        stream.recv_frame(protocol.HOST_TYPES)


def test_without_read_ahead_a_stream_reads_no_more_than_asked(reads):
    """Child processes' pipes are read only as far as each frame goes."""
    read_fd, write_fd = os.pipe()
    stream = FdStream(read_fd, write_fd)
    try:
        stream.sendall(protocol.encode({"type": "pong", "id": 1}) + b"rest")
        assert protocol.recv_frame(stream, protocol.GUEST_TYPES) == ({"type": "pong", "id": 1}, b"")
        assert os.read(read_fd, 10) == b"rest"
    finally:
        stream.close()


# In a process of its own: LogCapture takes over fds 1 and 2.
LOGS_SCRIPT = textwrap.dedent("""
    import _thread, json, os, sys
    sys.path.insert(0, sys.argv[1])
    from nimbus.agent import logs as module

    capture = module.LogCapture()
    capture.start()
    print("loading")
    first = capture.collect()
    real, reads, main = os.read, [], _thread.get_ident()
    def counting(fd, size):  # the agent's own reads, not the drain thread's
        if _thread.get_ident() == main:
            reads.append(fd)
        return real(fd, size)
    module.os.read = counting
    capture.begin()
    quiet = len(reads)
    module.os.read = real
    os.write(1, b"late!")
    capture.begin()
    print("mine")
    second = capture.collect()
    module.os.read = counting
    capture.begin()
    third = capture.collect()
    quiet_call = len(reads) - quiet
    module.os.read = real

    class Counting:
        flushes = 0
        def flush(self):
            Counting.flushes += 1
    sys.stdout = sys.__stdout__ = Counting()
    module._flush_streams()
    with open(sys.argv[2], "w") as out:
        json.dump({"first": first, "quiet_reads": quiet, "second": second, "third": third, "quiet_call_reads": quiet_call,
                   "flushes": Counting.flushes}, out)
""")


def test_a_quiet_call_reads_no_log_pipe_and_late_output_is_still_dropped(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-I", "-S", "-c", LOGS_SCRIPT, str(SRC), str(out)], check=True, timeout=30,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    found = json.loads(out.read_text())
    assert found["first"] == ["loading\n", False]
    assert found["quiet_reads"] == 0
    assert found["second"] == ["[nimbus: 5 bytes written between calls were dropped]\nmine\n", False]
    assert found["third"] == ["", False] and found["quiet_call_reads"] == 0
    assert found["flushes"] == 1  # sys.stdout and sys.__stdout__ are one stream: flushed once
