"""Probes: the environment and the ``context`` a function sees, name by name, against what Lambda documents.

The documented lists are Lambda's "Defined runtime environment variables" table (developer guide,
configuration-envvars.html#configuration-envvars-runtime) and the context pages for Python
(python-context.html) and Node.js (nodejs-context.html), with ``tenant_id``/``tenantId`` from the tenant
isolation page. Every documented name Nimbus does not set, and every name Nimbus adds, is listed below
with its reason, so these tests fail when either side changes. The two "differs on purpose" tables feed
the README's "Differences from Lambda".
"""

import pytest
from test_api import deploy, invoke

pytestmark = pytest.mark.sandbox

# ---------------------------------------------------------------- what Lambda documents

RESERVED_ENV = {
    "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
}
# The unreserved ones Lambda sets in these runtimes (GEM_PATH is Ruby's, AWS_LAMBDA_DOTNET_PREJIT .NET's).
UNRESERVED_ENV = {"LANG", "PATH", "LD_LIBRARY_PATH", "AWS_XRAY_CONTEXT_MISSING", "AWS_XRAY_DAEMON_ADDRESS", "TZ"}
DOCUMENTED_ENV = {
    "python3.11": RESERVED_ENV | UNRESERVED_ENV | {"PYTHONPATH"},
    "nodejs20.x": RESERVED_ENV | UNRESERVED_ENV | {"NODE_PATH"},
}
DOCUMENTED_CONTEXT = {
    "python3.11": {"get_remaining_time_in_millis", "function_name", "function_version", "invoked_function_arn",
                   "memory_limit_in_mb", "aws_request_id", "log_group_name", "log_stream_name", "identity",
                   "client_context", "tenant_id"},
    "nodejs20.x": {"getRemainingTimeInMillis", "functionName", "functionVersion", "invokedFunctionArn",
                   "memoryLimitInMB", "awsRequestId", "logGroupName", "logStreamName", "identity", "clientContext",
                   "callbackWaitsForEmptyEventLoop", "tenantId"},
}
DOCUMENTED_IDENTITY = {"cognito_identity_id", "cognito_identity_pool_id"}

# ---------------------------------------------------------------- where Nimbus differs, on purpose

# Documented names a function does not see on Nimbus.
NOT_SET_ENV = {
    # Nimbus has no IAM: no execution role, so no credentials to hand out. SDK clients can be built (the
    # region is set) but calls fail to sign until the function brings its own credentials.
    "AWS_ACCESS_KEY": "no IAM",
    "AWS_ACCESS_KEY_ID": "no IAM",
    "AWS_SECRET_ACCESS_KEY": "no IAM",
    "AWS_SESSION_TOKEN": "no IAM",
    # python3 and nodejs speak frames with the agent, not the Runtime API; there is no custom runtime to use it.
    "AWS_LAMBDA_RUNTIME_API": "no Runtime API endpoint",
    # Machines have no network and there is no X-Ray daemon; calls are never sampled (Sampled=0), and the
    # SDK's default address is the machine's own loopback.
    "AWS_XRAY_DAEMON_ADDRESS": "no X-Ray daemon",
    # Lambda's value names /var/lang/lib, /var/runtime, /var/task(/lib) and /opt/lib. The python3 runtime runs
    # in the agent's process, whose loader read its path at start, so the variable would reach only child
    # processes; layers are Python and npm packages, not /opt/lib.
    "LD_LIBRARY_PATH": "in-process python3; no /opt/lib",
}
NOT_SET = {
    # The agent puts the task, the layer and the SDK on sys.path itself; its own directory (LAMBDA_RUNTIME_DIR,
    # which is Lambda's PYTHONPATH) holds modules such as main.py that must not shadow a function's in child
    # interpreters.
    "python3.11": NOT_SET_ENV | {"PYTHONPATH": "sys.path set by the agent"},
    # Node finds the layer through /var/task/node_modules and the SDK through /node_modules, lookups that ES
    # modules share (they ignore NODE_PATH). NODE_PATH is set, to the layer, only for functions with one.
    "nodejs20.x": NOT_SET_ENV | {"NODE_PATH": "node_modules links; set only with a layer"},
}
# Names Nimbus sets that Lambda does not document.
EXTRA_ENV = {
    "HOME": "/tmp, the only writable directory, for tools that want a home (pip, git, caches)",
    "NIMBUS_FUNCTION_NAME": "Nimbus's own name for the function, kept for functions written before Lambda's",
}
EXTRA = {"python3.11": EXTRA_ENV, "nodejs20.x": EXTRA_ENV}
NOT_IN_CONTEXT = {
    # Lambda's tenant isolation mode (one execution environment per tenant id) has no counterpart: Nimbus's
    # tenants are API-key scopes, and every machine already serves one function version.
    "python3.11": {"tenant_id": "no tenant isolation mode"},
    "nodejs20.x": {"tenantId": "no tenant isolation mode"},
}
EXTRA_IN_CONTEXT = {
    "python3.11": {"invocation_id": "Nimbus's name for aws_request_id, the id its API returns"},
    "nodejs20.x": {
        "invocationId": "Nimbus's name for awsRequestId, the id its API returns",
        # Lambda's Node runtime still defines the pre-callback completion methods; handlers from that era use them.
        "done": "legacy completion method Lambda's runtime keeps",
        "fail": "legacy completion method Lambda's runtime keeps",
        "succeed": "legacy completion method Lambda's runtime keeps",
    },
}

# ---------------------------------------------------------------- the probes

PYTHON_PROBE = """
import os

def handler(event, context):
    return {
        "env": sorted(os.environ),
        "context": sorted(name for name in dir(context) if not name.startswith("_")),
        "identity": sorted(name for name in dir(context.identity) if not name.startswith("_")),
        "xray_context_missing": os.environ.get("AWS_XRAY_CONTEXT_MISSING"),
    }
"""

NODE_PROBE = """
exports.handler = async (event, context) => {
  const names = new Set();
  for (let o = context; o && o !== Object.prototype; o = Object.getPrototypeOf(o)) {
    for (const name of Object.getOwnPropertyNames(o)) if (name !== 'constructor') names.add(name);
  }
  return {
    env: Object.keys(process.env).sort(),
    context: [...names].sort(),
    xray_context_missing: process.env.AWS_XRAY_CONTEXT_MISSING ?? null,
  };
};
"""

PROBES = {"python3.11": PYTHON_PROBE, "nodejs20.x": NODE_PROBE}


@pytest.fixture(scope="module")
def seen(node):
    """What each probe saw, called once per runtime on this module's node (no env of the function's own)."""
    with node.client() as api:
        result = {}
        for runtime, code in PROBES.items():
            out = invoke(api, deploy(api, code, runtime=runtime)["name"])
            assert out["status"] == "succeeded", out
            result[runtime] = out["output"]
        return result


def compare(seen_names: list, documented: set, not_set: dict, extra: dict) -> None:
    names = set(seen_names)
    assert len(names) == len(seen_names)
    assert documented - names == set(not_set), "documented but not set (update the 'differs on purpose' table)"
    assert names - documented == set(extra), "set but not documented (update the 'differs on purpose' table)"


@pytest.mark.parametrize("runtime", sorted(PROBES))
def test_environment_names_are_lambdas(seen, runtime):
    compare(seen[runtime]["env"], DOCUMENTED_ENV[runtime], NOT_SET[runtime], EXTRA[runtime])


@pytest.mark.parametrize("runtime", sorted(PROBES))
def test_context_names_are_lambdas(seen, runtime):
    compare(seen[runtime]["context"], DOCUMENTED_CONTEXT[runtime], NOT_IN_CONTEXT[runtime], EXTRA_IN_CONTEXT[runtime])


def test_python_identity_names_are_lambdas(seen):
    assert set(seen["python3.11"]["identity"]) == DOCUMENTED_IDENTITY


@pytest.mark.parametrize("runtime", sorted(PROBES))
def test_xray_context_missing_is_lambdas_default_and_the_function_may_override_it(seen, api, runtime):
    assert seen[runtime]["xray_context_missing"] == "LOG_ERROR"
    fn = deploy(api, PROBES[runtime], runtime=runtime, env={"AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR"})
    assert invoke(api, fn["name"])["output"]["xray_context_missing"] == "IGNORE_ERROR"


def test_the_differences_are_documented_names_only():
    """The tables may only excuse names Lambda documents (missing) or does not (extra), never both."""
    for runtime in PROBES:
        assert set(NOT_SET[runtime]) <= DOCUMENTED_ENV[runtime]
        assert not set(EXTRA[runtime]) & DOCUMENTED_ENV[runtime]
        assert set(NOT_IN_CONTEXT[runtime]) <= DOCUMENTED_CONTEXT[runtime]
        assert not set(EXTRA_IN_CONTEXT[runtime]) & DOCUMENTED_CONTEXT[runtime]
