"""Handlers see what they would on Lambda: the context's fields and the environment's reserved names."""

import re
import time
import uuid

import pytest
from pydantic import ValidationError
from test_api import assert_problem, deploy, invoke

from nimbus.config import Settings

ENV_NAMES = ["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "AWS_LAMBDA_LOG_GROUP_NAME",
             "AWS_LAMBDA_LOG_STREAM_NAME", "_HANDLER", "LAMBDA_RUNTIME_DIR", "TZ", "AWS_LAMBDA_INITIALIZATION_TYPE",
             "_X_AMZN_TRACE_ID", "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_VERSION",
             "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "LAMBDA_TASK_ROOT"]

PYTHON = f"""
import os, sys

def handler(event, context):
    return {{
        "arn": context.invoked_function_arn,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "repr": repr(context),
        "request": context.aws_request_id,
        "identity": repr(context.identity),
        "client_context": context.client_context,
        "env": {{name: os.environ.get(name) for name in {ENV_NAMES!r}}},
        "interpreter": "%d.%d" % sys.version_info[:2],
    }}
"""

NODE = f"""
exports.handler = async (event, context) => {{
  const env = {{}};
  for (const name of {ENV_NAMES!r}) env[name] = process.env[name] === undefined ? null : process.env[name];
  return {{
    arn: context.invokedFunctionArn,
    logGroupName: context.logGroupName,
    logStreamName: context.logStreamName,
    identity: 'identity' in context && context.identity === undefined,
    clientContext: 'clientContext' in context && context.clientContext === undefined,
    env,
    memoryLimitInMB: context.memoryLimitInMB,
    node: process.versions.node,
  }};
}};
"""

TRACE = re.compile(r"Root=1-([0-9a-f]{8})-[0-9a-f]{24};Parent=[0-9a-f]{16};Sampled=0")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def check_stream(stream: str, version: str) -> str:
    """The stream name's form; returns its machine id."""
    days = {time.strftime("%Y/%m/%d", time.gmtime(time.time() + delta)) for delta in (-60, 0)}
    day, _, rest = stream.rpartition("/")
    assert day in days, stream
    prefix = f"[{version}]"
    assert rest.startswith(prefix) and re.fullmatch(r"[0-9a-f]{32}", rest[len(prefix):]), stream
    return rest[len(prefix):]


def check_env(env: dict, fn: dict, region: str, execution_env: str, handler: str) -> None:
    name = fn["name"]
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == region
    assert env["AWS_EXECUTION_ENV"] == execution_env
    assert env["AWS_LAMBDA_LOG_GROUP_NAME"] == f"/aws/lambda/{name}"
    check_stream(env["AWS_LAMBDA_LOG_STREAM_NAME"], "$LATEST")  # an unqualified call runs $LATEST
    assert env["_HANDLER"] == handler
    assert env["LAMBDA_RUNTIME_DIR"] and env["LAMBDA_RUNTIME_DIR"].startswith("/")
    assert env["TZ"] == ":UTC"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    stamp = TRACE.fullmatch(env["_X_AMZN_TRACE_ID"])
    assert stamp and abs(int(stamp.group(1), 16) - time.time()) < 300, env["_X_AMZN_TRACE_ID"]
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == name
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "$LATEST"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == str(fn["memory_mb"])
    assert env["LAMBDA_TASK_ROOT"]


def check_python(api, account: str, region: str) -> None:
    fn = deploy(api, PYTHON, memory_mb=192)
    first, second = invoke(api, fn["name"]), invoke(api, fn["name"])
    out = first["output"]
    name = fn["name"]
    arn = f"arn:aws:lambda:{region}:{account}:function:{name}"
    assert out["arn"] == arn
    assert out["log_group_name"] == out["env"]["AWS_LAMBDA_LOG_GROUP_NAME"] == f"/aws/lambda/{name}"
    assert out["log_stream_name"] == out["env"]["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert out["memory_limit_in_mb"] == "192"
    assert out["identity"] == "CognitoIdentity([cognito_identity_id=None,cognito_identity_pool_id=None])"
    assert out["client_context"] is None
    assert out["repr"] == (
        f"LambdaContext([aws_request_id={out['request']},log_group_name=/aws/lambda/{name},"
        f"log_stream_name={out['log_stream_name']},function_name={name},memory_limit_in_mb=192,"
        f"function_version=$LATEST,invoked_function_arn={arn},client_context=None,"
        f"identity={out['identity']}])"
    )
    check_env(out["env"], fn, region, f"AWS_Lambda_python{out['interpreter']}", fn["handler"])
    # each call has its own trace id; the stream is the machine's
    if second["output"]["log_stream_name"] == out["log_stream_name"]:
        assert second["output"]["env"]["_X_AMZN_TRACE_ID"] != out["env"]["_X_AMZN_TRACE_ID"]


def check_node(api, account: str, region: str) -> None:
    fn = deploy(api, NODE, runtime="nodejs")
    out = invoke(api, fn["name"])["output"]
    name = fn["name"]
    assert out["arn"] == f"arn:aws:lambda:{region}:{account}:function:{name}"
    assert out["logGroupName"] == out["env"]["AWS_LAMBDA_LOG_GROUP_NAME"] == f"/aws/lambda/{name}"
    assert out["logStreamName"] == out["env"]["AWS_LAMBDA_LOG_STREAM_NAME"]
    assert out["identity"] is True and out["clientContext"] is True
    assert out["memoryLimitInMB"] == str(fn["memory_mb"])  # a string, as on Lambda
    major = out["node"].split(".")[0]
    check_env(out["env"], fn, region, f"AWS_Lambda_nodejs{major}.x", fn["handler"])


def test_python_context_and_environment(api):
    check_python(api, "000000000000", "us-east-1")


def test_nodejs_context_and_environment(api):
    check_node(api, "000000000000", "us-east-1")


def test_account_and_region_settings(make_node, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with make_node(home, f"sqlite:///{home / 'nimbus.db'}", account_id="123456789012", region="eu-west-3") as running:
        with running.client() as api:
            check_python(api, "123456789012", "eu-west-3")
            check_node(api, "123456789012", "eu-west-3")


def test_account_id_must_be_twelve_digits(tmp_path):
    for bad in ("12345", "1234567890123", "12345678901a"):
        with pytest.raises(ValidationError):
            Settings(home=tmp_path, account_id=bad)


def test_reserved_env_is_refused(api):
    name = unique("fn")
    env = {"AWS_REGION": "x", "_HANDLER": "x", "TZ": "x", "AWS_SECRET_ACCESS_KEY": "x", "OK": "fine"}
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": PYTHON, "env": env})
    assert_problem(resp, 422, "AWS_REGION", "AWS_SECRET_ACCESS_KEY", "TZ", "_HANDLER")
    fn = deploy(api, PYTHON, name=name)
    for key in ("AWS_LAMBDA_LOG_STREAM_NAME", "LAMBDA_RUNTIME_DIR", "_X_AMZN_TRACE_ID", "AWS_SESSION_TOKEN",
                "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_EXECUTION_ENV", "LAMBDA_TASK_ROOT"):
        resp = api.put(f"/api/v1/functions/{fn['name']}", json={"env": {key: "x"}})
        assert_problem(resp, 422, key)
