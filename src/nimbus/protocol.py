"""The frame codec spoken between the host and the guest agent (docs/architecture.md#frame-protocol).

One frame is ``u32 header_len | u32 blob_len | header | blob``: big-endian lengths, the header a UTF-8
JSON object with ``type`` and ``id``, the blob raw bytes (code, event or output). Anything oversized or
malformed raises :class:`ProtocolError` and the caller closes the channel: neither side trusts the other.

Stdlib only, and cheap to import: the agent imports this module in every machine.
"""

import json
import re
import struct

HEADER_MAX = 1 << 20  # 1 MiB
BLOB_MAX = 64 << 20  # 64 MiB
# How deep an event's JSON may nest. The gateway refuses deeper events (orjson alone takes 1024) and the
# agent refuses them too, well before Python's json decoder runs out of stack (~1000 with its frames).
NESTING_MAX = 512
PREFIX = struct.Struct(">II")

# Message types.
INIT = "init"
INIT_OK = "init_ok"
EXEC = "exec"
RESULT = "result"
ERROR = "error"
PING = "ping"
PONG = "pong"
SNAPSHOT = "snapshot"  # after init: become the version's function template (nimbus.agent.forks)
SNAPSHOT_OK = "snapshot_ok"

HOST_TYPES = frozenset({INIT, EXEC, PING, SNAPSHOT})
# An exec header's per-call fields beside invocation_id and deadline_ms, as the agent reads them.
QUALIFIER_RE = re.compile(r"\$LATEST|[0-9]{1,10}|[A-Za-z0-9_-]{1,128}")
CLIENT_CONTEXT_MAX = 3583  # bytes of base64, Lambda's limit on X-Amz-Client-Context
GUEST_TYPES = frozenset({INIT_OK, RESULT, ERROR, PONG, SNAPSHOT_OK})


class ProtocolError(Exception):
    """A frame broke the protocol; the channel must be closed."""


class FrameTooLarge(ProtocolError):
    """A frame's prefix announced more than may come at that point; refused before a byte of it is read."""


def call_fields(qualifier: str | None = None, client_context: dict | None = None) -> dict | None:
    """The exec header fields of one call that its function sees in ``context``: the qualifier it was
    invoked with (``invoked_function_arn`` ends ``:<qualifier>``) and the caller's client context.
    None when there is neither, so an unqualified call's header stays as it was."""
    fields: dict = {}
    if qualifier is not None:
        fields["qualifier"] = qualifier
    if client_context is not None:
        fields["client_context"] = client_context
    return fields or None


def nesting_over(raw: bytes, value=None, limit: int = NESTING_MAX) -> bool:
    """True when the JSON text ``raw`` nests deeper than ``limit``.

    Fewer brackets than the limit cannot nest deeper, so most events cost two ``bytes.count`` calls;
    otherwise ``value`` (``raw`` parsed, or parsed here) is walked without recursion. JSON too deep for
    this Python's decoder counts as too deep; text that is not JSON at all is not (its reader says so).
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    if value is None:
        try:
            value = json.loads(raw)
        except RecursionError:
            return True
        except ValueError:
            return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


# ---------------------------------------------------------------- file trees (a package, in an Init blob)
#
# A package reaches the agent as a tree, not a zip: ``u32 index_len | index | contents``, the index a
# JSON list of ``[name, kind, size]`` (kind ``""`` a file, ``"x"`` an executable file, ``"d"`` a
# directory), the contents the files' bytes in index order. The host reads the zip once (with
# ``zipfile``); the agent writes files with ``os`` alone, so no machine pays zipfile's ~11 ms of
# imports, and a template does not carry them in every child's memory. Only small packages go as trees
# (``nimbus.packages.TREE_MAX``): a big one is sent as its zip (``ZIP_FILENAME``), so the host never
# holds a whole unpacked tree and no frame must carry more than the 50 MiB a zip may be.

TREE_FILENAME = "package.tree"
TREE_ENTRIES_MAX = 10_000
TREE_KINDS = ("", "x", "d")
TREE_PREFIX = struct.Struct(">I")
# A package too big to send as a tree is sent as its checked zip, which the agent unpacks itself.
ZIP_FILENAME = "package.zip"
UNPACKED_MAX = 250 << 20  # what a package may unpack to, as Lambda's unzipped deployment package


def package_path(name: str) -> str:
    """A zip entry's name as the path it unpacks to: no empty or ``.`` components, no trailing slash.

    The host's checks and the agent's unpacking both use this, so names that collide once unpacked
    (``main.py`` and ``./main.py``, ``a//b`` and ``a/b``) are caught before anything is stored.
    """
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def zip_name_error(name) -> str | None:
    """Why a zip entry's name must not be unpacked (absolute, a ``..``, a backslash or a NUL); None if it may."""
    if not isinstance(name, str) or len(name) > 4096:
        return "must be a path of at most 4096 characters"
    if name.startswith("/") or "\\" in name or "\0" in name or ".." in name.split("/"):
        return "must be relative, without '..' components, backslashes or NULs"
    return None


def _tree_name_error(name) -> str | None:
    if not isinstance(name, str) or not name or len(name) > 4096:
        return "must be a non-empty path"
    if name.startswith("/") or "\\" in name or "\0" in name:
        return "must be relative, without backslashes or NULs"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "must not have empty, '.' or '..' components"
    return None


def encode_tree(entries: list[tuple[str, str, bytes]]) -> bytes:
    """``(name, kind, content)`` entries as one tree blob; a bad name or kind is a ValueError."""
    index = []
    for name, kind, content in entries:
        why = _tree_name_error(name)
        if why is not None or kind not in TREE_KINDS:
            raise ValueError(f"tree entry {name!r} ({kind!r}): {why or 'unknown kind'}")
        index.append([name, kind, 0 if kind == "d" else len(content)])
    raw = json.dumps(index, separators=(",", ":")).encode()
    return b"".join([TREE_PREFIX.pack(len(raw)), raw, *(c for _, kind, c in entries if kind != "d")])


def decode_tree(blob) -> list[tuple[str, str, memoryview]]:
    """The entries of a tree blob, every name and size checked first; ``ProtocolError`` on anything amiss."""
    view = memoryview(blob)
    if len(view) < TREE_PREFIX.size:
        raise ProtocolError("tree: shorter than its prefix")
    (index_len,) = TREE_PREFIX.unpack_from(view)
    start = TREE_PREFIX.size + index_len
    if index_len > HEADER_MAX or start > len(view):
        raise ProtocolError(f"tree: index of {index_len} bytes does not fit")
    try:
        index = json.loads(bytes(view[TREE_PREFIX.size:start]), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"tree: index is not JSON: {exc}") from None
    if not isinstance(index, list) or len(index) > TREE_ENTRIES_MAX:
        raise ProtocolError(f"tree: index must be a list of at most {TREE_ENTRIES_MAX} entries")
    entries, offset = [], start
    for entry in index:
        if not (isinstance(entry, list) and len(entry) == 3 and entry[1] in TREE_KINDS
                and type(entry[2]) is int and entry[2] >= 0):
            raise ProtocolError(f"tree: bad entry {str(entry)[:200]}")
        name, kind, size = entry
        why = _tree_name_error(name)
        if why is not None:
            raise ProtocolError(f"tree: entry {str(name)[:200]!r} {why}")
        if kind == "d":
            size = 0
        if offset + size > len(view):
            raise ProtocolError(f"tree: entry {name!r} runs past the end")
        entries.append((name, kind, view[offset:offset + size]))
        offset += size
    if offset != len(view):
        raise ProtocolError(f"tree: {len(view) - offset} bytes after the last entry")
    return entries


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def valid_unicode(value):
    """JSON's ``\\ud800`` escapes decode to lone surrogates; each becomes U+FFFD, so every string is valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, (list, tuple)):
        return [valid_unicode(item) for item in value]
    if isinstance(value, dict):
        return {valid_unicode(key): valid_unicode(item) for key, item in value.items()}
    return value


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json reads NaN and Infinity; the protocol does not


# Made once: json.dumps and json.loads with options build a new coder on every call, which costs as much
# as coding a small header (both run once per frame on each side).
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_HEADER_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def encode(header: dict, blob: bytes = b"") -> bytes:
    """Return one frame as bytes; a header that is not a JSON object, or anything oversized, is a ProtocolError."""
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a dict, not {type(header).__name__}")
    try:
        head = _HEADER_ENCODER.encode(header).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON-serialisable: {exc}") from None
    if len(head) > HEADER_MAX:
        raise ProtocolError(f"header of {len(head)} bytes is over {HEADER_MAX}")
    if len(blob) > BLOB_MAX:
        raise ProtocolError(f"blob of {len(blob)} bytes is over {BLOB_MAX}")
    return PREFIX.pack(len(head), len(blob)) + head + blob


def parse_prefix(prefix: bytes) -> tuple[int, int]:
    """Return (header_len, blob_len) from the 8-byte prefix, refusing oversized frames."""
    if len(prefix) != PREFIX.size:
        raise ProtocolError("channel closed mid-frame")
    head_len, blob_len = PREFIX.unpack(prefix)
    if head_len == 0 or head_len > HEADER_MAX:
        raise ProtocolError(f"header length {head_len} out of range")
    if blob_len > BLOB_MAX:
        raise ProtocolError(f"blob length {blob_len} over {BLOB_MAX}")
    return head_len, blob_len


def parse_header(raw: bytes, allowed: frozenset | None = None) -> dict:
    """Decode a header; it must be a UTF-8 JSON object with a string ``type`` (one of ``allowed``).

    Strict UTF-8 (``json.loads`` on bytes would also take UTF-16 and UTF-32), no NaN or Infinity, and a
    header nested deeper than the parser's stack is refused like any other garbage.
    """
    try:
        header = _HEADER_DECODER.decode(str(raw, "utf-8"))
        if _SURROGATE_ESCAPE.search(raw):  # a function's error message, say, may carry one to the host
            header = valid_unicode(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("header must be an object with a string 'type'")
    if allowed is not None and header["type"] not in allowed:
        raise ProtocolError(f"unexpected frame type {header['type']!r}")
    return header


def _recv_exact(sock, n: int, *, frame_start: bool = False) -> bytes:
    """``n`` bytes; a close before them is EOFError only at the start of a frame, else a ProtocolError."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if frame_start and not buf:
                raise EOFError("channel closed")
            raise ProtocolError("channel closed mid-frame")
        buf += chunk
    return bytes(buf)


def recv_frame(sock, allowed: frozenset | None = None) -> tuple[dict, bytes]:
    """Read one frame from a blocking socket (the agent's side). EOFError on a clean close."""
    head_len, blob_len = parse_prefix(_recv_exact(sock, PREFIX.size, frame_start=True))
    header = parse_header(_recv_exact(sock, head_len), allowed)
    blob = _recv_exact(sock, blob_len) if blob_len else b""
    return header, blob


def send_frame(sock, header: dict, blob: bytes = b"") -> None:
    """Write one frame to a blocking socket."""
    sock.sendall(encode(header, blob))


async def read_frame(reader, allowed: frozenset | None = None, max_blob: int = BLOB_MAX,
                     budget=None) -> tuple[dict, bytes]:
    """Read one frame from an ``asyncio.StreamReader`` (the host's side). EOFError on a clean close.

    A prefix announcing a blob over ``max_blob`` (what a reply to this request may carry) is a
    :class:`FrameTooLarge` before anything else is read, so a guest cannot make the host buffer more.
    ``budget``, when given, has ``await acquire(size)`` and ``release(size)``, taken around reading the
    frame's ``size`` bytes (the node's budget of reply bytes in flight).
    """
    try:
        prefix = await reader.readexactly(PREFIX.size)
    except Exception as exc:  # IncompleteReadError, ConnectionResetError
        partial = getattr(exc, "partial", b"")
        if partial:
            raise ProtocolError("channel closed mid-frame") from None
        raise EOFError("channel closed") from None
    head_len, blob_len = parse_prefix(prefix)
    if blob_len > max_blob:
        raise FrameTooLarge(f"the frame announces a blob of {blob_len} bytes; a reply here may carry {max_blob}")
    if budget is None:
        return await _read_body(reader, head_len, blob_len, allowed)
    size = head_len + blob_len
    await budget.acquire(size)
    try:
        return await _read_body(reader, head_len, blob_len, allowed)
    finally:
        budget.release(size)


async def _read_body(reader, head_len: int, blob_len: int, allowed: frozenset | None) -> tuple[dict, bytes]:
    try:
        raw = await reader.readexactly(head_len)
        blob = await reader.readexactly(blob_len) if blob_len else b""
    except Exception:
        raise ProtocolError("channel closed mid-frame") from None
    return parse_header(raw, allowed), blob
