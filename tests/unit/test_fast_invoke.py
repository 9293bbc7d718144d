"""Which requests the fast invoke path takes, and how it reads the event; the rest is covered end to end
(tests/integration/test_api.py calls invoke through it: results, 404, 413, 422, 429)."""

import asyncio

import pytest

from nimbus.errors import InvalidRequest, PayloadTooLarge
from nimbus.gateway import fast


def scope(method="POST", path="/api/v1/functions/hello/invoke", headers=()):
    return {"type": "http", "method": method, "path": path, "headers": list(headers)}


@pytest.mark.parametrize(("kwargs", "name"), [
    ({}, "hello"),
    ({"path": "/api/v1/functions/a.b-c_d/invoke"}, "a.b-c_d"),
    ({"headers": [(b"content-type", b"application/json")]}, "hello"),
    ({"method": "GET"}, None),  # the router answers 405
    ({"path": "/api/v1/functions/hello/async"}, None),
    ({"path": "/api/v1/functions//invoke"}, None),
    ({"path": "/api/v1/functions/a/b/invoke"}, None),
    ({"path": "/api/v1/functions/hello/invoke/"}, None),
    ({"headers": [(b"idempotency-key", b"k1")]}, None),  # the route validates the key and stores first
])
def test_only_plain_sync_invokes_take_the_fast_path(kwargs, name):
    assert fast.invoke_name(scope(**kwargs)) == name


def test_websocket_and_lifespan_scopes_pass_through():
    assert fast.invoke_name({"type": "lifespan"}) is None


def body(*chunks: bytes):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    return receive


def read(receive, headers=()):
    return asyncio.run(fast.read_event(scope(headers=headers), receive))


def test_the_event_is_passed_as_the_bytes_sent():
    assert read(body(b'{"a": ', b'[1, 2]}')) == b'{"a": [1, 2]}'
    assert read(body(b"")) == b"{}"
    assert read(body(b"  \n")) == b"{}"


def test_a_bad_or_oversized_event_is_refused():
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        read(body(b"{oops"))
    with pytest.raises(PayloadTooLarge, match="limit"):
        read(body(b"{}"), headers=[(b"content-length", str(fast.EVENT_MAX + 1).encode())])
    with pytest.raises(PayloadTooLarge, match="over"):
        read(body(b"[" + b"1," * (fast.EVENT_MAX // 2), b"1]"))
