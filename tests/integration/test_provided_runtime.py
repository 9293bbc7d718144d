"""Custom runtimes (``provided``, issue 23) end to end: a real node, real bwrap machines, real Runtime API
clients in the machine. A shell bootstrap in the style of AWS's tutorial (single file and zip), a plain
Python client that shows what the bootstrap sees (environment, headers, status codes), a Go client
built from the standard library alone, awslambdaric from PyPI through a pip layer, aws-lambda-ric from
npm where it builds, and boto3's Lambda client. Failures at init and during calls, and hostile
bootstraps, end as they do for the other runtimes.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
import zipfile

import pytest
from test_api import assert_problem, invoke, unique
from test_lambda_api import ACCOUNT, REGION, ROLE, client_for

pytestmark = pytest.mark.sandbox

MiB = 1 << 20
TRACE = re.compile(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=[01]")

# ---------------------------------------------------------------- bootstraps

# A single-file function: the code is the bootstrap itself (the agent writes it to /var/task/bootstrap).
SHELL_SINGLE = r"""#!/bin/sh
set -eu
RUNTIME="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
MACHINE=$(cat /proc/sys/kernel/random/uuid)
HEADERS=$(mktemp)
COUNT=0
while :; do
  EVENT=$(curl -sS -D "$HEADERS" "$RUNTIME/invocation/next")
  ID=$(grep -i '^lambda-runtime-aws-request-id:' "$HEADERS" | cut -d: -f2 | tr -d '[:space:]')
  COUNT=$((COUNT + 1))
  case "$EVENT" in
    *bomb*) b() { b | b & }; b; sleep 60 ;;
  esac
  echo "shell handled $ID" >&2
  curl -sS -o /dev/null -X POST "$RUNTIME/invocation/$ID/response" \
    -d "{\"event\": $EVENT, \"count\": $COUNT, \"machine\": \"$MACHINE\", \"id\": \"$ID\", \"handler\": \"$_HANDLER\"}"
done
"""

# The tutorial's shape: a bootstrap that sources the file _HANDLER names and calls its function.
SHELL_BOOTSTRAP = r"""#!/bin/sh
set -eu
# _HANDLER is "file.function": source file.sh, then call function once per event.
. "$LAMBDA_TASK_ROOT/${_HANDLER%%.*}.sh"
RUNTIME="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
HEADERS=$(mktemp)
while :; do
  EVENT=$(curl -sS -D "$HEADERS" "$RUNTIME/invocation/next")
  REQUEST_ID=$(grep -i '^lambda-runtime-aws-request-id:' "$HEADERS" | cut -d: -f2 | tr -d '[:space:]')
  if RESPONSE=$("${_HANDLER#*.}" "$EVENT"); then
    curl -sS -o /dev/null -X POST "$RUNTIME/invocation/$REQUEST_ID/response" -d "$RESPONSE"
  else
    curl -sS -o /dev/null -X POST "$RUNTIME/invocation/$REQUEST_ID/error" \
      -H "Lambda-Runtime-Function-Error-Type: Handler.Failed" \
      -d '{"errorType": "Handler.Failed", "errorMessage": "the handler exited non-zero"}'
  fi
done
"""
SHELL_FUNCTION = r"""handler() {
  echo "function.sh got: $1" >&2
  case "$1" in *fail*) return 3 ;; esac
  printf '{"echo": %s, "shell": true}' "$1"
}
"""

# A Runtime API client in plain Python (one connection per request), driven by the event's "do" and the
# MODE variable: it reports what it saw, and the status codes its posts got.
PYTHON_BOOTSTRAP = r'''#!/usr/bin/env python3
import http.client, json, os, socket, sys, time

HOST, PORT = os.environ["AWS_LAMBDA_RUNTIME_API"].rsplit(":", 1)
MACHINE = os.urandom(8).hex()
MODE = os.environ.get("MODE", "")
ENV_KEYS = ("AWS_LAMBDA_RUNTIME_API", "_HANDLER", "LAMBDA_TASK_ROOT", "AWS_LAMBDA_FUNCTION_NAME",
            "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_REGION", "PATH",
            "PYTHONPATH", "NODE_PATH", "GREETING")


def api(method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(HOST, int(PORT))
    try:
        conn.request(method, "/2018-06-01/runtime" + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except OSError as exc:
        return type(exc).__name__, {}, b""
    finally:
        conn.close()


def probe(paths, port):
    seen = {}
    for path in paths:
        try:
            os.listdir(path) if os.path.isdir(path) else open(path, "rb").read(1)
            seen[path] = "visible"
        except OSError as exc:
            seen[path] = type(exc).__name__
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        seen["node"] = "connected"
    except OSError as exc:
        seen["node"] = type(exc).__name__
    return seen


if MODE == "exit-at-start":
    print("bootstrap: cannot read /var/task/settings.ini", file=sys.stderr, flush=True)
    sys.exit(2)
if MODE == "init-error":  # as awslambdaric does: post the error, then exit
    error = {"errorMessage": "settings missing", "errorType": "Custom.InitBad", "stackTrace": ["at init"]}
    api("POST", "/init/error", json.dumps(error), {"Lambda-Runtime-Function-Error-Type": "Custom.InitBad"})
    sys.exit(1)
if MODE == "no-next":
    time.sleep(3600)

count, last = 0, []
while True:
    status, headers, body = api("GET", "/invocation/next")
    if status != 200:
        print("next answered", status, file=sys.stderr, flush=True)
        sys.exit(4)
    rid = headers["lambda-runtime-aws-request-id"]
    count += 1
    event = json.loads(body)
    do = event.get("do") if isinstance(event, dict) else None
    if do == "error":
        error = {"errorMessage": "bad order " + str(event.get("order")), "errorType": "Orders.Rejected",
                 "stackTrace": ["orders.py:12 in check", "orders.py:40 in handle"]}
        api("POST", f"/invocation/{rid}/error", json.dumps(error), {"Lambda-Runtime-Function-Error-Type": "Orders.Rejected"})
        continue
    if do == "crash":
        print("bootstrap: lost my state, exiting", file=sys.stderr, flush=True)
        sys.exit(3)
    if do == "sleep":
        time.sleep(60)
    if do == "hog":
        hoard = []
        for _ in range(1024):
            hoard.append(bytearray(1 << 20))
            hoard[-1][::4096] = b"x" * 256
    if do == "codes":
        last = [api("POST", "/invocation/not-a-request-id/response", b"{}")[0]]
        print("unknown request id answered", last[0], file=sys.stderr, flush=True)
        last.append(api("POST", f"/invocation/{rid}/response", b'"first"')[0])
        last.append(api("POST", f"/invocation/{rid}/response", b'"second"')[0])
        last.append(api("POST", f"/invocation/{rid}/error", b'{"errorType": "Late", "errorMessage": "late"}')[0])
        continue
    if do == "big":
        last = [api("POST", f"/invocation/{rid}/response", b'"' + b"x" * (6 * 1024 * 1024) + b'"')[0]]
        continue
    if do == "text":
        api("POST", f"/invocation/{rid}/response", b"plain text, not JSON")
        continue
    out = {"event": event, "count": count, "machine": MACHINE, "last": last, "cwd": os.getcwd(),
           "env": {k: os.environ.get(k) for k in ENV_KEYS}, "headers": headers}
    if do == "probe":
        out["seen"] = probe(event["paths"], event["port"])
    print("handled", rid, file=sys.stderr, flush=True)
    api("POST", f"/invocation/{rid}/response", json.dumps(out))
'''

# A Go client from the standard library alone (aws-lambda-go is not fetchable here: no module proxy).
GO_CLIENT = r"""package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

func main() {
	base := "http://" + os.Getenv("AWS_LAMBDA_RUNTIME_API") + "/2018-06-01/runtime"
	client := &http.Client{} // no timeout: next blocks until there is a call
	calls := 0
	for {
		resp, err := client.Get(base + "/invocation/next")
		if err != nil {
			fmt.Fprintln(os.Stderr, "next:", err)
			os.Exit(1)
		}
		event, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		id := resp.Header.Get("Lambda-Runtime-Aws-Request-Id")
		deadline, err := strconv.ParseInt(resp.Header.Get("Lambda-Runtime-Deadline-Ms"), 10, 64)
		if err != nil {
			fmt.Fprintln(os.Stderr, "deadline is not an integer:", err)
			os.Exit(1)
		}
		calls++
		var in map[string]any
		path, kind := "/response", ""
		var out []byte
		if json.Unmarshal(event, &in) != nil || in["fail"] != nil {
			path, kind = "/error", "Go.HandlerFailed"
			out, _ = json.Marshal(map[string]any{"errorType": kind, "errorMessage": fmt.Sprint("refused ", in["fail"])})
		} else {
			out, _ = json.Marshal(map[string]any{"lang": "go", "echo": in, "calls": calls, "id": id,
				"deadline_ms": deadline, "before_deadline": time.Now().UnixMilli() < deadline,
				"arn": resp.Header.Get("Lambda-Runtime-Invoked-Function-Arn")})
		}
		req, _ := http.NewRequest("POST", base+"/invocation/"+id+path, bytes.NewReader(out))
		if kind != "" {
			req.Header.Set("Lambda-Runtime-Function-Error-Type", kind)
		}
		posted, err := client.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, "post:", err)
			os.Exit(1)
		}
		io.Copy(io.Discard, posted.Body)
		posted.Body.Close()
		if posted.StatusCode != http.StatusAccepted {
			fmt.Fprintln(os.Stderr, "post answered", posted.StatusCode)
		}
	}
}
"""

AWSLAMBDARIC_REQUIREMENTS = "awslambdaric==4.2.2\n"
AWSLAMBDARIC_BOOTSTRAP = "#!/bin/sh\nexec python3 -m awslambdaric \"$_HANDLER\"\n"
AWSLAMBDARIC_APP = """
import os
CALLS = 0
def handler(event, context):
    global CALLS
    CALLS += 1
    if event.get("fail"):
        raise ValueError("refused: " + str(event["fail"]))
    return {"calls": CALLS, "request_id": context.aws_request_id, "function": context.function_name,
            "arn": context.invoked_function_arn, "remaining_ok": 0 < context.get_remaining_time_in_millis(),
            "event": event}
"""


# ---------------------------------------------------------------- helpers


def zipped(files: dict[str, str | bytes], executable: tuple[str, ...] = ("bootstrap",)) -> str:
    """A package whose ``executable`` entries carry mode 0755 (as `zip` keeps them from the disk)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if name in executable else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return base64.b64encode(buffer.getvalue()).decode()


def deploy(api, *, code: str | None = None, files: dict | None = None, runtime: str = "provided",
           handler: str = "function.handler", **settings) -> dict:
    body = {"name": unique("prov"), "runtime": runtime, "handler": handler, **settings}
    if code is not None:
        body["code"] = code
    else:
        body["code_base64"] = zipped(files)
    resp = api.post("/api/v1/functions", json=body, timeout=600)
    assert resp.status_code == 201, resp.text
    return resp.json()


def logs_of(api, result: dict) -> str:
    return api.get(f"/api/v1/invocations/{result['invocation_id']}").json()["logs"] or ""


def python_fn(api, **settings) -> dict:
    return deploy(api, code=PYTHON_BOOTSTRAP, **settings)


# ---------------------------------------------------------------- the shell tutorial


def test_single_file_shell_bootstrap_is_reused_hot(api):
    fn = deploy(api, code=SHELL_SINGLE, handler="bootstrap")
    assert fn["runtime"] == "provided" and fn["handler"] == "bootstrap"
    first = invoke(api, fn["name"], {"n": 1})
    assert first["status"] == "succeeded", first
    assert first["start"] in ("cold", "warm")
    out = first["output"]
    assert out["event"] == {"n": 1} and out["count"] == 1 and out["id"] == first["invocation_id"]
    assert out["handler"] == "bootstrap"
    second = invoke(api, fn["name"], {"n": 2})
    assert second["start"] == "hot" and second["output"]["count"] == 2
    assert second["output"]["machine"] == out["machine"]  # the same bootstrap process served both
    assert f"shell handled {second['invocation_id']}" in logs_of(api, second)


@pytest.mark.parametrize("runtime", ["provided.al2", "provided.al2023"])
def test_zipped_shell_bootstrap_sources_its_handler_file(api, runtime):
    fn = deploy(api, files={"bootstrap": SHELL_BOOTSTRAP, "function.sh": SHELL_FUNCTION}, runtime=runtime)
    ok = invoke(api, fn["name"], {"order": 7})
    assert ok["status"] == "succeeded", ok
    assert ok["output"] == {"echo": {"order": 7}, "shell": True}
    assert 'function.sh got: {"order":' in logs_of(api, ok)
    failed = invoke(api, fn["name"], {"fail": 1})
    assert failed["status"] == "failed" and failed["output"] is None
    assert failed["error"]["type"] == "Handler.Failed"
    assert failed["error"]["message"] == "the handler exited non-zero"
    assert invoke(api, fn["name"], {"order": 8})["start"] == "hot"  # a posted error leaves it serving


# ---------------------------------------------------------------- what a bootstrap sees


def test_environment_and_invocation_headers(api, node):
    fn = python_fn(api, handler="orders.handle", env={"GREETING": "hi"}, timeout_s=20, memory_mb=256)
    before = time.time() * 1000
    result = invoke(api, fn["name"], {"k": "v"})
    after = time.time() * 1000
    assert result["status"] == "succeeded", result
    out = result["output"]
    env = out["env"]
    assert env["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:9001"
    assert env["_HANDLER"] == "orders.handle" and env["LAMBDA_TASK_ROOT"] == "/var/task"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == fn["name"] and env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256" and env["AWS_REGION"] == REGION
    assert env["GREETING"] == "hi"
    assert env["PATH"].split(":")[0] == "/opt/nimbus/bin"
    assert env["PYTHONPATH"] is None and env["NODE_PATH"] is None  # no layer, no layer paths
    assert out["cwd"] == "/var/task"
    headers = out["headers"]
    assert headers["lambda-runtime-aws-request-id"] == result["invocation_id"]
    deadline = headers["lambda-runtime-deadline-ms"]
    assert deadline.isdigit(), deadline  # aws-lambda-go refuses anything but an integer
    # The header's value, not a speed: the call's start plus its timeout, so it lies between the wall clock
    # read before and after the call, plus the timeout (±2 ms: the agent floors two millisecond counts).
    assert before + 20_000 - 2 <= int(deadline) <= after + 20_000 + 2
    assert headers["lambda-runtime-invoked-function-arn"] == f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{fn['name']}"
    assert TRACE.fullmatch(headers["lambda-runtime-trace-id"]), headers
    assert "lambda-runtime-client-context" not in headers
    assert out["event"] == {"k": "v"} and out["count"] == 1
    assert f"handled {result['invocation_id']}" in logs_of(api, result)


def test_runtime_api_status_codes(api):
    fn = python_fn(api)
    answered = invoke(api, fn["name"], {"do": "codes"})
    assert answered["status"] == "succeeded" and answered["output"] == "first", answered
    assert "unknown request id answered 400" in logs_of(api, answered)
    report = invoke(api, fn["name"], {"do": "report"})
    assert report["start"] == "hot"
    # unknown id, the response, a second response for the same id, an error after the response
    assert report["output"]["last"] == [400, 202, 403, 403], report


def test_non_json_response_is_returned_as_a_json_string(api):
    fn = python_fn(api)
    result = invoke(api, fn["name"], {"do": "text"})
    assert result["status"] == "succeeded" and result["output"] == "plain text, not JSON", result


def test_response_over_6_mib_is_413_and_result_too_large(api):
    fn = python_fn(api, memory_mb=256)
    big = invoke(api, fn["name"], {"do": "big"})
    assert big["status"] == "failed" and big["error"]["type"] == "ResultTooLarge", big
    after = invoke(api, fn["name"], {"do": "report"})
    assert after["status"] == "succeeded", after
    assert after["output"]["last"] == [413]  # what the bootstrap's post got


# ---------------------------------------------------------------- errors


def test_posted_invocation_error_is_a_function_error(api):
    fn = python_fn(api)
    failed = invoke(api, fn["name"], {"do": "error", "order": 42})
    assert failed["status"] == "failed" and failed["output"] is None, failed
    assert failed["error"]["type"] == "Orders.Rejected"
    assert failed["error"]["message"] == "bad order 42"
    assert "orders.py:12 in check" in failed["error"]["stack"] and "orders.py:40 in handle" in failed["error"]["stack"]
    again = invoke(api, fn["name"], {})
    assert again["start"] == "hot" and again["output"]["count"] == 2


@pytest.mark.parametrize("mode, kind, words", [
    ("init-error", "Custom.InitBad", ["settings missing"]),
    ("exit-at-start", "RuntimeExit", ["cannot read /var/task/settings.ini"]),
])
def test_init_failures(api, mode, kind, words):
    fn = python_fn(api, env={"MODE": mode})
    result = invoke(api, fn["name"], {})
    assert result["status"] == "failed" and result["output"] is None, result
    assert result["error"]["type"] == kind, result
    text = result["error"]["message"] + "\n" + (result["error"].get("stack") or "")
    for word in words:
        assert word in text, result


def test_package_without_a_bootstrap_is_refused_at_create(api):
    for files in ({"function.sh": SHELL_FUNCTION, "README": "no bootstrap here\n"}, {"bootstrap/run": "#!/bin/sh\n"}):
        resp = api.post("/api/v1/functions", json={"name": unique("prov"), "runtime": "provided",
                                                   "handler": "function.handler", "code_base64": zipped(files)})
        assert_problem(resp, 422, "bootstrap")


@pytest.mark.parametrize("bootstrap", ["#!/nowhere/sh\necho never\n", b"\x7fELF\x02\x01\x01 not really"],
                         ids=["missing-interpreter", "not-an-executable"])
def test_bootstrap_that_cannot_be_started_is_an_invalid_entrypoint(api, bootstrap):
    fn = deploy(api, files={"bootstrap": bootstrap})
    result = invoke(api, fn["name"], {})
    assert result["status"] == "failed" and result["error"]["type"] == "Runtime.InvalidEntrypoint", result


def test_bootstrap_that_never_asks_for_work_is_an_init_timeout(api):
    # the init wait is max(10 s, timeout_s): this test costs those 10 s
    fn = python_fn(api, env={"MODE": "no-next"}, timeout_s=1)
    result = invoke(api, fn["name"], {})
    assert result["status"] in ("failed", "timed_out") and result["error"]["type"] == "InitTimeout", result


def test_timeout_during_a_call_then_a_fresh_machine(api):
    fn = python_fn(api, timeout_s=1)
    slow = invoke(api, fn["name"], {"do": "sleep"})
    assert slow["status"] == "timed_out" and slow["error"]["type"] == "TimeoutError", slow
    fast = invoke(api, fn["name"], {})
    assert fast["status"] == "succeeded" and fast["start"] in ("cold", "warm"), fast
    assert fast["output"]["count"] == 1


def test_exit_during_a_call_is_runtime_exit_then_a_fresh_machine(api):
    fn = python_fn(api)
    first = invoke(api, fn["name"], {})
    dead = invoke(api, fn["name"], {"do": "crash"})
    assert dead["status"] == "failed" and dead["error"]["type"] == "RuntimeExit", dead
    assert "lost my state" in logs_of(api, dead) + dead["error"]["message"] + (dead["error"].get("stack") or "")
    again = invoke(api, fn["name"], {})
    assert again["status"] == "succeeded" and again["start"] != "hot", again
    assert again["output"]["machine"] != first["output"]["machine"] and again["output"]["count"] == 1


# ---------------------------------------------------------------- other clients


def test_go_client_from_the_standard_library(api, tmp_path):
    go = shutil.which("go")
    if go is None:
        pytest.skip("go is not installed (apt-get install golang-go): the Go Runtime API client is untested")
    (tmp_path / "go.mod").write_text("module example.com/bootstrap\n\ngo 1.19\n")
    (tmp_path / "main.go").write_text(GO_CLIENT)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "GOCACHE": str(tmp_path / "cache"),
           "GOPATH": str(tmp_path / "gopath"), "CGO_ENABLED": "0", "GOOS": "linux", "GOPROXY": "off"}
    done = subprocess.run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", "bootstrap", "."], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    fn = deploy(api, files={"bootstrap": (tmp_path / "bootstrap").read_bytes()}, handler="unused", timeout_s=15)
    before = time.time() * 1000
    first = invoke(api, fn["name"], {"a": [1, 2]})
    assert first["status"] == "succeeded", first
    out = first["output"]
    assert out["lang"] == "go" and out["echo"] == {"a": [1, 2]} and out["calls"] == 1
    assert out["id"] == first["invocation_id"] and out["before_deadline"]
    assert out["deadline_ms"] >= before + 15_000 - 2  # the call's start plus its timeout (as above)
    assert out["arn"].endswith(f":function:{fn['name']}")
    second = invoke(api, fn["name"], {})
    assert second["start"] == "hot" and second["output"]["calls"] == 2
    failed = invoke(api, fn["name"], {"fail": "x"})
    assert failed["status"] == "failed" and failed["error"]["type"] == "Go.HandlerFailed", failed
    assert failed["error"]["message"] == "refused x"


def test_awslambdaric_from_a_pip_layer(api):
    files = {"bootstrap": AWSLAMBDARIC_BOOTSTRAP, "app.py": AWSLAMBDARIC_APP,
             "requirements.txt": AWSLAMBDARIC_REQUIREMENTS}
    fn = deploy(api, files=files, handler="app.handler", runtime="provided.al2023")
    first = invoke(api, fn["name"], {"hello": "ric"})
    assert first["status"] == "succeeded", first
    out = first["output"]
    assert out["event"] == {"hello": "ric"} and out["calls"] == 1 and out["remaining_ok"]
    assert out["request_id"] == first["invocation_id"] and out["function"] == fn["name"]
    second = invoke(api, fn["name"], {})
    assert second["start"] == "hot" and second["output"]["calls"] == 2
    failed = invoke(api, fn["name"], {"fail": "no stock"})
    assert failed["status"] == "failed", failed
    assert failed["error"]["type"] == "ValueError" and failed["error"]["message"] == "refused: no stock"
    assert "app.py" in failed["error"]["stack"]
    # A handler awslambdaric cannot find: it posts /runtime/init/error, then exits 1.
    broken = deploy(api, files=files, handler="app.nowhere", runtime="provided.al2023")
    result = invoke(api, broken["name"], {})
    assert result["status"] == "failed" and result["error"]["type"] == "Runtime.HandlerNotFound", result


def test_aws_lambda_ric_from_npm_where_it_builds(api):
    """aws-lambda-ric's install scripts build curl and aws-lambda-cpp from source (autoreconf, cmake) and
    then run node-gyp, which fetches Node's headers unless told where they are; the builder sandbox has
    no network. Where the layer cannot be built the create is a 422 naming the package, and this skips."""
    files = {"bootstrap": "#!/bin/sh\nexec node /opt/layer/node_modules/aws-lambda-ric/bin/index.mjs \"$_HANDLER\"\n",
             "index.mjs": "export const handler = async (event, context) => ({event, id: context.awsRequestId});\n",
             "package.json": json.dumps({"name": "ric", "version": "1.0.0", "dependencies": {"aws-lambda-ric": "3.3.0"}})}
    resp = api.post("/api/v1/functions", timeout=900, json={"name": unique("ric"), "runtime": "provided",
                                                            "handler": "index.handler", "code_base64": zipped(files)})
    if resp.status_code == 422 and "install scripts of aws-lambda-ric" in resp.text:
        reason = resp.json()["detail"].splitlines()
        pytest.skip("aws-lambda-ric cannot be built here: " + " / ".join(line for line in reason if line)[:400])
    assert resp.status_code == 201, resp.text
    result = invoke(api, resp.json()["name"], {"x": 1})
    assert result["status"] == "succeeded", result
    assert result["output"] == {"event": {"x": 1}, "id": result["invocation_id"]}


def test_boto3_lambda_client(node):
    lam = client_for(node.url)
    name = unique("prov-boto")
    made = lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE, Handler="function.handler",
                               Code={"ZipFile": base64.b64decode(zipped({"bootstrap": PYTHON_BOOTSTRAP}))},
                               Timeout=10)
    # Nimbus stores runtime ids, not aliases (python3.12 reads back as python3.11 too)
    assert made["Runtime"].startswith("provided") and made["Handler"] == "function.handler"
    lam.get_waiter("function_active_v2").wait(FunctionName=name)
    sent = {"client": {"installation_id": "inst-1", "app_title": "Shop"}, "custom": {"k": "v"}, "env": {"os": "x"}}
    answer = lam.invoke(FunctionName=name, Payload=b'{"via": "boto3"}',
                        ClientContext=base64.b64encode(json.dumps(sent).encode()).decode())
    assert answer["StatusCode"] == 200 and "FunctionError" not in answer
    out = json.loads(answer["Payload"].read())
    assert out["event"] == {"via": "boto3"}
    assert json.loads(out["headers"]["lambda-runtime-client-context"]) == sent
    assert out["headers"]["lambda-runtime-invoked-function-arn"] == f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"
    failed = lam.invoke(FunctionName=name, Payload=b'{"do": "error", "order": 5}')
    assert failed["StatusCode"] == 200 and failed["FunctionError"] == "Unhandled"
    payload = json.loads(failed["Payload"].read())
    assert payload["errorType"] == "Orders.Rejected" and payload["errorMessage"] == "bad order 5"
    assert payload["stackTrace"] == ["orders.py:12 in check", "orders.py:40 in handle"]
    lam.delete_function(FunctionName=name)


def test_runtime_names(api):
    for runtime in ("provided", "provided.al2", "provided.al2023"):
        fn = deploy(api, code=SHELL_SINGLE, runtime=runtime, handler="bootstrap")
        assert fn["runtime"] in ("provided", runtime)
    assert_problem(api.post("/api/v1/functions", json={"name": unique("prov"), "runtime": "provided.al1",
                                                       "code": SHELL_SINGLE}), 422, "runtime")


# ---------------------------------------------------------------- hostile bootstraps


def test_bootstrap_cannot_see_the_host_or_reach_the_node(api, node):
    home = str(node.settings.home.resolve())
    fn = python_fn(api)
    paths = [home, f"{home}/nimbus.db", "/etc/shadow", "/root/.cargo", "/var/lib"]
    result = invoke(api, fn["name"], {"do": "probe", "paths": paths, "port": int(node.url.rsplit(":", 1)[1])})
    assert result["status"] == "succeeded", result
    seen = result["output"]["seen"]
    assert "visible" not in seen.values() and seen["node"] != "connected", seen


def test_memory_hog_is_contained(api):
    fn = python_fn(api, memory_mb=64, timeout_s=30)
    result = invoke(api, fn["name"], {"do": "hog"})
    assert result["status"] == "failed" and result["output"] is None, result
    again = invoke(api, fn["name"], {})
    assert again["status"] == "succeeded" and again["output"]["count"] == 1, again


def test_fork_bomb_is_contained(api, node):
    enforcement = node.node.pool.driver.enforcement
    if enforcement["pids"].startswith("none"):
        pytest.skip(f"no per-machine pids limit on this host ({enforcement['pids']}): a fork bomb would reach it")
    fn = deploy(api, code=SHELL_SINGLE, handler="bootstrap", timeout_s=2)
    result = invoke(api, fn["name"], {"bomb": True})
    assert result["status"] in ("failed", "timed_out"), result
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes
    resp = api.put(f"/api/v1/functions/{fn['name']}", json={"timeout_s": 60})  # no timing threshold below
    assert resp.status_code == 200, resp.text
    again = invoke(api, fn["name"], {"n": 1})
    assert again["status"] == "succeeded" and again["output"]["count"] == 1, again
    api.delete(f"/api/v1/functions/{fn['name']}")
