"""schemathesis against the node's own ``/openapi.json``, over real HTTP to a real node (docs/architecture.md#http-api).

Every operation in the document is fuzzed, with valid and invalid input: no answer may be a 5xx, every
answer's status, content type, headers and body must be the ones the document states, and every error
must be ``application/problem+json`` with the fields docs/architecture.md#http-api names. The examples are bounded so the
module stays in CI's budget; the tally is printed as ``fuzz: N examples run, M 5xx``.

Generation is steered, not narrowed: path parameters are sometimes the name or id of something that
exists (a random name only ever reaches the 404 branch), and a created function's ``runtime`` is
sometimes a real one (a random string only ever reaches the "unknown runtime" 422).
"""

import os
import time
import uuid

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from nimbus.gateway import build_api

pytestmark = [pytest.mark.fuzz, pytest.mark.sandbox]

# per operation and generation mode; CI's bound. NIMBUS_FUZZ_EXAMPLES=500 for a deeper local run.
EXAMPLES_PER_OPERATION = int(os.environ.get("NIMBUS_FUZZ_EXAMPLES", "30"))
PROBLEM_FIELDS = {"type": str, "title": str, "status": int, "detail": str}
RUNTIMES = ["python3", "python3.11", "nodejs", "go", "rust", "wasm"]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]

ECHO = "def handler(event, context):\n    return event\n"
ECHO_JS = "exports.handler = async (event) => event;\n"


# The document is built at collection from the same code the node serves (schemathesis's fixture-loaded
# schemas do not work under pytest 9); ``test_the_node_serves_this_document`` holds the two equal.
DOCUMENT = build_api().openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=schemathesis.Config.from_dict({
    "generation": {"mode": "all", "max-examples": EXAMPLES_PER_OPERATION},
    "phases": {"stateful": {"enabled": False}},
}))
# What exists on the node once ``seeded`` ran: names and ids the fuzzer also draws.
SEEDED: dict[str, list[str]] = {"name": [], "invocation_id": []}


@pytest.fixture
def seeded(fuzz_node):
    """Functions and an invocation that exist, so fuzzed names and ids also reach the found branches.

    Made afresh for each operation: the fuzzer's own DELETE and PUT calls remove and rewrite them.
    """
    with fuzz_node.client() as api:
        SEEDED["name"].clear()
        for name, runtime, code in [("fz-echo", "python3", ECHO), ("fz-echo-js", "nodejs", ECHO_JS)]:
            assert api.delete(f"/api/v1/functions/{name}").status_code in (204, 404)
            resp = api.post("/api/v1/functions", json={"name": name, "runtime": runtime, "code": code})
            assert resp.status_code == 201, resp.text
            SEEDED["name"].append(name)
        resp = api.post("/api/v1/functions/fz-echo/invoke", json={"seed": True})
        assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
        SEEDED["invocation_id"].append(resp.json()["invocation_id"])
    return SEEDED


@schema.hook
def before_generate_path_parameters(context, strategy):
    keys = [p.name for p in context.operation.path_parameters if p.name in SEEDED]
    if not keys:
        return strategy
    # looked up at draw time: the strategy is built at collection, the seeded values exist once the node runs
    existing = st.fixed_dictionaries({key: st.integers(0, 63).map(lambda i, key=key: SEEDED[key][i % len(SEEDED[key])])
                                      for key in keys})
    # over the generated parameters, so the others (a version number, an alias) are still there
    return st.one_of(strategy, st.tuples(strategy, existing).map(lambda pair: {**pair[0], **pair[1]}))


@schema.hook
def before_generate_body(context, strategy):
    if context.operation.method.upper() != "POST" or context.operation.path != "/api/v1/functions":
        return strategy
    real_runtime = strategy.flatmap(
        lambda body: st.sampled_from(RUNTIMES).map(lambda rt: {**body, "runtime": rt})
        if isinstance(body, dict) else st.just(body))
    return st.one_of(real_runtime, strategy)


def test_the_node_serves_this_document(fuzz_node):
    with fuzz_node.client() as api:
        resp = api.get("/openapi.json")
    assert resp.status_code == 200 and resp.json() == DOCUMENT


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate, Phase.target],
          # `seeded` is function-scoped on purpose: made once per operation, not once per example
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
def test_api_fuzz(case, fuzz_node, seeded, session, fuzz_tally):
    response = case.call(base_url=fuzz_node.url, session=session, timeout=120)
    fuzz_tally["examples"] += 1
    fuzz_tally[f"{response.status_code // 100}xx"] += 1
    fuzz_tally[f"{case.operation.label} -> {response.status_code}"] += 1
    try:
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 400:
            assert response.headers["content-type"][0].startswith("application/problem+json"), response.headers
            body = response.json()
            for field, kind in PROBLEM_FIELDS.items():
                assert isinstance(body.get(field), kind), (field, body)
            assert body["status"] == response.status_code, body
    except BaseException:
        fuzz_tally["failures"] += 1
        raise


# ---------------------------------------------------------------- what the schema fuzzer cannot send
# schemathesis sends only valid Unicode; JSON's "\ud800" escape is valid JSON all the same, and it is how a
# lone surrogate reaches a Python string. These once answered 500.

# one surrogate between characters that are not surrogates: lone (a high one followed by a low one is a valid pair)
_bmp = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), max_size=3)
lone_surrogates = st.builds(lambda before, ch, after: before + ch + after,
                            _bmp, st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), _bmp)


def _escaped(text: str) -> str:
    return "".join(f"\\u{ord(ch):04x}" for ch in text)


def _assert_problem(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and all(isinstance(body[k], str) for k in ("type", "title", "detail"))
    return body


@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None)
@given(bad=lone_surrogates, field=st.sampled_from(["code", "handler", "runtime", "env-value", "env-name", "extra",
                                                   "name"]),
       method=st.sampled_from(["POST", "PUT"]))
def test_a_lone_surrogate_in_any_field_is_a_422(fuzz_node, bad, field, method):
    body = {"name": "fz-surrogate", "runtime": "python3", "code": "x = 1\n"}
    if method == "PUT":
        body.pop("name")
    raw = orjson.dumps(body).decode()[:-1]  # the escape is written by hand: no encoder emits a lone surrogate
    raw += {"code": ',"code":"x = \'%s\'"', "handler": ',"handler":"main.h%s"', "runtime": ',"runtime":"%s"',
            "env-value": ',"env":{"A":"%s"}', "env-name": ',"env":{"%s":"a"}', "extra": ',"%s":1',
            "name": ',"name":"f%s"'}[field] % _escaped(bad) + "}"
    with fuzz_node.client() as api:
        path = "/api/v1/functions" + ("/fz-echo" if method == "PUT" else "")
        if method == "PUT" and api.get(path).status_code == 404:
            created = api.post("/api/v1/functions", json={"name": "fz-echo", "runtime": "python3", "code": ECHO})
            assert created.status_code == 201, created.text
        resp = api.request(method, path, content=raw.encode(), headers={"content-type": "application/json"})
    _assert_problem(resp, 422)


@pytest.mark.parametrize("mode", ["invoke", "async"])
def test_a_function_error_holding_a_lone_surrogate_is_answered_and_listed(fuzz_node, mode):
    name = f"fz-sur-{uuid.uuid4().hex[:8]}"
    code = "def handler(e, c):\n    raise ValueError('bad \\ud800 message')\n"
    with fuzz_node.client() as api:
        assert api.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": code}).status_code == 201
        resp = api.post(f"/api/v1/functions/{name}/{mode}", json={})
        assert resp.status_code in (200, 202), resp.text
        result = resp.json()
        for _ in range(600):
            if result["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
            result = api.get(f"/api/v1/invocations/{result['invocation_id']}").json()
        assert result["status"] == "failed" and result["error"]["message"] == "bad \ufffd message", result
        record = api.get(f"/api/v1/invocations/{result['invocation_id']}")
        assert record.status_code == 200 and record.json()["error"] == result["error"]
        listed = api.get(f"/api/v1/functions/{name}/invocations")
        assert listed.status_code == 200 and listed.json()["invocations"][0]["error"] == result["error"]


def test_environment_values_and_names_a_process_cannot_hold_are_refused(fuzz_node):
    with fuzz_node.client() as api:
        for env in [{"A": "nul\u0000inside"}, {"A\n": "b"}]:
            resp = api.post("/api/v1/functions", json={"name": "fz-env", "runtime": "python3", "code": "x = 1\n",
                                                        "env": env})
            assert "env" in _assert_problem(resp, 422)["detail"]


def test_the_largest_offset_is_an_empty_page_and_a_larger_one_a_422(fuzz_node):
    with fuzz_node.client() as api:
        resp = api.get("/api/v1/functions", params={"offset": 2**63 - 1})
        assert resp.status_code == 200 and resp.json()["functions"] == []
        _assert_problem(api.get("/api/v1/functions", params={"offset": 2**63}), 422)
