"""Property tests of the frame codec (docs/architecture.md#frame-protocol), through real socketpairs and asyncio streams.

Both readers are driven: the agent's blocking ``recv_frame`` and the host's ``read_frame``. Every read
runs under a time limit (a socket timeout, ``asyncio.wait_for``), so a reader that waits for bytes that
will never come fails the test with a timeout error instead of hanging the suite. The rule each test holds:
a frame comes back exactly as it was sent; anything truncated, oversized or malformed raises
``ProtocolError`` (``EOFError`` only for a channel closed cleanly between frames) and nothing else.
"""

import asyncio
import json
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nimbus import protocol
from nimbus.protocol import BLOB_MAX, HEADER_MAX, PREFIX, ProtocolError

READ_TIMEOUT_S = 10  # a bound on one read, far above what any frame here needs; reaching it means a hang

PROPS = settings(max_examples=60, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------- strategies

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=40) | \
    st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
headers = st.builds(lambda kind, ident, rest: {**rest, "type": kind, "id": ident},
                    st.text(min_size=1, max_size=20), st.integers(0, 2**32) | st.text(max_size=12),
                    st.dictionaries(st.text(max_size=12), json_values, max_size=6))
blobs = st.binary(max_size=4096) | st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 300_000), st.integers(0, 255))


def frame(header: dict, blob: bytes = b"") -> bytes:
    return protocol.encode(header, blob)


# ---------------------------------------------------------------- the two readers over a real channel


def _feed(sock: socket.socket, data: bytes, close: bool) -> threading.Thread:
    """Write ``data`` from a thread (more than a socket buffer must not block the test), then end the stream."""

    def run():
        try:
            sock.sendall(data)
        except OSError:
            pass  # the reader gave up on the frame and closed its end: fine
        if close:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    writer = threading.Thread(target=run, daemon=True)
    writer.start()
    return writer


def read_sync(data: bytes, *, frames: int = 1, close: bool = True, allowed=None) -> list:
    """Read ``frames`` frames with ``recv_frame`` from a socketpair fed ``data``; the outcome of each read."""
    ours, theirs = socket.socketpair()
    ours.settimeout(READ_TIMEOUT_S)
    writer = _feed(theirs, data, close)
    try:
        return [protocol.recv_frame(ours, allowed) for _ in range(frames)]
    finally:
        ours.close()
        writer.join(READ_TIMEOUT_S)
        theirs.close()


def read_async(data: bytes, *, frames: int = 1, close: bool = True, allowed=None) -> list:
    """The same through ``read_frame`` on an asyncio stream over a socketpair."""

    async def run():
        ours, theirs = socket.socketpair()
        reader, stream_writer = await asyncio.open_connection(sock=ours)
        writer = _feed(theirs, data, close)
        try:
            return [await asyncio.wait_for(protocol.read_frame(reader, allowed), READ_TIMEOUT_S)
                    for _ in range(frames)]
        finally:
            stream_writer.close()
            await asyncio.to_thread(writer.join, READ_TIMEOUT_S)
            theirs.close()

    return asyncio.run(run())


READERS = pytest.mark.parametrize("read", [read_sync, read_async], ids=["recv_frame", "read_frame"])

# ---------------------------------------------------------------- round trips


@READERS
@PROPS
@given(frames=st.lists(st.tuples(headers, blobs), min_size=1, max_size=4))
def test_frames_round_trip_and_a_clean_close_is_eof(read, frames):
    data = b"".join(frame(h, b) for h, b in frames)
    got = read(data, frames=len(frames))
    assert got == frames
    with pytest.raises(EOFError):  # then the channel ends on a frame boundary: a clean close
        read(data, frames=len(frames) + 1)


@READERS
@PROPS
@given(header=headers, blob=blobs)
def test_a_frame_is_read_without_waiting_for_more(read, header, blob):
    # the writer keeps its end open: a reader that asked for one byte more than the frame would hang
    assert read(frame(header, blob), close=False) == [(header, blob)]


@PROPS
@given(header=headers, blob=st.binary(max_size=64))
def test_the_prefix_states_the_sizes(header, blob):
    data = frame(header, blob)
    head_len, blob_len = PREFIX.unpack(data[:PREFIX.size])
    assert (head_len, blob_len) == (len(data) - PREFIX.size - len(blob), len(blob))
    assert protocol.parse_header(data[PREFIX.size:PREFIX.size + head_len]) == header


def test_a_header_and_a_blob_at_their_limits_round_trip():
    pad = HEADER_MAX - len(frame({"type": "exec", "id": 1, "pad": ""})) + PREFIX.size
    header = {"type": "exec", "id": 1, "pad": "x" * pad}
    blob = bytes(BLOB_MAX)
    data = frame(header, blob)
    assert PREFIX.unpack(data[:PREFIX.size]) == (HEADER_MAX, BLOB_MAX)
    for read in (read_sync, read_async):
        assert read(data) == [(header, blob)]

# ---------------------------------------------------------------- truncated


@READERS
@PROPS
@given(header=headers, blob=blobs, data=st.data())
def test_a_truncated_frame_is_a_protocol_error(read, header, blob, data):
    whole = frame(header, blob)
    cut = data.draw(st.integers(1, len(whole) - 1), label="bytes sent")
    with pytest.raises(ProtocolError):
        read(whole[:cut])


@READERS
def test_nothing_at_all_is_eof(read):
    with pytest.raises(EOFError):
        read(b"")

# ---------------------------------------------------------------- oversized


@READERS
@PROPS
@given(head_len=st.integers(HEADER_MAX + 1, 2**32 - 1) | st.just(0), blob_len=st.integers(0, 2**32 - 1))
def test_an_oversized_or_empty_header_is_refused_from_the_prefix_alone(read, head_len, blob_len):
    # only the prefix is sent and the channel stays open: the refusal cannot wait for the bytes it declares
    with pytest.raises(ProtocolError):
        read(PREFIX.pack(head_len, blob_len), close=False)


@READERS
@PROPS
@given(head_len=st.integers(1, HEADER_MAX), blob_len=st.integers(BLOB_MAX + 1, 2**32 - 1))
def test_an_oversized_blob_is_refused_from_the_prefix_alone(read, head_len, blob_len):
    with pytest.raises(ProtocolError):
        read(PREFIX.pack(head_len, blob_len), close=False)


def test_encode_refuses_what_the_reader_would_refuse():
    with pytest.raises(ProtocolError):
        protocol.encode({"type": "exec", "pad": "x" * HEADER_MAX})
    with pytest.raises(ProtocolError):
        protocol.encode({"type": "exec"}, bytes(BLOB_MAX + 1))


@PROPS
@given(value=st.sampled_from([float("nan"), float("inf"), float("-inf"), object(), b"bytes", {1, 2}]),
       where=st.sampled_from(["top", "nested"]))
def test_encode_refuses_a_header_that_is_not_json(value, where):
    header = {"type": "result", "x": value} if where == "top" else {"type": "result", "x": [{"y": value}]}
    with pytest.raises(ProtocolError):
        protocol.encode(header)


@PROPS
@given(header=st.lists(st.integers()) | st.text() | st.none() | st.integers())
def test_encode_refuses_a_header_that_is_not_an_object(header):
    with pytest.raises(ProtocolError):
        protocol.encode(header)

# ---------------------------------------------------------------- garbage


def _outcome(read, data: bytes, **kwargs):
    try:
        return read(data, **kwargs)
    except (ProtocolError, EOFError) as exc:
        return type(exc)


@READERS
@PROPS
@given(data=st.binary(max_size=2048))
def test_any_bytes_are_a_frame_or_the_codecs_error(read, data):
    outcome = _outcome(read, data)
    if outcome not in (ProtocolError, EOFError):  # by chance a well-formed frame: exactly what its bytes say
        [(header, blob)] = outcome
        head_len, blob_len = PREFIX.unpack(data[:PREFIX.size])
        assert header == json.loads(data[PREFIX.size:PREFIX.size + head_len]) and isinstance(header["type"], str)
        assert blob == data[PREFIX.size + head_len:PREFIX.size + head_len + blob_len] and len(blob) == blob_len


def _framed(raw_header: bytes, blob: bytes = b"") -> bytes:
    return struct.pack(">II", len(raw_header), len(blob)) + raw_header + blob


@READERS
@PROPS
@given(raw=st.binary(min_size=1, max_size=512), blob=st.binary(max_size=64))
def test_a_garbage_header_is_a_protocol_error_or_an_object_with_a_type(read, raw, blob):
    outcome = _outcome(read, _framed(raw, blob))
    if outcome is not ProtocolError:
        [(header, got)] = outcome
        assert isinstance(header, dict) and isinstance(header["type"], str) and got == blob


@READERS
@PROPS
@given(value=json_values.filter(lambda v: not (isinstance(v, dict) and isinstance(v.get("type"), str))))
def test_json_that_is_not_an_object_with_a_string_type_is_refused(read, value):
    with pytest.raises(ProtocolError):
        read(_framed(json.dumps(value).encode()))


@READERS
@PROPS
@given(depth=st.integers(1_000, HEADER_MAX // 2), opener=st.sampled_from([b"[", b'{"a":']))
def test_a_deeply_nested_header_is_a_protocol_error(read, depth, opener):
    raw = (b'{"type":"x","n":' + opener * depth)[:HEADER_MAX]
    with pytest.raises(ProtocolError):
        read(_framed(raw))


@READERS
@PROPS
@given(header=headers, encoding=st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig"]))
def test_a_header_in_another_encoding_is_refused(read, header, encoding):
    raw = json.dumps(header, ensure_ascii=False).encode(encoding)
    with pytest.raises(ProtocolError):
        read(_framed(raw))


@READERS
@PROPS
@given(header=headers, constant=st.sampled_from(["NaN", "Infinity", "-Infinity"]))
def test_nan_and_infinity_are_not_json(read, header, constant):
    raw = json.dumps(header)[:-1] + f',"x":{constant}}}'
    with pytest.raises(ProtocolError):
        read(_framed(raw.encode()))


@READERS
@PROPS
@given(header=headers, allowed=st.frozensets(st.text(min_size=1, max_size=20), max_size=4))
def test_a_type_not_allowed_is_refused(read, header, allowed):
    data = frame(header)
    if header["type"] in allowed:
        assert read(data, allowed=allowed) == [(header, b"")]
    else:
        with pytest.raises(ProtocolError):
            read(data, allowed=allowed)


_bmp = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=4)


@READERS
@PROPS
@given(header=headers, before=_bmp, surrogate=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), after=_bmp)
def test_a_lone_surrogate_in_a_header_arrives_as_a_replacement_character(read, header, before, surrogate, after):
    # json.dumps writes it as a "\ud800" escape (valid JSON); the host must not get a string it cannot store
    bad, good = before + surrogate + after, before + "\ufffd" + after
    sent = {**header, "message": bad, "nested": [{"k" + bad: bad}]}
    [(got, _)] = read(frame(sent))
    assert got == {**header, "message": good, "nested": [{"k" + good: good}]}
    json.dumps(got, ensure_ascii=False).encode()  # every string is valid Unicode


# ---------------------------------------------------------------- file trees

_SEGMENT = st.text(alphabet=st.characters(blacklist_characters="/\\\0", blacklist_categories=("Cs",)),
                   min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@given(st.lists(st.tuples(st.lists(_SEGMENT, min_size=1, max_size=3).map("/".join), st.sampled_from(["", "x", "d"]),
                          st.binary(max_size=64)), max_size=8))
def test_a_tree_decodes_to_what_was_encoded(entries):
    blob = protocol.encode_tree(entries)
    decoded = [(name, kind, bytes(content)) for name, kind, content in protocol.decode_tree(blob)]
    assert decoded == [(name, kind, b"" if kind == "d" else content) for name, kind, content in entries]


@given(st.binary(max_size=64))
def test_a_tree_blob_of_any_bytes_decodes_or_is_a_protocol_error(blob):
    try:
        protocol.decode_tree(blob)
    except protocol.ProtocolError:
        pass


def test_bytes_after_the_last_entry_are_refused():
    blob = protocol.encode_tree([("a.py", "", b"x")]) + b"extra"
    with pytest.raises(protocol.ProtocolError, match="after the last entry"):
        protocol.decode_tree(blob)


_ZIP_NAMES = st.lists(st.lists(st.sampled_from(["a", "b", "A", ".", ""]), min_size=1, max_size=3).map("/".join).filter(bool),
                      min_size=1, max_size=5)


@settings(max_examples=300, deadline=None, database=None)
@given(_ZIP_NAMES)
def test_a_package_is_refused_exactly_when_its_names_collide_once_unpacked(names):
    """``packages.check`` against a model: two files on one path, or a file where a directory must be."""
    import io
    import warnings
    import zipfile

    from nimbus import packages
    from nimbus.errors import InvalidRequest

    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of a name it writes twice: the point here
        archive.writestr("main.py", "def handler(event, context):\n    return 1\n")
        for name in names:
            archive.writestr(name, b"" if name.endswith("/") else b"x")
    files, dirs = ["main.py"], []
    for name in names:
        path = protocol.package_path(name)
        parts = path.split("/") if path else []
        dirs += ["/".join(parts[:end]) for end in range(1, len(parts))]
        if path:
            (dirs if name.endswith("/") else files).append(path)
    collide = len(set(files)) < len(files) or bool(set(files) & set(dirs))
    absolute = any(name.startswith("/") for name in names)
    try:
        packages.check(buffer.getvalue(), "python3", "main.handler")
    except InvalidRequest as exc:
        assert absolute or collide, exc
        assert absolute or "duplicate" in str(exc)
    else:
        assert not (absolute or collide), names
        tree = protocol.decode_tree(packages.to_tree(buffer.getvalue()))
        assert len({name for name, kind, _ in tree if kind != "d"}) == len(files)
