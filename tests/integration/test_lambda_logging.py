"""Issue 17 items 4 and 6 through the API, in real machines: handlers in hyphenated files are created and
run, and Lambda's logging settings are a function's own environment variables, which its logs follow.

The agent-level details (every format field, levels, event-loop rules, output between calls) are in
tests/unit/test_agent_lambda_logging.py and test_agent_node_event_loop.py.
"""

import json
import re

import pytest
from test_api import assert_problem, deploy, invoke

pytestmark = pytest.mark.sandbox

PYTHON = """
import logging
logger = logging.getLogger()
logger.setLevel(logging.INFO)

def handler(event, context):
    logger.info("confirming %s", event["user"])
    return {"autoConfirmUser": True}
"""

NODE = """
exports.handler = (event, context, callback) => {
  setTimeout(() => console.log('confirmed', event.user), 10);
  callback(null, { autoConfirmUser: true });
};
"""


@pytest.fixture(scope="module")
def node(make_module_node, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with make_module_node(home, f"sqlite:///{home / 'nimbus.db'}", runtimes=["python3", "nodejs"]) as running:
        yield running


@pytest.fixture
def api(node):
    with node.client() as client:
        yield client


def logs_of(api, result: dict) -> str:
    return api.get(f"/api/v1/invocations/{result['invocation_id']}").json()["logs"]


def test_python_handler_in_a_hyphenated_file_logs_lambda_json(api):
    fn = deploy(api, PYTHON, handler="auto-confirm.handler", env={"AWS_LAMBDA_LOG_FORMAT": "JSON"})
    assert fn["handler"] == "auto-confirm.handler"
    result = invoke(api, fn["name"], {"user": "ana"})
    assert result["output"] == {"autoConfirmUser": True}
    record = json.loads(logs_of(api, result))
    assert record["message"] == "confirming ana" and record["level"] == "INFO" and record["logger"] == "root"
    assert record["requestId"] == result["invocation_id"]


def test_node_handler_in_a_hyphenated_file_logs_lambda_text_after_its_loop_empties(api):
    fn = deploy(api, NODE, runtime="nodejs", handler="context-lambda.handler")
    result = invoke(api, fn["name"], {"user": "ana"})
    assert result["output"] == {"autoConfirmUser": True}
    line = logs_of(api, result)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\t" + re.escape(result["invocation_id"])
                        + r"\tINFO\tconfirmed ana\n", line), line


def test_log_settings_are_the_functions_env_and_other_lambda_names_stay_reserved(api):
    fn = deploy(api, "import logging\ndef handler(event, context):\n    logging.getLogger('x').debug('details')\n")
    assert logs_of(api, invoke(api, fn["name"])) == ""  # the root logger's own level: WARNING
    resp = api.put(f"/api/v1/functions/{fn['name']}", json={"env": {"AWS_LAMBDA_LOG_LEVEL": "DEBUG"}})
    assert resp.status_code == 200, resp.text
    assert logs_of(api, invoke(api, fn["name"])).endswith("\tdetails\n")
    for key in ("AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_FORMATS", "NIMBUS_X"):
        assert_problem(api.put(f"/api/v1/functions/{fn['name']}", json={"env": {key: "x"}}), 422, key)
    assert_problem(api.put(f"/api/v1/functions/{fn['name']}", json={"handler": "../auto-confirm.handler"}), 422)
