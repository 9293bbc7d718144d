"""The guest agent's ``provided`` runtime outside a sandbox: a bootstrap speaking Lambda's Runtime API.

The agent runs as a machine driver runs it (``test_agent.AgentProcess``); each bootstrap here is a real
executable it spawns, talking HTTP to the agent's server on loopback. Outside a machine's own network
namespace port 9001 may be taken, so these also cover the fallback to any port.
"""

import json
import os
import shutil
import stat
import zipfile
from io import BytesIO

import pytest
from test_agent import AgentProcess, agent, assert_error  # noqa: F401 - agent is a fixture

from nimbus import packages, protocol

# A Runtime API client with the standard library only, as a custom runtime would write one: one
# keep-alive connection, the event's "action" says what to do. It prints the status of each post.
PY_BOOTSTRAP = r'''#!/usr/bin/env python3
import http.client, json, os, socket, sys

sys.stdout.reconfigure(line_buffering=True)
API = os.environ["AWS_LAMBDA_RUNTIME_API"]
BASE = "/2018-06-01/runtime"
conn = http.client.HTTPConnection(API)
count = 0
posted = []  # what each post answered, reported in the next plain response (output after a post is the
# next call's, and the agent drops what comes between calls)


def call(method, path, body=None, headers=None):
    conn.request(method, BASE + path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def raw(data, read_all=True):
    host, port = API.split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
            if not read_all and b"\r\n\r\n" in out:
                break
    return out.decode("latin-1")


def status_of(text):
    return int(text.split(" ", 2)[1])


if os.environ.get("INIT_ERROR"):
    print("init went wrong", file=sys.stderr)
    status, _, _ = call("POST", "/init/error", json.dumps({"errorMessage": "no config", "errorType": "ConfigMissing",
                                                          "stackTrace": ["at start"]}),
                        {"Lambda-Runtime-Function-Error-Type": "ConfigMissing"})
    print("init error status", status, file=sys.stderr)
    sys.exit(1)
if os.environ.get("EXIT_AT_START"):
    print("cannot start: missing DATABASE_URL", file=sys.stderr)
    sys.exit(4)

while True:
    status, headers, body = call("GET", "/invocation/next")
    assert status == 200, status
    rid = headers["Lambda-Runtime-Aws-Request-Id"]
    event = json.loads(body)
    count += 1
    action = event.get("action") if isinstance(event, dict) else None
    print("handling", rid, action)
    if action == "error":
        status, _, reply = call("POST", f"/invocation/{rid}/error",
                                json.dumps({"errorMessage": "card refused", "errorType": "PaymentDeclined",
                                            "stackTrace": ["  File app.py, line 3", "  in charge"]}),
                                {"Lambda-Runtime-Function-Error-Type": "Unhandled"})
        posted.append(f"error status {status} {reply.decode()}")
        continue
    if action == "exit":
        sys.exit(3)
    if action == "big":
        status, _, reply = call("POST", f"/invocation/{rid}/response", b"x" * (6 * 1024 * 1024 + 10))
        posted.append(f"big status {status} {json.loads(reply)['errorType']}")
        continue
    if action == "text":
        call("POST", f"/invocation/{rid}/response", b"Echoing request: 'hi'")
        continue
    if action == "probe":
        seen = {}
        seen["unknown_id"] = call("POST", "/invocation/not-this-one/response", b"{}")[0]
        seen["unknown_path"] = call("GET", "/invocation/what")[0]
        seen["wrong_method"] = call("POST", "/invocation/next", b"")[0]
        seen["init_error_late"] = call("POST", "/init/error", b"{}")[0]
        seen["malformed"] = status_of(raw(b"NOT HTTP\r\n\r\n"))
        seen["bad_length"] = status_of(raw(b"POST /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n"))
        seen["head_too_big"] = status_of(raw(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"))
        # A chunked body with Expect: 100-continue, as curl sends big bodies: 100 first, then 202.
        text = raw(f"POST {BASE}/invocation/{rid}/response HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                   "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode(), read_all=False)
        seen["continue"] = status_of(text)
        host, port = API.split(":")
        body = json.dumps({"seen": seen, "count": count}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"POST {BASE}/invocation/{rid}/response HTTP/1.1\r\nHost: x\r\n"
                         "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode())
            for i in range(0, len(body), 7):
                piece = body[i:i + 7]
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"0\r\n\r\n")
            answer = sock.recv(65536).decode("latin-1")
        again = call("POST", f"/invocation/{rid}/response", b"{}")[0]
        posted.append(f"chunked {status_of(answer)} again {again}")
        continue
    result = {"count": count, "pid": os.getpid(), "event": event, "request_id": rid,
              "headers": {k: v for k, v in headers.items() if k.startswith("Lambda-Runtime")},
              "env": {k: os.environ.get(k) for k in ("_HANDLER", "LAMBDA_TASK_ROOT", "AWS_LAMBDA_FUNCTION_NAME",
                                                     "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                                                     "AWS_REGION", "AWS_LAMBDA_LOG_GROUP_NAME",
                                                     "AWS_LAMBDA_LOG_STREAM_NAME", "DRIVER_SECRET", "PYTHONPATH",
                                                     "NODE_PATH")},
              "cwd": os.getcwd(), "posted": list(posted)}
    posted.clear()
    status, _, reply = call("POST", f"/invocation/{rid}/response", json.dumps(result))
    posted.append(f"response status {status} {reply.decode()}")
'''

SH_BOOTSTRAP = r'''#!/bin/sh
set -eu
. "$LAMBDA_TASK_ROOT/$(echo "$_HANDLER" | cut -d. -f1).sh"
HEADERS="$(mktemp)"
while true; do
  EVENT=$(curl -sS -LD "$HEADERS" "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  RESPONSE=$($(echo "$_HANDLER" | cut -d. -f2) "$EVENT")
  curl -sS -X POST "http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime/invocation/$REQUEST_ID/response" \
    -d "$RESPONSE" >/dev/null
done
'''

SH_FUNCTION = r'''handler () {
  echo "{\"greeting\": \"hello from sh\", \"event\": $1}"
}
'''


def zip_of(files: dict) -> bytes:
    out = BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, (text, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            archive.writestr(info, text)
    return out.getvalue()


def start(agent: AgentProcess, bootstrap: str = PY_BOOTSTRAP, env: dict | None = None, **fields) -> dict:
    return agent.init(bootstrap, runtime="provided", handler=fields.pop("handler", "function.handler"),
                      filename="bootstrap", env=env or {}, **fields)


def test_a_bootstrap_serves_calls_hot_with_lambdas_headers_and_environment(agent):
    assert start(agent)["type"] == "init_ok"
    first = agent.invoke({"n": 1}, invocation_id="0b5c3a1e-req-1", qualifier="live",
                         client_context={"custom": {"tenant": "acme"}})
    assert first["event"] == {"n": 1}
    assert first["request_id"] == "0b5c3a1e-req-1"
    headers = first["headers"]
    assert headers["Lambda-Runtime-Aws-Request-Id"] == "0b5c3a1e-req-1"
    assert headers["Lambda-Runtime-Deadline-Ms"].isdigit()
    assert headers["Lambda-Runtime-Invoked-Function-Arn"] == "arn:aws:lambda:us-east-1:000000000000:function:hello:live"
    assert headers["Lambda-Runtime-Trace-Id"].startswith("Root=1-")
    assert json.loads(headers["Lambda-Runtime-Client-Context"]) == {"custom": {"tenant": "acme"}}
    env = first["env"]
    assert env["_HANDLER"] == "function.handler"
    assert env["LAMBDA_TASK_ROOT"] == str(agent.task_dir) == first["cwd"]
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "hello" and env["AWS_LAMBDA_FUNCTION_VERSION"] == "3"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256" and env["AWS_REGION"] == "us-east-1"
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == "/aws/lambda/hello"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"].endswith(tuple("0123456789abcdef"))
    assert env["DRIVER_SECRET"] is None and env["PYTHONPATH"] is None
    second = agent.invoke([1, 2], invocation_id="req-2")
    assert (second["count"], second["pid"], second["event"]) == (2, first["pid"], [1, 2])
    assert "Lambda-Runtime-Client-Context" not in second["headers"]
    third = agent.invoke({}, invocation_id="req-3")
    assert third["posted"] == ['response status 202 {"status":"OK"}']


def test_a_posted_error_is_the_calls_error_and_the_bootstrap_goes_on(agent):
    start(agent)
    reply, _ = agent.exec({"action": "error"}, invocation_id="req-e")
    error = assert_error(reply, "PaymentDeclined")
    assert error["message"] == "card refused"
    assert error["stack"] == "  File app.py, line 3\n  in charge"
    after = agent.invoke({}, invocation_id="req-after")
    assert (after["count"], after["posted"]) == (2, ['error status 202 {"status":"OK"}'])


def test_status_codes_and_malformed_requests_as_lambdas_clients_expect(agent):
    start(agent)
    reply, output = agent.exec({"action": "probe"}, invocation_id="req-p")
    assert reply["type"] == "result", reply
    seen = json.loads(output)["seen"]
    assert seen == {"unknown_id": 400, "unknown_path": 404, "wrong_method": 405, "init_error_late": 403,
                    "malformed": 400, "bad_length": 400, "head_too_big": 431, "continue": 100}
    assert agent.invoke({}, invocation_id="req-next")["posted"] == ["chunked 202 again 403"]


def test_a_response_over_6_mib_is_refused_with_413_and_fails_the_call_only(agent):
    start(agent)
    reply, _ = agent.exec({"action": "big"}, invocation_id="req-big")
    assert_error(reply, "ResultTooLarge")
    assert agent.invoke({}, invocation_id="req-small")["posted"] == ["big status 413 RequestEntityTooLarge"]


def test_text_that_is_not_json_comes_back_as_a_json_string(agent):
    start(agent)
    reply, output = agent.exec({"action": "text"}, invocation_id="req-t")
    assert reply["type"] == "result"
    assert json.loads(output) == "Echoing request: 'hi'"


def test_a_bootstrap_that_exits_during_a_call_ends_the_machine(agent):
    start(agent)
    reply, _ = agent.exec({"action": "exit"}, invocation_id="req-x")
    error = assert_error(reply, "RuntimeExit", fatal=True)
    assert "exited with code 3" in error["message"]
    reply, _ = agent.exec({}, invocation_id="req-y")
    assert_error(reply, "RuntimeExit", fatal=True)


def test_init_error_posted_fails_the_init_with_its_type(agent):
    reply = start(agent, env={"INIT_ERROR": "1"})
    error = assert_error(reply, "ConfigMissing", fatal=True)
    assert error["message"] == "no config" and error["stack"] == "at start"


def test_a_bootstrap_that_exits_at_start_reports_its_stderr_tail(agent):
    reply = start(agent, env={"EXIT_AT_START": "1"})
    error = assert_error(reply, "RuntimeExit", fatal=True)
    assert "exited with code 4" in error["message"]
    assert "cannot start: missing DATABASE_URL" in error["stack"]


def test_no_bootstrap_or_one_that_cannot_run_is_an_invalid_entrypoint(agent, tmp_path):
    package = protocol.encode_tree([("function.sh", "", b"handler () { echo 1; }\n")])
    reply = agent.init(package, runtime="provided", handler="function.handler", filename=protocol.TREE_FILENAME)
    error = assert_error(reply, "Runtime.InvalidEntrypoint", fatal=True)
    assert "bootstrap" in error["message"]
    for n, (bootstrap, why) in enumerate([("echo no interpreter line\n", "has no #! line"),
                                          ("#!/opt/nowhere/ruby -w\nputs 1\n",
                                           "its #! interpreter /opt/nowhere/ruby is not in this machine")]):
        (tmp_path / f"other{n}").mkdir()
        other = AgentProcess(tmp_path / f"other{n}")
        try:
            error = assert_error(start(other, bootstrap=bootstrap), "Runtime.InvalidEntrypoint", fatal=True)
            assert why in error["message"]
        finally:
            other.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_a_shell_bootstrap_with_curl_in_a_zip_package_without_exec_bits(agent):
    package = zip_of({"bootstrap": (SH_BOOTSTRAP, 0o644), "function.sh": (SH_FUNCTION, 0o644)})
    reply = agent.init(packages.to_tree(package), runtime="provided", handler="function.handler",
                       filename=protocol.TREE_FILENAME)
    assert reply["type"] == "init_ok", reply
    assert agent.invoke({"name": "ada"}) == {"greeting": "hello from sh", "event": {"name": "ada"}}
    assert agent.invoke([1])["event"] == [1]
    assert os.access(agent.task_dir / "bootstrap", os.X_OK)


def test_a_dependency_layer_is_on_pythonpath_and_node_path(agent, tmp_path):
    # Only /opt/layer is a valid layer path; outside a machine it does not exist, which is fine here.
    start(agent, layer="/opt/layer", env={"PYTHONPATH": "/mine"})
    env = agent.invoke({})["env"]
    assert env["PYTHONPATH"] == "/mine:/opt/layer" and env["NODE_PATH"] == "/opt/layer"


def test_the_server_drops_a_connection_that_piles_data_behind_a_parked_request():
    import socket
    import threading

    from nimbus.agent.runtime_api import PARK, Server

    parked = []
    server = Server(lambda request: parked.append(request) or PARK, lambda path: (413, b"{}"), body_max=1 << 20,
                    port=0)
    client = socket.create_connection(server.listener.getsockname())
    flood = b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n" + b"x" * (3 << 20)
    sender = threading.Thread(target=lambda: _send_quietly(client, flood))
    sender.start()
    try:
        assert server.run(lambda: parked and not server.conns, timeout_s=30) == "done"
        assert len(parked) == 1  # the first request was read and parked; what piled up behind it was not kept
    finally:
        client.close()
        sender.join(30)
        server.close()


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the server hung up: expected
        pass
