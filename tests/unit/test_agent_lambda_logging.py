"""Lambda's logging in the agent (issue 17 items 4 and 7): Python's root logger and node's console write
Lambda's lines, and output written after a call's answer never shows up in the next call's logs.

Formats checked against awslambdaric 4.2.2 (``bootstrap._setup_logging``, ``JsonFormatter``) and
aws-lambda-ric 3.3.0 (``LogPatch.js``).
"""

import json
import re
import time
from pathlib import Path

import pytest
from test_agent import agent, needs_node, started  # noqa: F401 - agent is a fixture

PY_TEXT_LINE = re.compile(r"\[(\w+)\]\t(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\t([^\t]*)\t(.*)")
NODE_TEXT_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\t([^\t]*)\t(\w+)\t(.*)")
DROPPED = re.compile(r"\[nimbus: (\d+) bytes written between calls were dropped\]\n")

AWS_PATTERN = """
import logging
logger = logging.getLogger()
logger.setLevel(logging.INFO)
logger.info("cold start")

def handler(event, context):
    logger.debug("not at INFO")
    logger.info("got %s", event["n"])
    logging.getLogger("app.db").warning("slow query")
    try:
        raise KeyError("missing")
    except KeyError:
        logger.exception("lookup failed")
    return context.aws_request_id
"""


def lines(logs: str, pattern: re.Pattern) -> list[tuple]:
    return [match.groups() for match in map(pattern.fullmatch, logs.splitlines()) if match]


def test_python_root_logger_writes_lambdas_text_lines(agent):
    started(agent, AWS_PATTERN)
    reply, output = agent.exec({"n": 1}, invocation_id="req-one")
    assert reply["type"] == "result", reply
    found = [(level, request, message) for level, _, request, message in lines(reply["logs"], PY_TEXT_LINE)]
    assert found == [("INFO", "", "cold start"), ("INFO", "req-one", "got 1"), ("WARNING", "req-one", "slow query"),
                     ("ERROR", "req-one", "lookup failed")]
    assert 'Traceback (most recent call last):' in reply["logs"] and "KeyError: 'missing'" in reply["logs"]
    stamp = lines(reply["logs"], PY_TEXT_LINE)[1][1]
    assert abs(time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(time.gmtime())) < 300
    second, _ = agent.exec({"n": 2}, invocation_id="req-two")
    assert [found[2] for found in lines(second["logs"], PY_TEXT_LINE)] == ["req-two"] * 3


def test_python_json_logs_with_level_error_fields_and_extra(agent):
    started(agent, """
        import logging
        log = logging.getLogger("orders")
        def handler(event, context):
            log.debug("hidden at INFO")
            log.info("placed", extra={"order": 7})
            log.info({"structured": True})
            try:
                1 / 0
            except ZeroDivisionError:
                log.exception("failed %s", "badly")
    """, env={"AWS_LAMBDA_LOG_FORMAT": "JSON"})
    reply, _ = agent.exec({}, invocation_id="req-json")
    records = [json.loads(line) for line in reply["logs"].splitlines()]
    assert [record["level"] for record in records] == ["INFO", "INFO", "ERROR"]  # JSON logs at INFO by default
    placed, structured, failed = records
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", placed["timestamp"])
    assert placed == {"timestamp": placed["timestamp"], "level": "INFO", "message": "placed", "logger": "orders",
                      "requestId": "req-json", "order": 7}
    assert structured["message"] == {"structured": True}
    assert failed["message"] == "failed badly" and failed["errorType"] == "ZeroDivisionError"
    assert failed["errorMessage"] == "division by zero" and "1 / 0" in "".join(failed["stackTrace"])
    assert failed["location"].endswith("main.py:handler:11")  # the dedented source starts with a newline


@pytest.mark.parametrize(("level", "expected"), [("WARN", ["WARNING"]), ("DEBUG", ["DEBUG", "INFO", "WARNING"]),
                                                 ("TRACE", ["DEBUG", "INFO", "WARNING"])])
def test_python_log_level_from_the_environment(agent, level, expected):
    started(agent, """
        import logging
        def handler(event, context):
            for name in ("debug", "info", "warning"):
                getattr(logging.getLogger("x"), name)(name)
    """, env={"AWS_LAMBDA_LOG_LEVEL": level})
    logs = agent.exec({})[0]["logs"]
    assert [found[0] for found in lines(logs, PY_TEXT_LINE)] == expected


def test_logging_is_configured_when_imported_late_and_never_imported_for_nothing(agent):
    started(agent, """
        import sys
        def handler(event, context):
            if event == "import":
                import logging
                logging.warning("late import")
            return "logging" in sys.modules
    """)
    assert agent.invoke("probe") is False  # a function that never imports logging does not pay for it
    reply, output = agent.exec("import", invocation_id="req-late")
    assert json.loads(output) is True
    assert [found[2:] for found in lines(reply["logs"], PY_TEXT_LINE)] == [("req-late", "late import")]


def test_output_of_a_python_thread_after_the_answer_is_dropped_and_said(agent, tmp_path):
    """A thread left running writes after the call's answer: the next call's logs say so, not show it."""
    go, done = tmp_path / "go", tmp_path / "done"
    started(agent, f"""
        import os, threading, time
        def late():
            while not os.path.exists({str(go)!r}):
                time.sleep(0.01)
            print("written late")
            os.write(2, b"raw late" * 10)
            open({str(done)!r}, "w").close()
        def handler(event, context):
            print("call", event)
            if event == 1:
                threading.Thread(target=late).start()
    """)
    assert agent.exec(1)[0]["logs"] == "call 1\n"
    go.touch()
    wait_for(done)
    logs = agent.exec(2)[0]["logs"]
    assert logs == "[nimbus: 93 bytes written between calls were dropped]\ncall 2\n"
    assert agent.exec(3)[0]["logs"] == "call 3\n"


def wait_for(path: Path) -> None:
    """Until the function says it has written (a marker file), with the agent tests' own time bound."""
    for _ in range(3000):
        if path.exists():
            return
        time.sleep(0.01)
    raise AssertionError(f"{path} never appeared")


@needs_node
def test_node_console_writes_lambdas_text_lines(agent):
    started(agent, """
        console.log('loading');
        exports.handler = async (event) => {
          console.log('log', { n: event.n });
          console.info('info'); console.warn('warn'); console.error('error'); console.debug('debug');
          console.trace('trace'); console.fatal('fatal'); console.log();
          process.stdout.write('raw\\n');
        };
    """, runtime="nodejs")
    reply, _ = agent.exec({"n": 1}, invocation_id="req-node")
    found = [(request, level, message) for _, request, level, message in lines(reply["logs"], NODE_TEXT_LINE)]
    assert found == [("undefined", "INFO", "loading"), ("req-node", "INFO", "log { n: 1 }"),
                     ("req-node", "INFO", "info"), ("req-node", "WARN", "warn"), ("req-node", "ERROR", "error"),
                     ("req-node", "DEBUG", "debug"), ("req-node", "TRACE", "trace"),
                     ("req-node", "FATAL", "fatal"), ("req-node", "INFO", "undefined")]
    assert reply["logs"].endswith("\traw\n") is False and reply["logs"].endswith("\nraw\n")


@needs_node
def test_node_json_logs_with_errors_and_level(agent):
    started(agent, """
        exports.handler = async () => {
          console.debug('hidden at INFO');
          console.log({ order: 7 });
          console.warn('two', 'parts');
          const err = new RangeError('too far');
          console.error('failed:', err);
          console.error(err);
        };
    """, runtime="nodejs", env={"AWS_LAMBDA_LOG_FORMAT": "json"})
    reply, _ = agent.exec({}, invocation_id="req-json")
    records = [json.loads(line) for line in reply["logs"].splitlines()]
    assert [record["level"] for record in records] == ["INFO", "WARN", "ERROR", "ERROR"]
    assert all(record["requestId"] == "req-json" for record in records)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", records[0]["timestamp"])
    assert records[0]["message"] == {"order": 7} and records[1]["message"] == "two parts"
    assert records[2]["message"].startswith("failed: RangeError: too far")
    assert records[2]["errorType"] == "RangeError" and records[2]["errorMessage"] == "too far"
    assert records[3]["message"]["errorType"] == "RangeError" and records[3]["message"]["stackTrace"][0] == \
        "RangeError: too far"


@needs_node
def test_node_log_level_from_the_environment(agent):
    started(agent, "exports.handler = async () => { console.debug('d'); console.info('i'); console.warn('w'); };",
            runtime="nodejs", env={"AWS_LAMBDA_LOG_LEVEL": "warn"})
    logs = agent.exec({})[0]["logs"]
    assert [found[2] for found in lines(logs, NODE_TEXT_LINE)] == ["WARN"]


@needs_node
def test_output_of_a_node_timer_after_the_answer_is_dropped_and_said(agent, tmp_path):
    go, done = tmp_path / "go", tmp_path / "done"
    started(agent, f"""
        const fs = require('fs');
        exports.handler = async (event) => {{
          console.log('call', event);
          if (event !== 1) return;
          const poll = setInterval(() => {{
            if (!fs.existsSync({str(go)!r})) return;
            clearInterval(poll);
            process.stdout.write('late\\n');
            fs.writeFileSync({str(done)!r}, '');
          }}, 10);
        }};
    """, runtime="nodejs")
    assert agent.exec(1)[0]["logs"].endswith("\tcall 1\n")
    go.touch()
    wait_for(done)
    logs = agent.exec(2)[0]["logs"]
    assert DROPPED.match(logs).group(1) == "5" and "late" not in logs and logs.endswith("\tcall 2\n")
