"""The two ways into a sync invoke answer alike: the raw-ASGI fast path (``gateway/fast.py``) and the
FastAPI route (``gateway/functions.py``), with and without an ``Idempotency-Key``.

The fast path takes every plain ``POST /api/v1/functions/{name}/invoke``; the only request it declines
that the route serves the same way is one with an ``Idempotency-Key``. To send a plain invoke to the
route, the tests make ``fast.invoke_name`` decline it (the node runs in this process).
"""

import uuid

import pytest

from nimbus import protocol
from nimbus.gateway import fast

pytestmark = pytest.mark.sandbox

ECHO = """
def handler(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    return {"echo": event}
"""

DEEP = b"[" * (protocol.NESTING_MAX + 1) + b"]" * (protocol.NESTING_MAX + 1)
HUGE = b'"' + b"x" * (fast.EVENT_MAX + 10) + b'"'

# name → (function: "echo" or "missing", body)
CASES = {
    "success": ("echo", b'{"a": [1, 2, {"b": null}]}'),
    "empty body": ("echo", b""),
    "function error": ("echo", b'{"fail": true}'),
    "unknown function": ("missing", b"{}"),
    "unknown function, bad JSON": ("missing", b"{oops"),
    "bad JSON": ("echo", b"{oops"),
    "too deep": ("echo", DEEP),
    "oversized": ("echo", HUGE),
}


@pytest.fixture(scope="module")
def echo(node):
    name = f"parity-{uuid.uuid4().hex[:8]}"
    with node.client() as client:
        resp = client.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": ECHO})
        assert resp.status_code == 201, resp.text
        # One call first: every compared call is then served hot by the same idle machine.
        assert client.post(f"/api/v1/functions/{name}/invoke", json={}).status_code == 200
    return name


class Paths:
    """Sends one invoke by a chosen path, and checks that path was the one taken."""

    def __init__(self, api, monkeypatch) -> None:
        self.api = api
        self.monkeypatch = monkeypatch
        self.fast_taken: list[str] = []
        self.real_invoke_name = fast.invoke_name

    def _spy(self, scope):
        name = self.real_invoke_name(scope)
        if name is not None:
            self.fast_taken.append(name)
        return name

    def post(self, path: str, name: str, body: bytes, key: str | None = None):
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        self.fast_taken.clear()
        self.monkeypatch.setattr(fast, "invoke_name", (lambda scope: None) if path == "route" else self._spy)
        try:
            resp = self.api.post(f"/api/v1/functions/{name}/invoke", content=body, headers=headers)
        finally:
            self.monkeypatch.setattr(fast, "invoke_name", self.real_invoke_name)
        assert self.fast_taken == ([name] if path == "fast" and key is None else []), (path, key)
        return resp


@pytest.fixture
def paths(api, monkeypatch):
    return Paths(api, monkeypatch)


def comparable(resp) -> tuple:
    """Status, content type and body, without what differs from call to call (ids and timings)."""
    body = resp.json()
    if resp.status_code == 200:
        assert body.pop("invocation_id")
        assert body.pop("duration_ms") is not None
    return resp.status_code, resp.headers["content-type"], body


def function_name(kind: str, echo: str) -> str:
    return echo if kind == "echo" else f"missing-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("case", list(CASES))
def test_both_paths_and_an_idempotent_call_answer_alike(paths, echo, case):
    kind, body = CASES[case]
    name = function_name(kind, echo)
    answers = {
        "fast": paths.post("fast", name, body),
        "route": paths.post("route", name, body),
        "route with a key": paths.post("route", name, body, key=uuid.uuid4().hex),
    }
    seen = {path: comparable(resp) for path, resp in answers.items()}
    assert seen["fast"] == seen["route"] == seen["route with a key"], seen
    status = seen["fast"][0]
    expected = {"success": 200, "empty body": 200, "function error": 200, "unknown function": 404,
                "unknown function, bad JSON": 404, "bad JSON": 422, "too deep": 422, "oversized": 413}[case]
    assert status == expected, seen["fast"]
    if status != 200:
        assert seen["fast"][1].startswith("application/problem+json")
    else:
        assert seen["fast"][1] == "application/json"
        assert seen["fast"][2]["start"] == "hot"


@pytest.mark.parametrize("case", ["success", "function error"])
def test_a_repeated_key_answers_the_first_call_on_either_path(paths, echo, case):
    _, body = CASES[case]
    key = uuid.uuid4().hex
    first = paths.post("route", echo, body, key=key)
    again = paths.post("route", echo, body, key=key)
    plain = paths.post("fast", echo, body)
    assert first.status_code == again.status_code == 200
    assert again.json()["invocation_id"] == first.json()["invocation_id"]
    assert comparable(again) == comparable(first) == comparable(plain)
    # The same key on a request the fast path would take (no key is what it takes): still the route.
    assert paths.post("fast", echo, body, key=key).json()["invocation_id"] == first.json()["invocation_id"]
