"""The HTTP API end to end: a real node, real bwrap machines, SQLite and PostgreSQL (the ``node`` fixture)."""

import base64
import concurrent.futures
import time
import uuid

import pytest

pytestmark = pytest.mark.sandbox

HELLO = """
import os
MACHINE = os.urandom(8).hex()   # one value per machine: tells hot reuse from a fresh machine
CALLS = 0

def handler(event, context):
    global CALLS
    CALLS += 1
    print("hello log line")
    return {"greeting": "hello " + event.get("name", "world"), "machine": MACHINE, "calls": CALLS,
            "function": context.function_name, "version": context.function_version,
            "request": context.aws_request_id, "memory": context.memory_limit_in_mb,
            "remaining_ok": 0 < context.get_remaining_time_in_millis() <= 30000}
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def deploy(api, code: str, *, runtime="python3", name=None, **settings) -> dict:
    name = name or unique("fn")
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": runtime, "code": code, **settings})
    assert resp.status_code == 201, resp.text
    return resp.json()


def invoke(api, name: str, event=None) -> dict:
    resp = api.post(f"/api/v1/functions/{name}/invoke", json=event if event is not None else {})
    assert resp.status_code == 200, resp.text
    return resp.json()


def assert_problem(resp, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["type"]
    for word in words:
        assert word in body["detail"], body
    return body


# ---------------------------------------------------------------- the happy path


def test_create_invoke_hot_and_logs(api):
    fn = deploy(api, HELLO)
    assert fn["version"] == 1 and fn["runtime"] == "python3" and fn["handler"] == "main.handler"
    assert fn["memory_mb"] == 128 and fn["timeout_s"] == 30 and fn["concurrency"] == 10
    first = invoke(api, fn["name"], {"name": "nimbus"})
    assert first["status"] == "succeeded", first
    assert first["start"] in ("cold", "warm")
    out = first["output"]
    assert out["greeting"] == "hello nimbus" and out["function"] == fn["name"] and out["version"] == "$LATEST"
    assert out["request"] == first["invocation_id"] and out["memory"] == "128" and out["remaining_ok"]
    second = invoke(api, fn["name"], {"name": "again"})
    assert second["start"] == "hot"
    assert second["output"]["machine"] == out["machine"] and second["output"]["calls"] == 2

    record = api.get(f"/api/v1/invocations/{first['invocation_id']}").json()
    assert record["status"] == "succeeded" and record["mode"] == "sync" and record["function"] == fn["name"]
    assert "hello log line" in record["logs"] and record["output"] == out
    listed = api.get(f"/api/v1/functions/{fn['name']}/invocations").json()["invocations"]
    assert [i["invocation_id"] for i in listed[:2]] == [second["invocation_id"], first["invocation_id"]]


def test_versioned_runtime_alias_and_one_argument_handler(api):
    fn = deploy(api, "def run(event):\n    return [event, 1]\n", runtime="python3.11", handler="app.run")
    assert fn["runtime"] == "python3" and fn["handler"] == "app.run"
    assert invoke(api, fn["name"], {"x": 1})["output"] == [{"x": 1}, 1]


def test_nodejs_function(api):
    code = "exports.handler = async (event, context) => {\n" \
           "  console.log('from node');\n" \
           "  return {sum: event.a + event.b, name: context.functionName};\n};\n"
    fn = deploy(api, code, runtime="nodejs20.x")
    assert fn["runtime"] == "nodejs" and fn["handler"] == "index.handler"
    result = invoke(api, fn["name"], {"a": 2, "b": 3})
    assert result["status"] == "succeeded" and result["output"] == {"sum": 5, "name": fn["name"]}
    logs = api.get(f"/api/v1/invocations/{result['invocation_id']}").json()["logs"]
    assert "from node" in logs


def test_env_reaches_the_function(api):
    fn = deploy(api, "import os\ndef handler(e, c):\n    return os.environ.get('GREETING')\n",
                env={"GREETING": "bonjour"})
    assert invoke(api, fn["name"])["output"] == "bonjour"


def test_update_makes_a_new_version_on_fresh_machines(api):
    fn = deploy(api, HELLO)
    old = invoke(api, fn["name"])["output"]
    resp = api.put(f"/api/v1/functions/{fn['name']}",
                   json={"code": "def handler(e, c):\n    return 'v2'\n", "timeout_s": 5})
    assert resp.status_code == 200, resp.text
    updated = resp.json()
    assert updated["version"] == 2 and updated["timeout_s"] == 5 and updated["code_sha256"] != fn["code_sha256"]
    result = invoke(api, fn["name"])
    assert result["output"] == "v2" and result["start"] in ("cold", "warm")
    assert old["machine"]  # the old machine was retired; the new version never ran there
    got = api.get(f"/api/v1/functions/{fn['id']}").json()
    assert got["version"] == 2 and got["name"] == fn["name"]


def test_settings_only_update_keeps_code(api):
    fn = deploy(api, "def handler(e, c):\n    return c.memory_limit_in_mb\n")
    resp = api.put(f"/api/v1/functions/{fn['name']}", json={"memory_mb": 256})
    assert resp.status_code == 200 and resp.json()["code_sha256"] == fn["code_sha256"]
    assert invoke(api, fn["name"])["output"] == "256"


def test_delete_retires_and_forgets(api, node):
    fn = deploy(api, HELLO)
    invoke(api, fn["name"])
    assert api.delete(f"/api/v1/functions/{fn['name']}").status_code == 204
    assert_problem(api.get(f"/api/v1/functions/{fn['name']}"), 404, fn["name"])
    assert_problem(api.post(f"/api/v1/functions/{fn['name']}/invoke", json={}), 404)
    assert_problem(api.delete(f"/api/v1/functions/{fn['name']}"), 404)


def test_list_filters_and_pages(api):
    names = sorted(unique("ls") for _ in range(3))
    for name in names:
        deploy(api, HELLO, name=name)
    node_fn = deploy(api, "exports.handler = async () => 1;", runtime="nodejs", name=unique("lsnode"))
    page = api.get("/api/v1/functions", params={"limit": 2, "offset": 0}).json()
    assert len(page["functions"]) == 2 and page["total"] >= 4 and page["limit"] == 2
    py = api.get("/api/v1/functions", params={"runtime": "python3", "limit": 1000}).json()["functions"]
    assert {f["runtime"] for f in py} == {"python3"} and set(names) <= {f["name"] for f in py}
    nodes = api.get("/api/v1/functions", params={"runtime": "node"}).json()["functions"]
    assert node_fn["name"] in {f["name"] for f in nodes}


def test_async_invocation_runs_in_the_background(api):
    fn = deploy(api, "def handler(e, c):\n    print('async ran')\n    return e['n'] * 2\n")
    resp = api.post(f"/api/v1/functions/{fn['name']}/async", json={"n": 21})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued" and resp.headers["location"] == f"/api/v1/invocations/{body['invocation_id']}"
    record = wait_for_invocation(api, body["invocation_id"])
    assert record["status"] == "succeeded" and record["output"] == 42 and record["mode"] == "async"
    assert "async ran" in record["logs"] and record["attempts"] == 1


def wait_for_invocation(api, invocation_id: str, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        record = api.get(f"/api/v1/invocations/{invocation_id}").json()
        if record["status"] not in ("queued", "running"):
            return record
        time.sleep(0.05)
    raise AssertionError(f"invocation {invocation_id} did not finish: {record}")


def test_isolation_setting_is_stored_per_revision_shown_and_published(api):
    plain = deploy(api, HELLO)
    assert plain["isolation"] == "shared"  # the default: Lambda's model
    fn = deploy(api, HELLO, isolation="per-call")
    assert fn["isolation"] == "per-call"
    assert api.get(f"/api/v1/functions/{fn['name']}").json()["isolation"] == "per-call"
    listed = api.get("/api/v1/functions", params={"limit": 1000}).json()["functions"]
    assert {f["name"]: f["isolation"] for f in listed}[fn["name"]] == "per-call"

    kept = api.put(f"/api/v1/functions/{fn['name']}", json={"memory_mb": 256})  # absent: kept
    assert kept.status_code == 200 and (kept.json()["version"], kept.json()["isolation"]) == (2, "per-call")
    published = api.post(f"/api/v1/functions/{fn['name']}/versions")
    assert published.status_code == 201 and published.json()["isolation"] == "per-call"
    changed = api.put(f"/api/v1/functions/{fn['name']}", json={"isolation": "shared"})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["version"], changed.json()["isolation"]) == (3, "shared")  # a new revision
    assert changed.json()["code_sha256"] == fn["code_sha256"]
    assert api.get(f"/api/v1/functions/{fn['name']}").json()["isolation"] == "shared"
    assert api.get(f"/api/v1/functions/{fn['name']}/versions/1").json()["isolation"] == "per-call"

    for bad in ("isolated", "per_call", "", 1, None):
        assert_problem(api.post("/api/v1/functions", json={"name": unique("iso"), "runtime": "python3",
                                                           "code": HELLO, "isolation": bad}), 422, "isolation")
    for bad in ("isolated", "Shared", 0):
        assert_problem(api.put(f"/api/v1/functions/{fn['name']}", json={"isolation": bad}), 422, "isolation")
    assert api.get(f"/api/v1/functions/{fn['name']}").json()["version"] == 3  # nothing changed
    spec = api.get("/openapi.json").json()["components"]["schemas"]
    assert spec["FunctionCreate"]["properties"]["isolation"]["enum"] == ["shared", "per-call"]
    assert "per-call" in spec["FunctionCreate"]["properties"]["isolation"]["description"]


def test_concurrency_limit_serialises_calls_on_one_machine(api):
    code = "import os, time\nM = os.urandom(4).hex()\ndef handler(e, c):\n    time.sleep(0.3)\n    return M\n"
    fn = deploy(api, code, concurrency=1)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: invoke(api, fn["name"]), range(3)))
    assert all(r["status"] == "succeeded" for r in results)
    assert len({r["output"] for r in results}) == 1  # never more than one machine at a time


# ---------------------------------------------------------------- function faults


def test_exception_is_a_failed_invocation_with_type_message_stack(api):
    fn = deploy(api, "def handler(e, c):\n    raise ValueError('bad input: ' + str(e))\n")
    result = invoke(api, fn["name"], {"k": 1})
    assert result["status"] == "failed" and result["output"] is None
    assert result["error"]["type"] == "ValueError" and "bad input" in result["error"]["message"]
    assert "handler" in result["error"]["stack"]
    assert invoke(api, fn["name"], {"k": 2})["start"] == "hot"  # a raised error leaves the machine usable


def test_timeout_kills_the_machine_and_the_next_call_works(api):
    code = "import time\ndef handler(e, c):\n    if e.get('sleep'):\n        time.sleep(30)\n    return 'ok'\n"
    fn = deploy(api, code, timeout_s=1)
    slow = invoke(api, fn["name"], {"sleep": True})
    assert slow["status"] == "timed_out" and slow["error"]["type"] == "TimeoutError"
    fast = invoke(api, fn["name"])
    assert fast["status"] == "succeeded" and fast["start"] in ("cold", "warm")


@pytest.mark.parametrize("body", ["import os; os._exit(3)", "import sys; sys.exit(4)",
                                  "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
def test_exiting_or_killing_the_agent_is_reported_and_replaced(api, body):
    code = f"def handler(e, c):\n    if e.get('die'):\n        {body}\n    return 'alive'\n"
    fn = deploy(api, code)
    dead = invoke(api, fn["name"], {"die": True})
    assert dead["status"] == "failed" and dead["error"]["type"] in ("RuntimeExit", "SystemExit")
    again = invoke(api, fn["name"])
    assert again["output"] == "alive", again


def test_init_error_fails_the_call_with_the_reason(api):
    fn = deploy(api, "raise RuntimeError('broken at import')\ndef handler(e, c):\n    return 1\n")
    result = invoke(api, fn["name"])
    assert result["status"] == "failed" and "broken at import" in result["error"]["message"]
    missing = deploy(api, "def other(e, c):\n    return 1\n")
    result = invoke(api, missing["name"])
    assert result["status"] == "failed" and "handler" in result["error"]["message"]


def test_result_too_large_and_unserialisable(api):
    fn = deploy(api, "def handler(e, c):\n    return 'x' * (7 * 1024 * 1024) if e.get('big') else object()\n")
    big = invoke(api, fn["name"], {"big": True})
    assert big["status"] == "failed" and big["error"]["type"] == "ResultTooLarge"
    odd = invoke(api, fn["name"])
    assert odd["status"] == "failed" and odd["error"]["type"] == "ResultNotSerializable"


# ---------------------------------------------------------------- isolation


def test_functions_cannot_see_each_other_or_the_host(api, node):
    writer = deploy(api, "import os\ndef handler(e, c):\n    open('/tmp/secret', 'w').write('a')\n"
                         "    return sorted(os.listdir('/tmp'))\n", env={"SECRET": "s3cret"})
    assert "secret" in invoke(api, writer["name"])["output"]
    db_path = str(node.settings.home.resolve() / "nimbus.db")
    reader = deploy(api, f"""
import os, socket
def handler(e, c):
    seen = {{}}
    for path in ['/tmp/secret', {db_path!r}, '/etc/shadow', '/root/.cargo', {str(node.settings.home.resolve())!r}]:
        try:
            os.listdir(path) if os.path.isdir(path) else open(path, 'rb').read(1)
            seen[path] = 'visible'
        except OSError as exc:
            seen[path] = type(exc).__name__
    seen['env'] = os.environ.get('SECRET')
    try:
        socket.create_connection(('127.0.0.1', {int(node.url.rsplit(':', 1)[1])}), timeout=1)
        seen['net'] = 'connected'
    except OSError as exc:
        seen['net'] = type(exc).__name__
    try:
        open('/usr/nimbus-write-test', 'w')
        seen['usr'] = 'writable'
    except OSError as exc:
        seen['usr'] = type(exc).__name__
    return seen
""")
    seen = invoke(api, reader["name"])["output"]
    assert "visible" not in seen.values(), seen
    assert seen["env"] is None and seen["net"] != "connected" and seen["usr"] != "writable"


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_precise_problems_and_the_node_keeps_serving(api):
    name = unique("bad")
    post = lambda body: api.post("/api/v1/functions", json=body)  # noqa: E731
    assert_problem(api.post("/api/v1/functions", content=b"{not json", headers={"content-type": "application/json"}),
                   400, "JSON")
    assert_problem(post({"name": "Bad_Name", "runtime": "python3", "code": "x=1"}), 422, "name")
    assert_problem(post({"name": name, "runtime": "cobol", "code": "x=1"}), 422, "cobol")
    assert_problem(post({"name": name, "runtime": "python3", "code": "x=1", "memory_mb": "lots"}), 422, "memory_mb")
    assert_problem(post({"name": name, "runtime": "python3", "code": "x=1", "timeout": 3}), 422, "timeout")
    assert_problem(post({"name": name, "runtime": "python3"}), 422, "code")
    assert_problem(post({"name": name, "runtime": "python3", "code": "def handler(:\n"}), 422, "line 1")
    assert_problem(post({"name": name, "runtime": "python3", "code": "x = 1\n" * 100_000}), 413, "limit")
    assert_problem(post({"name": name, "runtime": "python3", "code_base64": "%%%"}), 422, "base64")
    zipped = base64.b64encode(b"PK\x03\x04rest").decode()
    assert_problem(post({"name": name, "runtime": "python3", "code_base64": zipped}), 422, "zip")
    assert_problem(post({"name": name, "runtime": "python3", "code": "x=1", "env": {"PATH": "/evil"}}), 422, "PATH")
    assert_problem(post({"name": name, "runtime": "python3", "code": "x=1", "handler": "no-dots"}), 422, "handler")
    assert_problem(api.post("/api/v1/functions", json=[1, 2]), 422)

    fn = deploy(api, HELLO, name=name)
    assert_problem(post({"name": name, "runtime": "python3", "code": "x=1"}), 409, name)
    invoke_url = f"/api/v1/functions/{name}/invoke"
    assert_problem(api.post(invoke_url, content=b"{oops"), 422, "JSON")
    assert_problem(api.post(invoke_url, content=b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"'), 413, "limit")
    assert_problem(api.post("/api/v1/functions/nope-missing/invoke", json={}), 404, "nope-missing")
    assert_problem(api.get("/api/v1/invocations/does-not-exist"), 404)
    assert_problem(api.get("/api/v1/nowhere"), 404, "/api/v1/nowhere")
    assert_problem(api.patch(f"/api/v1/functions/{name}", json={}), 405)
    assert_problem(api.put(f"/api/v1/functions/{name}", json={}), 422, "nothing to change")
    assert_problem(api.put(f"/api/v1/functions/{name}", json={"runtime": "nodejs"}), 422, "needs new code")
    assert_problem(api.get("/api/v1/functions", params={"limit": 0}), 422, "limit")
    # everything accepted before is still there and the node still runs code
    assert api.get(f"/api/v1/functions/{name}").json()["id"] == fn["id"]
    assert invoke(api, name)["status"] == "succeeded"


def test_empty_event_is_an_empty_object(api):
    fn = deploy(api, "def handler(e, c):\n    return e\n")
    resp = api.post(f"/api/v1/functions/{fn['name']}/invoke")
    assert resp.status_code == 200 and resp.json()["output"] == {}


# ---------------------------------------------------------------- system


def test_health_metrics_openapi(api):
    fn = deploy(api, HELLO)
    invoke(api, fn["name"])
    health = api.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = api.get("/metrics").text
    # Every series names the node, as the registry does: one Prometheus tells a fleet's nodes apart.
    me = [n for n in api.get("/api/v1/nodes").json()["nodes"] if n["self"]]
    assert len(me) == 1 and me[0]["state"] == "up"
    node = f'node="{me[0]["id"]}"'
    series = [line for line in metrics.splitlines() if line.startswith(("nimbus_invocations_total{",
                                                                        "nimbus_queue_depth{", "nimbus_pool_machines{"))]
    assert any(f'function="{fn["name"]}"' in line and node in line for line in series), metrics
    assert series and all(node in line for line in series), metrics
    assert "nimbus_invocation_duration_seconds_bucket" in metrics
    spec = api.get("/openapi.json").json()
    assert "/api/v1/functions/{name}/invoke" in spec["paths"]
