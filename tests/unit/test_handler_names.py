"""Handler names (issue 17 item 6): any file name Lambda would load, nothing that walks out of the task dir.

The name is tenant input that becomes a path in the machine (``<module>.py``, ``<module>.js``), so the
pattern is checked both ways: real handlers' names pass, path tricks do not. The agent then loads a
hyphenated module in both runtimes.
"""

import pytest
from test_agent import agent, needs_node, started  # noqa: F401 - agent is a fixture

from nimbus import runtimes
from nimbus.errors import InvalidRequest
from nimbus.gateway import functions
from nimbus.gateway.schemas import FunctionCreate

ACCEPTED = [
    "auto-confirm.handler", "context-lambda.handler", "main.handler", "index.handler", "api.app.handler",
    "api/app.handler", "lib/auto-confirm.handler", "src/my-fn/index.handler", "1st.handler", "_private.run",
    "my-pkg.sub-mod.handler", "index.$handler", "v1.2/app.handler",
]
REFUSED = [
    "../evil.handler", "lib/../../etc/passwd.handler", "/abs/path.handler", "/main.handler", "lib//x.handler",
    ".hidden.handler", "lib/.env.handler", "-rf.handler", "lib/-x.handler", "a\0b.handler", "main\0.handler",
    "a\\b.handler", "a b.handler", "no-dots", "main.", ".handler", "main.-x", "main.handler()", "main.han-dler",
    "main.handler\n", "lib/\nx.handler", "ü.handler", "~/x.handler", "lib/x/.handler",
]

# Not module.function, but a custom runtime's bootstrap may read _HANDLER as it likes (Lambda's take any).
CUSTOM_RUNTIME_NAMES = {"no-dots", "main.", "main.-x", "main.han-dler"}


@pytest.mark.parametrize("handler", ACCEPTED)
def test_real_handler_names_are_accepted(handler):
    assert runtimes.HANDLER_RE.fullmatch(handler)
    assert functions._handler(handler, "python3") == handler
    assert FunctionCreate(name="fn", runtime="nodejs", code="x", handler=handler).handler == handler


@pytest.mark.parametrize("handler", REFUSED)
def test_path_tricks_and_malformed_names_are_refused(handler):
    with pytest.raises(InvalidRequest):
        functions._handler(handler, "python3")
    if handler in CUSTOM_RUNTIME_NAMES:  # the schema lets these through for provided; the gateway decides
        assert functions._handler(handler, "provided") == handler
        return
    with pytest.raises(ValueError):
        FunctionCreate(name="fn", runtime="nodejs", code="x", handler=handler)
    with pytest.raises(InvalidRequest):
        functions._handler(handler, "provided")


def test_a_hyphenated_python_module_loads(agent):
    started(agent, "def handler(event, context):\n    return ['confirmed', context.function_name]\n",
            handler="auto-confirm.handler", filename="auto-confirm.py")
    assert agent.invoke({}) == ["confirmed", "hello"]


@needs_node
def test_a_hyphenated_node_module_loads(agent):
    started(agent, "exports.handler = async (event, context) => ['confirmed', context.functionName];",
            runtime="nodejs", handler="context-lambda.handler", filename="context-lambda.js")
    assert agent.invoke({}) == ["confirmed", "hello"]
