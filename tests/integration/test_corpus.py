"""Handlers in the style of public Lambda examples answer what Lambda answers (tests/corpus/README.md).

Every case is deployed as the folder a user would deploy, on one node per database, and each of its
invocations is compared with Lambda's answer through the small check language the README documents.
"""

import base64
import io
import json
import re
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.sandbox

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
CASES = sorted(path.name for path in CORPUS.iterdir() if not path.name.startswith("_") and (path / "case.json").is_file())
NEEDS = {"logging", "hyphen-handler", "event-loop", "sdk", "sdist", "latest-version"}
FUNCTION_KEYS = {"runtime", "handler", "env", "memory_mb", "timeout_s"}
JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "null": (type(None),),
              "object": (dict,), "array": (list,)}
PLACEHOLDER = re.compile(r"\$\{(function_name|request_id|region|account_id)\}")
DEPLOY_TIMEOUT_S = 900  # a dependency layer is resolved from the real registries inside the create call


def load_case(name: str) -> dict:
    case = json.loads((CORPUS / name / "case.json").read_text())
    assert set(case) <= {"about", "function", "needs", "invocations"}, f"{name}: unknown keys"
    assert set(case["function"]) <= FUNCTION_KEYS and {"runtime", "handler"} <= set(case["function"]), name
    assert set(case.get("needs", [])) <= NEEDS, f"{name}: unknown needs"
    assert case["invocations"], name
    for call in case["invocations"]:
        assert set(call) <= {"event", "event_file", "expect", "logs", "logs_absent"}, f"{name}: unknown keys"
        assert ("event" in call) != ("event_file" in call), f"{name}: one of event and event_file"
        assert len(call["expect"]) == 1 and set(call["expect"]) <= {"output", "error"}, f"{name}: expect"
    return case


def zipped(folder: Path) -> str:
    """The case folder as a user's zip: every file but case.json, in a fixed order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != "case.json":
                archive.write(path, path.relative_to(folder).as_posix())
    return base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------- the check language


def substitute(text: str, values: dict, pattern: bool = False) -> str:
    return PLACEHOLDER.sub(lambda m: re.escape(values[m.group(1)]) if pattern else values[m.group(1)], text)


def match(expected, actual, values: dict, where: str = "answer") -> None:
    """Assert ``actual`` matches ``expected`` under the README's rules; the message names the place."""
    if isinstance(expected, dict) and len(expected) == 1 and next(iter(expected)).startswith("$"):
        op, arg = next(iter(expected.items()))
        if op == "$regex":
            assert isinstance(actual, str), f"{where}: {actual!r} is not a string"
            assert re.fullmatch(substitute(arg, values, pattern=True), actual, re.S), f"{where}: {actual!r} !~ {arg!r}"
        elif op == "$json":
            assert isinstance(actual, str), f"{where}: {actual!r} is not a string of JSON"
            try:
                parsed = json.loads(actual)
            except ValueError:
                raise AssertionError(f"{where}: {actual!r} is not JSON") from None
            match(arg, parsed, values, f"{where}<json>")
        elif op == "$type":
            kinds = JSON_TYPES[arg]
            ok = isinstance(actual, kinds) and not (isinstance(actual, bool) and bool not in kinds)
            assert ok, f"{where}: {actual!r} is not of JSON type {arg}"
        else:
            raise ValueError(f"unknown matcher {op}")
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key, value in expected.items():
            match(value, actual[key], values, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            match(want, got, values, f"{where}[{index}]")
    elif isinstance(expected, str):
        assert actual == substitute(expected, values), f"{where}: {actual!r} != {expected!r}"
    elif isinstance(expected, bool) or expected is None:
        assert actual is expected, f"{where}: {actual!r} != {expected!r}"
    else:  # a number: ints and floats compare by value, a bool is not a number
        assert isinstance(actual, int | float) and not isinstance(actual, bool) and actual == expected, \
            f"{where}: {actual!r} != {expected!r}"


def lambda_answer(result: dict) -> dict:
    """What Lambda's Invoke would return for this call: the output, or the error payload's type and message."""
    if result["status"] == "succeeded":
        return {"output": result["output"]}
    if result["status"] == "failed":
        return {"error": {"errorType": result["error"]["type"], "errorMessage": result["error"]["message"]}}
    return {"timed_out": result["error"]}


def check_logs(call: dict, logs: str, values: dict) -> None:
    for pattern in call.get("logs", []):
        assert re.search(substitute(pattern, values, pattern=True), logs, re.M), f"no log line ~ {pattern!r} in:\n{logs}"
    for pattern in call.get("logs_absent", []):
        assert not re.search(substitute(pattern, values, pattern=True), logs, re.M), f"a log line ~ {pattern!r} in:\n{logs}"


# ---------------------------------------------------------------- the corpus on a real node


@pytest.fixture(scope="module")
def deployed(node):
    """Every case created at once (layers resolve in parallel): case name → the create answer or the failure."""

    def create(name: str):
        case = load_case(name)
        body = {"name": f"c-{name[:40]}-{uuid.uuid4().hex[:8]}", "code_base64": zipped(CORPUS / name),
                **case["function"]}
        try:
            with httpx.Client(base_url=node.url, timeout=DEPLOY_TIMEOUT_S) as api:
                resp = api.post("/api/v1/functions", json=body)
        except httpx.HTTPError as exc:  # one case's failure must not take the others with it
            return f"create failed: {exc!r}"
        return resp.json() if resp.status_code == 201 else f"create answered {resp.status_code}: {resp.text}"

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(CASES, pool.map(create, CASES), strict=True))


@pytest.mark.parametrize("case_name", CASES)
def test_case(node, deployed, case_name):
    case = load_case(case_name)
    needs = f" (this case needs: {', '.join(case['needs'])})" if case.get("needs") else ""
    fn = deployed[case_name]
    assert isinstance(fn, dict), f"{fn}{needs}"
    settings = node.settings
    with node.client() as api:
        for index, call in enumerate(case["invocations"]):
            event = call["event"] if "event" in call else json.loads((CORPUS / call["event_file"]).read_text())
            resp = api.post(f"/api/v1/functions/{fn['name']}/invoke", json=event)
            assert resp.status_code == 200, resp.text
            result = resp.json()
            values = {"function_name": fn["name"], "request_id": result["invocation_id"], "region": settings.region,
                      "account_id": settings.account_id}
            try:
                match(call["expect"], lambda_answer(result), values, f"invocation {index}")
                if "logs" in call or "logs_absent" in call:
                    record = api.get(f"/api/v1/invocations/{result['invocation_id']}").json()
                    check_logs(call, record["logs"], values)
            except AssertionError as exc:
                raise AssertionError(f"{case_name}: {exc}{needs}\nresult: {result}") from None


# ---------------------------------------------------------------- the corpus and its checks themselves


def test_the_corpus_covers_what_issue_17_lists():
    cases = {name: load_case(name) for name in CASES}
    assert len(cases) >= 25
    runtimes = {case["function"]["runtime"] for case in cases.values()}
    assert runtimes == {"python3.11", "nodejs20.x"}
    for name, case in cases.items():
        for call in case["invocations"]:
            if "event_file" in call:
                json.loads((CORPUS / call["event_file"]).read_text())
        module = case["function"]["handler"].rpartition(".")[0]
        suffixes = (".py",) if case["function"]["runtime"].startswith("python") else (".js", ".mjs", ".cjs")
        assert any((CORPUS / name / f"{module}{suffix}").is_file() for suffix in suffixes), f"{name}: no handler file"


@pytest.mark.parametrize(("expected", "actual"), [
    ({"a": 1}, {"a": 1.0}),
    ([{"$regex": "x+"}, {"$type": "integer"}], ["xxx", 3]),
    ({"$json": {"m": {"$type": "null"}}}, '{"m": null}'),
    ("arn:${region}:${function_name}", "arn:us-east-1:fn"),
    ({"$regex": r"req ${request_id}\.\d+"}, "req a.b.7"),
    ({"$type": "number"}, 2.5),
])
def test_the_check_language_matches(expected, actual):
    match(expected, actual, {"function_name": "fn", "region": "us-east-1", "request_id": "a.b", "account_id": "0"})


@pytest.mark.parametrize(("expected", "actual"), [
    ({"a": 1}, {"a": 1, "b": 2}),  # an extra key
    ({"a": "1"}, {"a": 1}),  # a string is not a number
    ({"a": 1}, {"a": True}),  # nor is a bool
    (None, False),
    ([1, 2], [1]),
    ({"$regex": "x+"}, "xxy"),  # the whole string must match
    ({"$regex": "req ${request_id}"}, "req aXb"),  # the placeholder is escaped, not a pattern
    ({"$json": {"m": 1}}, "{not json"),
    ({"$type": "integer"}, True),
    ("$LATEST", "1"),
])
def test_the_check_language_refuses(expected, actual):
    with pytest.raises(AssertionError):
        match(expected, actual, {"function_name": "fn", "region": "us-east-1", "request_id": "a.b", "account_id": "0"})
