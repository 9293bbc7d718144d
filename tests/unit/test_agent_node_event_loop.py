"""Node's event-loop rules (issue 17 item 7), as Lambda's node runtime (aws-lambda-ric) applies them.

With ``context.callbackWaitsForEmptyEventLoop`` true (the default) a callback's result leaves only once
the event loop is empty, and a callback handler that never calls back answers ``null`` then; set to
false, the result leaves at once. Promises answer when they settle. No test here waits on a clock: the
order of log lines and of replies says which rule was applied.
"""


from test_agent import agent, needs_node, node_children, started  # noqa: F401 - agent is a fixture

pytestmark = needs_node


def node_started(agent, code: str, **fields):
    return started(agent, code, runtime="nodejs", **fields)


def messages(logs: str) -> list[str]:
    """The messages of Lambda's text lines (time, request id, level, message)."""
    return [line.split("\t", 3)[3] for line in logs.splitlines() if line.count("\t") >= 3]


def test_a_callback_result_waits_for_the_empty_event_loop(agent):
    node_started(agent, """
        exports.handler = (event, context, callback) => {
          setTimeout(() => console.log('timer ran'), 20);
          callback(null, 'answer');
          console.log('after callback');
        };
    """)
    reply, output = agent.exec({})
    assert output == b'"answer"'
    assert messages(reply["logs"]) == ["after callback", "timer ran"]  # the timer ran before the answer


def test_callback_waits_false_answers_at_once(agent):
    node_started(agent, """
        let ticks = 0;
        const forever = setInterval(() => { ticks += 1; }, 1000);  // never lets the loop empty
        exports.handler = (event, context, callback) => {
          context.callbackWaitsForEmptyEventLoop = false;
          if (event.stop) clearInterval(forever);
          callback(null, { waits: context.callbackWaitsForEmptyEventLoop });
        };
    """)
    assert agent.invoke({}) == {"waits": False}
    assert agent.invoke({}) == {"waits": False}


def test_a_callback_handler_that_never_calls_back_answers_null_when_the_loop_empties(agent):
    node_started(agent, """
        exports.handler = (event, context, callback) => {
          setTimeout(() => console.log('last work'), 20);
        };
    """)
    reply, output = agent.exec({})
    assert reply["type"] == "result" and output == b"null"
    assert messages(reply["logs"]) == ["last work"]
    assert agent.exec({})[1] == b"null"  # and the next call is served the same way


def test_a_callback_error_and_context_succeed_do_not_wait(agent):
    node_started(agent, """
        const forever = setInterval(() => {}, 1000);
        exports.handler = (event, context, callback) => {
          if (event.fail) callback(new RangeError('no'));
          else context.succeed('done');
        };
    """)
    assert agent.invoke({}) == "done"
    reply, _ = agent.exec({"fail": True})
    assert reply["type"] == "error" and reply["error"]["type"] == "RangeError"


def test_a_promise_answers_when_it_settles_with_work_still_pending(agent):
    node_started(agent, """
        exports.handler = async (event) => {
          setTimeout(() => {}, 60000);  // would hold the answer for a minute if it waited for the loop
          return 'settled';
        };
    """)
    assert agent.invoke({}) == "settled"
    assert agent.invoke({}) == "settled"


def test_a_promise_that_never_settles_answers_null_when_the_loop_runs_dry(agent):
    """As Lambda's node runtime: its default beforeExit listener answers null for the call in progress;
    node must not exit (that would be a RuntimeExit) and the next call must work."""
    node_started(agent, """
        let calls = 0;
        exports.handler = async () => (++calls === 1 ? new Promise(() => {}) : calls);
    """)
    assert agent.invoke({}) is None
    assert agent.invoke({}) == 2
