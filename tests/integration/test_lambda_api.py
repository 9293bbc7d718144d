"""The Lambda API (/2015-03-31) driven by real boto3 clients and the AWS CLI against a real node, on SQLite
and PostgreSQL: every operation, the modeled exceptions, the waiters, Event invokes in the async queue,
Tail logs, weighted aliases and rollback. No stubbing of botocore: its serialisers, parsers, waiters and
SigV4 signer are the client's own.
"""

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config

pytestmark = pytest.mark.sandbox

ROLE = "arn:aws:iam::000000000000:role/lambda-role"
ACCOUNT, REGION = "000000000000", "us-east-1"
ECHO = """
import os
def handler(event, context):
    print("echo", context.function_name, context.function_version)
    return {"event": event, "version": context.function_version, "name": context.function_name}
"""
FAILS = """
def handler(event, context):
    print("about to fail")
    raise ValueError("bad input: " + str(event.get("x")))
"""
SLOW = """
import time
def handler(event, context):
    time.sleep(5)
"""


def zip_of(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def client_for(url: str, key: str = "test", secret: str = "test", **config):
    """A real boto3 Lambda client aimed at the node; no retries, so each call is one request."""
    return boto3.client("lambda", endpoint_url=url, region_name=REGION, aws_access_key_id=key,
                        aws_secret_access_key=secret,
                        config=Config(retries={"total_max_attempts": 1}, read_timeout=60, **config))


def create(client, name: str, code: str = ECHO, **extra):
    params = dict(FunctionName=name, Runtime="python3.11", Role=ROLE, Handler="main.handler",
                  Code={"ZipFile": zip_of({"main.py": code})})
    params.update(extra)
    return client.create_function(**params)


@pytest.fixture(scope="module")
def lam(node):
    return client_for(node.url)


def payload_of(answer) -> object:
    return json.loads(answer["Payload"].read())


# ---------------------------------------------------------------- functions


def test_create_get_list_update_delete(node, lam):
    package = zip_of({"main.py": ECHO})
    made = lam.create_function(FunctionName="lam-crud", Runtime="python3.11", Role=ROLE, Handler="main.handler",
                               Code={"ZipFile": package}, Description="first", Timeout=7, MemorySize=256,
                               Environment={"Variables": {"GREETING": "hi"}})
    assert made["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert made["CodeSha256"] == base64.b64encode(hashlib.sha256(package).digest()).decode()
    assert made["CodeSize"] == len(package) and made["Version"] == "$LATEST"
    assert made["FunctionArn"] == f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:lam-crud"
    assert made["Runtime"].startswith("python3.") and made["Role"] == ROLE and made["Description"] == "first"
    assert (made["Timeout"], made["MemorySize"]) == (7, 256)
    assert made["Environment"] == {"Variables": {"GREETING": "hi"}}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+0000", made["LastModified"])
    lam.get_waiter("function_active_v2").wait(FunctionName="lam-crud")
    got = lam.get_function(FunctionName="lam-crud")["Configuration"]
    assert got["State"] == "Active" and got["LastUpdateStatus"] == "Successful"
    assert got["RevisionId"] == made["RevisionId"]
    assert lam.get_function_configuration(FunctionName="lam-crud")["CodeSha256"] == made["CodeSha256"]

    updated = lam.update_function_configuration(FunctionName="lam-crud", Timeout=9, Description="second",
                                                Environment={"Variables": {"GREETING": "hello"}})
    assert (updated["Timeout"], updated["Description"]) == (9, "second")
    assert updated["RevisionId"] != made["RevisionId"]
    lam.get_waiter("function_updated_v2").wait(FunctionName="lam-crud")
    new_code = zip_of({"main.py": "def handler(event, context):\n    return 'v2'\n"})
    recoded = lam.update_function_code(FunctionName="lam-crud", ZipFile=new_code)
    assert recoded["CodeSha256"] == base64.b64encode(hashlib.sha256(new_code).digest()).decode()
    assert recoded["Timeout"] == 9 and recoded["Environment"]["Variables"] == {"GREETING": "hello"}
    assert payload_of(lam.invoke(FunctionName="lam-crud")) == "v2"
    # The same function through /api/v1.
    with node.client() as api:
        assert api.get("/api/v1/functions/lam-crud").json()["timeout_s"] == 9

    lam.delete_function(FunctionName="lam-crud")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_function(FunctionName="lam-crud")


def test_lambda_updates_keep_the_isolation_set_through_api_v1(node, lam):
    """Lambda has no such field: its creates are shared, and its updates leave the setting as it was."""
    create(lam, "lam-isolation")
    with node.client() as api:
        assert api.get("/api/v1/functions/lam-isolation").json()["isolation"] == "shared"
        assert api.put("/api/v1/functions/lam-isolation", json={"isolation": "per-call"}).status_code == 200
        lam.update_function_configuration(FunctionName="lam-isolation", Timeout=9)
        lam.update_function_code(FunctionName="lam-isolation", ZipFile=zip_of({"main.py": ECHO + "\n# v2\n"}))
        got = api.get("/api/v1/functions/lam-isolation").json()
        assert (got["version"], got["timeout_s"], got["isolation"]) == (4, 9, "per-call")
    lam.delete_function(FunctionName="lam-isolation")


def test_list_functions_pages(lam):
    for i in range(3):
        create(lam, f"lam-page-{i}")
    names, marker = [], None
    while True:
        page = lam.list_functions(MaxItems=1, **({"Marker": marker} if marker else {}))
        assert len(page["Functions"]) <= 1
        names += [f["FunctionName"] for f in page["Functions"]]
        marker = page.get("NextMarker")
        if not marker:
            break
    assert {"lam-page-0", "lam-page-1", "lam-page-2"} <= set(names)
    assert len(names) == len(set(names))
    everything = [f["FunctionName"] for f in lam.get_paginator("list_functions").paginate().build_full_result()
                  ["Functions"]]
    assert sorted(everything) == sorted(names)


# ---------------------------------------------------------------- invoke


def test_invoke_payload_tail_and_request_id(node, lam):
    create(lam, "lam-echo")
    answer = lam.invoke(FunctionName="lam-echo", Payload=json.dumps({"a": 1}), LogType="Tail")
    assert answer["StatusCode"] == 200 and "FunctionError" not in answer
    assert answer["ExecutedVersion"] == "$LATEST"
    assert payload_of(answer) == {"event": {"a": 1}, "version": "$LATEST", "name": "lam-echo"}
    assert "echo lam-echo $LATEST" in base64.b64decode(answer["LogResult"]).decode()
    request_id = answer["ResponseMetadata"]["RequestId"]
    with node.client() as api:  # the same invocation, with its logs, in /api/v1
        record = api.get(f"/api/v1/invocations/{request_id}").json()
    assert record["status"] == "succeeded" and "echo lam-echo" in record["logs"]


def test_invoke_event_goes_through_the_async_queue(node, lam):
    create(lam, "lam-event")
    answer = lam.invoke(FunctionName="lam-event", InvocationType="Event", Payload=b'{"queued": true}')
    assert answer["StatusCode"] == 202 and answer["Payload"].read() == b""
    invocation = answer["ResponseMetadata"]["RequestId"]
    with node.client() as api:
        record = api.get(f"/api/v1/invocations/{invocation}").json()
        assert record["mode"] == "async"
        for _ in range(600):
            if record["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
            record = api.get(f"/api/v1/invocations/{invocation}").json()
    assert record["status"] == "succeeded", record
    assert record["output"]["event"] == {"queued": True} and "echo lam-event" in record["logs"]


def test_invoke_dry_run_and_client_context(lam):
    create(lam, "lam-dry")
    assert lam.invoke(FunctionName="lam-dry", InvocationType="DryRun")["StatusCode"] == 204
    context = base64.b64encode(json.dumps({"custom": {"k": "v"}}).encode()).decode()
    assert lam.invoke(FunctionName="lam-dry", ClientContext=context)["StatusCode"] == 200
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName="lam-dry", ClientContext=base64.b64encode(b"[1]").decode())


def test_function_errors_are_200_with_lambdas_payload(lam):
    create(lam, "lam-fails", FAILS)
    answer = lam.invoke(FunctionName="lam-fails", Payload=b'{"x": 3}', LogType="Tail")
    assert answer["StatusCode"] == 200 and answer["FunctionError"] == "Unhandled"
    error = payload_of(answer)
    assert error["errorType"] == "ValueError" and error["errorMessage"] == "bad input: 3"
    assert isinstance(error["stackTrace"], list) and any("main.py" in line for line in error["stackTrace"])
    assert error["requestId"] == answer["ResponseMetadata"]["RequestId"]
    assert "about to fail" in base64.b64decode(answer["LogResult"]).decode()

    create(lam, "lam-slow", SLOW, Timeout=1)
    timed_out = lam.invoke(FunctionName="lam-slow")
    assert timed_out["StatusCode"] == 200 and timed_out["FunctionError"] == "Unhandled"
    error = payload_of(timed_out)
    assert error["errorType"] == "Sandbox.Timedout"
    assert re.fullmatch(r"RequestId: \S+ Error: Task timed out after 1\.00 seconds", error["errorMessage"])

    create(lam, "lam-nohandler", ECHO, Handler="main.missing")
    assert payload_of(lam.invoke(FunctionName="lam-nohandler"))["errorType"] == "Runtime.HandlerNotFound"
    create(lam, "lam-noimport", "import not_a_module_anywhere\n")
    assert payload_of(lam.invoke(FunctionName="lam-noimport"))["errorType"] == "Runtime.ImportModuleError"
    create(lam, "lam-nosyntax", "import helper\ndef handler(event, context):\n    pass\n")
    lam.update_function_code(FunctionName="lam-nosyntax",
                             ZipFile=zip_of({"main.py": "import helper\ndef handler(e, c):\n    pass\n",
                                             "helper.py": "def broken(:\n"}))
    assert payload_of(lam.invoke(FunctionName="lam-nosyntax"))["errorType"] == "Runtime.UserCodeSyntaxError"


# ---------------------------------------------------------------- errors as modeled exceptions


def test_api_errors_are_the_modeled_exceptions(node, lam):
    create(lam, "lam-errors")
    with pytest.raises(lam.exceptions.ResourceNotFoundException) as caught:
        lam.invoke(FunctionName="lam-nowhere")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(lam.exceptions.ResourceConflictException):
        create(lam, "lam-errors")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        create(lam, "lam-bad-runtime", Runtime="cobol85")
    with pytest.raises(lam.exceptions.InvalidParameterValueException):
        lam.invoke(FunctionName="lam-errors:1", Qualifier="2")
    with pytest.raises(lam.exceptions.InvalidRequestContentException):
        lam.invoke(FunctionName="lam-errors", Payload=b"{not json")
    with pytest.raises(lam.exceptions.RequestTooLargeException) as caught:
        lam.invoke(FunctionName="lam-errors", Payload=b"[" + b"1," * (3 << 20) + b"1]")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    with pytest.raises(lam.exceptions.PreconditionFailedException):
        lam.update_function_configuration(FunctionName="lam-errors", Timeout=5,
                                          RevisionId="00000000-0000-0000-0000-000000000000")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):  # another account's ARN names nothing here
        lam.get_function(FunctionName=f"arn:aws:lambda:{REGION}:123456789012:function:lam-errors")
    # Malformed input is a 4xx with Lambda's shape, never a 5xx.
    with node.client() as raw:
        answer = raw.post("/2015-03-31/functions", content=b"\xff\xfe")
        assert answer.status_code == 400 and answer.headers["x-amzn-errortype"] == "InvalidRequestContentException"
        assert answer.json()["Type"] == "User" and answer.headers["x-amzn-requestid"]
        answer = raw.post("/2015-03-31/functions", json={"FunctionName": "x", "Role": ROLE, "Code": [1]})
        assert answer.status_code == 400 and answer.headers["x-amzn-errortype"] == "InvalidParameterValueException"
        assert raw.get("/2015-03-31/functions/lam-errors/nothing").status_code == 404


def test_function_names_and_arns(lam):
    create(lam, "lam-arn")
    for name in ("lam-arn", f"{ACCOUNT}:function:lam-arn", f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:lam-arn",
                 "lam-arn:$LATEST", f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:lam-arn:$LATEST"):
        assert payload_of(lam.invoke(FunctionName=name))["name"] == "lam-arn", name
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.invoke(FunctionName=f"arn:aws:lambda:eu-west-1:{ACCOUNT}:function:lam-arn")


# ---------------------------------------------------------------- versions and aliases


def test_versions_aliases_weights_and_rollback(node, lam):
    create(lam, "lam-alias", "def handler(event, context):\n    return context.function_version\n")
    one = lam.publish_version(FunctionName="lam-alias", Description="one")
    assert one["Version"] == "1" and one["FunctionArn"].endswith(":lam-alias:1") and one["Description"] == "one"
    assert lam.publish_version(FunctionName="lam-alias")["Version"] == "1"  # nothing changed: the same version
    lam.update_function_code(FunctionName="lam-alias",
                             ZipFile=zip_of({"main.py": "def handler(event, context):\n    return 'two:' + "
                                                        "context.function_version\n"}))
    two = lam.publish_version(FunctionName="lam-alias")
    assert two["Version"] == "2"
    versions = lam.list_versions_by_function(FunctionName="lam-alias")["Versions"]
    assert [v["Version"] for v in versions] == ["$LATEST", "1", "2"]
    assert lam.get_function(FunctionName="lam-alias", Qualifier="1")["Configuration"]["Version"] == "1"

    alias = lam.create_alias(FunctionName="lam-alias", Name="live", FunctionVersion="1",
                             RoutingConfig={"AdditionalVersionWeights": {"2": 0.1}})
    assert alias["AliasArn"].endswith(":function:lam-alias:live")
    assert alias["RoutingConfig"]["AdditionalVersionWeights"] == {"2": 0.1}
    assert lam.get_alias(FunctionName="lam-alias", Name="live")["RevisionId"] == alias["RevisionId"]
    assert [a["Name"] for a in lam.list_aliases(FunctionName="lam-alias")["Aliases"]] == ["live"]
    with pytest.raises(lam.exceptions.ResourceConflictException):
        lam.create_alias(FunctionName="lam-alias", Name="live", FunctionVersion="1")
    with pytest.raises(lam.exceptions.ResourceConflictException):  # an alias routes calls to it
        lam.delete_function(FunctionName="lam-alias", Qualifier="2")

    counts = {"1": 0, "2": 0}
    for _ in range(1000):
        answer = lam.invoke(FunctionName="lam-alias", Qualifier="live")
        output = payload_of(answer)
        counts[answer["ExecutedVersion"]] += 1
        assert output == ("1" if answer["ExecutedVersion"] == "1" else "two:2")
    assert 60 <= counts["2"] <= 140, counts  # 10 % of 1,000 is 100; this band is over 4 standard deviations

    # Rollback: the alias back to version 1 alone; the next calls (this node clears its cache at once) run 1.
    rolled = lam.update_alias(FunctionName="lam-alias", Name="live", FunctionVersion="1",
                              RoutingConfig={"AdditionalVersionWeights": {}})
    assert "RoutingConfig" not in rolled or not rolled["RoutingConfig"].get("AdditionalVersionWeights")
    assert {lam.invoke(FunctionName="lam-alias:live")["ExecutedVersion"] for _ in range(30)} == {"1"}
    with pytest.raises(lam.exceptions.PreconditionFailedException):
        lam.update_alias(FunctionName="lam-alias", Name="live", Description="x", RevisionId=alias["RevisionId"])

    lam.delete_function(FunctionName="lam-alias", Qualifier="2")  # nothing routes to 2 any more
    assert [v["Version"] for v in lam.list_versions_by_function(FunctionName="lam-alias")["Versions"]] == \
        ["$LATEST", "1"]
    lam.delete_alias(FunctionName="lam-alias", Name="live")
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        lam.get_alias(FunctionName="lam-alias", Name="live")
    with node.client() as api:  # the same versions through /api/v1
        assert api.get("/api/v1/functions/lam-alias/versions").status_code == 200


def test_create_with_publish(lam):
    made = create(lam, "lam-publish", Publish=True)
    assert made["Version"] == "1"
    assert lam.invoke(FunctionName="lam-publish", Qualifier="1")["ExecutedVersion"] == "1"


# ---------------------------------------------------------------- the AWS CLI


def test_aws_cli_invoke(node, lam, tmp_path):
    create(lam, "lam-cli")
    aws = Path(sys.executable).with_name("aws")
    out = tmp_path / "out.json"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    done = subprocess.run([str(aws), "lambda", "invoke", "--endpoint-url", node.url, "--function-name", "lam-cli",
                           "--payload", '{"from": "cli"}', str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["StatusCode"] == 200
    assert json.loads(out.read_text())["event"] == {"from": "cli"}


# ---------------------------------------------------------------- what a call tells the function

PROBE_PY = """
def handler(event, context):
    cc = context.client_context
    return {"arn": context.invoked_function_arn, "version": context.function_version,
            "custom": None if cc is None else cc.custom, "env": None if cc is None else cc.env,
            "app": None if cc is None or cc.client is None else cc.client.app_title,
            "installation": None if cc is None or cc.client is None else cc.client.installation_id}
"""
PROBE_JS = """
exports.handler = async (event, context) => ({
  arn: context.invokedFunctionArn, version: context.functionVersion,
  clientContext: context.clientContext === undefined ? 'undefined' : context.clientContext,
});
"""


def test_the_arn_names_the_qualifier_and_the_client_context_reaches_python(lam):
    """As on Lambda: invoked_function_arn ends with the qualifier the call named (none when it named none),
    and X-Amz-Client-Context arrives as context.client_context with its client/custom/env parts."""
    create(lam, "lam-arn-py", PROBE_PY)
    lam.publish_version(FunctionName="lam-arn-py")
    lam.create_alias(FunctionName="lam-arn-py", Name="live", FunctionVersion="1")
    base = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:lam-arn-py"
    plain = payload_of(lam.invoke(FunctionName="lam-arn-py"))
    assert plain == {"arn": base, "version": "$LATEST", "custom": None, "env": None, "app": None,
                     "installation": None}
    assert payload_of(lam.invoke(FunctionName="lam-arn-py", Qualifier="1"))["arn"] == base + ":1"
    aliased = payload_of(lam.invoke(FunctionName="lam-arn-py:live"))
    assert aliased["arn"] == base + ":live" and aliased["version"] == "1"
    assert payload_of(lam.invoke(FunctionName="lam-arn-py", Qualifier="$LATEST"))["arn"] == base + ":$LATEST"
    sent = {"client": {"installation_id": "inst-1", "app_title": "Shop"}, "custom": {"k": "v"}, "env": {"os": "x"}}
    context = base64.b64encode(json.dumps(sent).encode()).decode()
    got = payload_of(lam.invoke(FunctionName="lam-arn-py", ClientContext=context))
    assert (got["custom"], got["env"], got["app"], got["installation"]) == ({"k": "v"}, {"os": "x"}, "Shop", "inst-1")
    # the next call, on the same machine, sent none: nothing of the last one's is left
    assert payload_of(lam.invoke(FunctionName="lam-arn-py"))["custom"] is None


def test_the_arn_names_the_qualifier_on_the_native_api_too(node, lam):
    create(lam, "lam-arn-v1", PROBE_PY)
    lam.publish_version(FunctionName="lam-arn-v1")
    base = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:lam-arn-v1"
    for path, arn in (("lam-arn-v1/invoke", base), ("lam-arn-v1:1/invoke", base + ":1"),
                      ("lam-arn-v1/invoke?qualifier=1", base + ":1")):
        answer = httpx.post(f"{node.url}/api/v1/functions/{path}", json={}).json()
        assert answer["output"]["arn"] == arn, (path, answer)


def test_the_arn_names_the_qualifier_and_the_client_context_reaches_node(lam):
    lam.create_function(FunctionName="lam-arn-js", Runtime="nodejs20.x", Role=ROLE, Handler="index.handler",
                        Code={"ZipFile": zip_of({"index.js": PROBE_JS})})
    lam.publish_version(FunctionName="lam-arn-js")
    base = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:lam-arn-js"
    assert payload_of(lam.invoke(FunctionName="lam-arn-js")) == {"arn": base, "version": "$LATEST",
                                                                  "clientContext": "undefined"}
    assert payload_of(lam.invoke(FunctionName=f"{base}:1"))["arn"] == base + ":1"
    context = base64.b64encode(json.dumps({"custom": {"n": 1}}).encode()).decode()
    assert payload_of(lam.invoke(FunctionName="lam-arn-js", ClientContext=context))["clientContext"] == {"custom": {"n": 1}}


def test_a_queued_call_of_a_version_names_it_in_its_arn(node, lam):
    """Event calls keep no qualifier in the queue: their ARN names the version that runs (an alias's
    target, not its name), and they get no client context, as on Lambda."""
    create(lam, "lam-arn-ev", PROBE_PY.replace("return {", "print('ARN', context.invoked_function_arn)\n    return {"))
    lam.publish_version(FunctionName="lam-arn-ev")
    answer = lam.invoke(FunctionName="lam-arn-ev", Qualifier="1", InvocationType="Event")
    request_id = answer["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = httpx.get(f"{node.url}/api/v1/invocations/{request_id}").json()
        if record.get("status") == "succeeded":
            break
        time.sleep(0.2)
    assert record["status"] == "succeeded", record
    assert f"ARN arn:aws:lambda:{REGION}:{ACCOUNT}:function:lam-arn-ev:1" in record["logs"]
