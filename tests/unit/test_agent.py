"""The guest agent as a machine driver runs it: a real process holding one end of a socketpair.

No sandbox is needed: each test starts the agent with the driver's command line, a scrubbed environment
and a scratch task directory, and drives it with ``nimbus.protocol`` frames.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from nimbus import protocol

SRC = Path(__file__).resolve().parents[2] / "src"
LAUNCH = f"import sys; sys.path.insert(0, {str(SRC)!r}); from nimbus.agent.main import main; main(sys.argv[1:])"
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
TIMEOUT_S = 30
LOG_TAIL_MAX = 64 * 1024
RESULT_MAX = 6 * 1024 * 1024

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: nodejs runtime untested")


class AgentProcess:
    """One agent process and the host's end of its channel."""

    def __init__(self, task_dir: Path, extra_env: dict | None = None) -> None:
        self.task_dir = task_dir
        self.sock, theirs = socket.socketpair()
        fd = theirs.fileno()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCH, "--fd", str(fd), "--task-dir", str(task_dir)],
                pass_fds=(fd,),
                env={**SANDBOX_ENV, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        finally:
            theirs.close()
        self.sock.settimeout(TIMEOUT_S)
        self.last_id = 0
        self.diagnostics = ""

    def send(self, header: dict, blob: bytes = b"") -> int:
        self.last_id += 1
        protocol.send_frame(self.sock, {**header, "id": self.last_id}, blob)
        return self.last_id

    def request(self, header: dict, blob: bytes = b"") -> tuple[dict, bytes]:
        sent_id = self.send(header, blob)
        reply, reply_blob = protocol.recv_frame(self.sock, protocol.GUEST_TYPES)
        assert reply["id"] == sent_id
        return reply, reply_blob

    def init(self, code: str, runtime: str = "python3", handler: str | None = None, filename: str | None = None,
             **fields) -> dict:
        module = "index" if runtime == "nodejs" else "main"
        header = {
            "type": "init",
            "runtime": runtime,
            "handler": handler or f"{module}.handler",
            "filename": filename or (f"{module}.js" if runtime == "nodejs" else f"{module}.py"),
            "env": {},
            "memory_mb": 256,
            "timeout_s": 30.0,
            "function_name": "hello",
            "function_version": "3",
            **fields,
        }
        blob = code if isinstance(code, bytes) else textwrap.dedent(code).encode()
        return self.request(header, blob)[0]

    def exec(self, event=None, raw: bytes | None = None, **fields) -> tuple[dict, bytes]:
        header = {"type": "exec", "invocation_id": "inv-1", "deadline_ms": 29000, **fields}
        return self.request(header, json.dumps(event).encode() if raw is None else raw)

    def invoke(self, event=None, **fields):
        """Exec and return the decoded result, failing the test on an error reply."""
        reply, output = self.exec(event, **fields)
        assert reply["type"] == "result", reply
        return json.loads(output)

    def wait(self) -> int:
        return self.proc.wait(TIMEOUT_S)

    def close(self) -> None:
        self.sock.close()
        try:
            _, stderr = self.proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, stderr = self.proc.communicate()
        self.diagnostics = stderr.decode(errors="replace")


@pytest.fixture
def agent(tmp_path):
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    process = AgentProcess(task_dir, extra_env={"DRIVER_SECRET": "must-not-leak"})
    yield process
    process.close()


def started(agent: AgentProcess, code: str, **fields) -> AgentProcess:
    """The agent after a successful init with ``code``."""
    reply = agent.init(code, **fields)
    assert reply["type"] == "init_ok", reply
    return agent


def assert_error(reply: dict, type_: str, fatal: bool = False) -> dict:
    assert reply["type"] == "error", reply
    assert reply["error"]["type"] == type_, reply["error"]
    assert reply["fatal"] is fatal
    return reply["error"]


# ---------------------------------------------------------------- channel basics


def test_ping_is_answered_before_and_after_init(agent):
    assert agent.request({"type": "ping"}) == ({"type": "pong", "id": 1}, b"")
    started(agent, "def handler(event, context):\n    return 1\n")
    assert agent.request({"type": "ping"})[0]["type"] == "pong"
    assert agent.invoke({}) == 1
    assert agent.request({"type": "ping"})[0]["type"] == "pong"


def test_eof_exits_cleanly(agent):
    agent.request({"type": "ping"})
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.wait() == 0


def test_unknown_frame_type_makes_the_agent_exit(agent):
    agent.send({"type": "reboot"})
    assert agent.wait() != 0
    assert agent.sock.recv(1) == b""


def test_malformed_frame_makes_the_agent_exit(agent):
    agent.sock.sendall(protocol.PREFIX.pack(5, 0) + b"nope!")
    assert agent.wait() != 0
    agent.close()
    assert "header is not JSON" in agent.diagnostics


def test_reply_ids_echo_the_request(agent):
    protocol.send_frame(agent.sock, {"type": "ping", "id": "abc"})
    assert protocol.recv_frame(agent.sock)[0] == {"type": "pong", "id": "abc"}


# ---------------------------------------------------------------- python3: init


def test_init_reports_its_duration(agent):
    reply = agent.init("def handler(event):\n    return event\n")
    assert reply["type"] == "init_ok"
    assert isinstance(reply["duration_ms"], (int, float))
    assert (agent.task_dir / "main.py").exists()


def test_init_syntax_error_is_fatal(agent):
    error = assert_error(agent.init("def handler(event:\n    return 1\n"), "SyntaxError", fatal=True)
    assert "main.py" in error["stack"]


def test_init_missing_handler(agent):
    error = assert_error(agent.init("def other(event):\n    return 1\n"), "HandlerNotFound", fatal=True)
    assert "handler" in error["message"]


def test_init_handler_not_callable(agent):
    assert_error(agent.init("handler = 42\n"), "HandlerNotFound", fatal=True)


def test_init_missing_module(agent):
    reply = agent.init("def handler(event):\n    return 1\n", handler="app.handler")
    assert_error(reply, "ImportModuleError", fatal=True)


def test_init_missing_dependency(agent):
    reply = agent.init("import no_such_package_here\ndef handler(event):\n    return 1\n")
    error = assert_error(reply, "ImportModuleError", fatal=True)
    assert "no_such_package_here" in error["message"]


def test_init_exception_at_module_level_keeps_its_type_and_output(agent):
    reply = agent.init("print('loading')\nraise RuntimeError('no config')\n")
    error = assert_error(reply, "RuntimeError", fatal=True)
    assert error["message"] == "no config"
    assert "raise RuntimeError" in error["stack"]
    assert reply["logs"] == "loading\n"


def test_init_system_exit_is_fatal(agent):
    assert_error(agent.init("import sys\nsys.exit(1)\n"), "RuntimeExit", fatal=True)


def test_init_unknown_runtime(agent):
    assert_error(agent.init("x", runtime="cobol"), "UnknownRuntime", fatal=True)


def test_init_rejects_a_path_as_filename(agent):
    assert_error(agent.init("x", filename="../evil.py"), "InvalidInit", fatal=True)


@pytest.mark.parametrize("layer", ["/tmp", "/opt/layer/", "opt/layer", "", 1, True, ["/opt/layer"]])
def test_init_refuses_any_layer_but_opt_layer(agent, layer):
    error = assert_error(agent.init("def handler(event):\n    return 1\n", layer=layer), "InvalidInit", fatal=True)
    assert "/opt/layer" in error["message"]


@pytest.mark.parametrize("fields", [{}, {"layer": None}], ids=["absent", "null"])
def test_init_without_a_layer_leaves_the_path_alone(agent, fields):
    started(agent, "import sys\ndef handler(event):\n    return sys.path\n", **fields)
    assert "/opt/layer" not in agent.invoke({})


def test_a_python_layer_comes_after_the_task_dir_and_the_standard_library(agent):
    started(agent, "import sys\ndef handler(event):\n    return sys.path\n", layer="/opt/layer")
    path = agent.invoke({})
    assert path[0] == str(agent.task_dir) and path[-1] == "/opt/layer" and path.count("/opt/layer") == 1, path


def test_second_init_is_refused(agent):
    started(agent, "def handler(event):\n    return 'first'\n")
    reply = agent.init("def handler(event):\n    return 'second'\n")
    assert_error(reply, "AlreadyInitialized", fatal=True)
    assert agent.invoke({}) == "first"


def test_exec_before_init_is_refused(agent):
    assert_error(agent.exec({})[0], "NotInitialized", fatal=True)


def test_zip_package_is_unpacked(agent, tmp_path):
    package = tmp_path / "package.zip"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("app.py", "from helpers import double\ndef handler(event):\n    return double(event)\n")
        archive.writestr("helpers.py", "def double(x):\n    return 2 * x\n")
    started(agent, package.read_bytes(), handler="app.handler", filename="package.zip")
    assert agent.invoke(21) == 42


def test_a_package_sent_as_a_tree_is_written_with_its_modes(agent, tmp_path):
    from nimbus import packages

    package = tmp_path / "package.zip"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("./app.py", "import os\nfrom lib.helpers import double\n"
                                     "def handler(event):\n    return [double(event), os.access('bin/tool', os.X_OK),\n"
                                     "            sorted(os.listdir('data'))]\n")
        archive.writestr("lib/__init__.py", "")
        archive.writestr("lib/helpers.py", "def double(x):\n    return 2 * x\n")
        tool = zipfile.ZipInfo("bin/tool")
        tool.external_attr = 0o100755 << 16
        archive.writestr(tool, "#!/bin/sh\n")
        archive.writestr("data/", "")  # an empty directory
    tree = packages.to_tree(package.read_bytes())
    started(agent, tree, handler="app.handler", filename=protocol.TREE_FILENAME)
    assert agent.invoke(21) == [42, True, []]


@pytest.mark.parametrize("index", [
    [["../escape.py", "", 0]], [["/abs.py", "", 0]], [["a/./b.py", "", 0]], [["ok.py", "?", 0]],
    [["ok.py", "", 99]], "not a list",
])
def test_a_tree_that_breaks_its_rules_fails_the_init(agent, index):
    raw = json.dumps(index).encode()
    blob = len(raw).to_bytes(4, "big") + raw
    assert_error(agent.init(blob, filename=protocol.TREE_FILENAME), "InvalidCode", fatal=True)


def _zip_of(entries: list[tuple[str, bytes, int]]) -> bytes:
    """``(name, data, unix mode)`` entries as zip bytes (no checks: the agent must make its own)."""
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, data)
    return buffer.getvalue()


APP = b"def handler(event):\n    return event\n"


def test_a_package_sent_as_its_zip_is_written_with_its_modes(agent):
    """A package too big for a tree comes as its zip: names normalised as for a tree, exec bits kept."""
    package = _zip_of([
        ("./app.py", b"import os\nfrom lib.helpers import double\n"
                     b"def handler(event):\n    return [double(event), os.access('bin/tool', os.X_OK),\n"
                     b"            os.access('lib/helpers.py', os.X_OK), sorted(os.listdir('data'))]\n", 0o100644),
        ("lib//__init__.py", b"", 0o100644),
        ("lib/helpers.py", b"def double(x):\n    return 2 * x\n", 0o100644),
        ("bin/tool", b"#!/bin/sh\n", 0o100755),
        ("data/", b"", 0o40755),
    ])
    started(agent, package, handler="app.handler", filename=protocol.ZIP_FILENAME)
    assert agent.invoke(21) == [42, True, False, []]


@pytest.mark.parametrize("entries", [
    [("app.py", APP, 0o100644), ("link", b"/etc/passwd", 0o120777)],
    [("app.py", APP, 0o100644), ("../escape.py", b"x", 0o100644)],
    [("app.py", APP, 0o100644), ("/abs.py", b"x", 0o100644)],
    [("app.py", APP, 0o100644), ("./app.py", b"x", 0o100644)],
    [("app.py", APP, 0o100644), ("lib", b"x", 0o100644), ("lib/x.py", b"x", 0o100644)],
    [("app.py", APP, 0o100644), ("lib/x.py", b"x", 0o100644), ("lib", b"x", 0o100644)],
], ids=["link", "dotdot", "absolute", "duplicate", "file-then-dir", "dir-then-file"])
def test_a_zip_that_breaks_the_rules_fails_the_init(agent, entries):
    reply = agent.init(_zip_of(entries), handler="app.handler", filename=protocol.ZIP_FILENAME)
    assert_error(reply, "InvalidCode", fatal=True)
    assert not os.path.lexists(agent.task_dir.parent / "escape.py")


def test_a_zip_entry_holding_more_than_it_declares_is_not_written_past_its_size(agent):
    package = bytearray(_zip_of([("app.py", APP, 0o100644), ("big.txt", b"y" * 5000, 0o100644)]))
    central = package.index(b"PK\x01\x02", package.index(b"PK\x01\x02") + 4)  # big.txt's central entry
    package[central + 24:central + 28] = (100).to_bytes(4, "little")  # it says 100 bytes unpacked
    reply = agent.init(bytes(package), handler="app.handler", filename=protocol.ZIP_FILENAME)
    assert_error(reply, "InvalidCode", fatal=True)
    assert (agent.task_dir / "big.txt").stat().st_size <= 100


# ---------------------------------------------------------------- python3: calls


def test_handler_with_event_and_context(agent):
    started(agent, "def handler(event, context):\n    return {'got': event, 'fn': context.function_name}\n")
    reply, output = agent.exec({"a": [1, 2]})
    assert reply["type"] == "result"
    assert json.loads(output) == {"got": {"a": [1, 2]}, "fn": "hello"}
    assert b" " not in output  # compact JSON
    assert isinstance(reply["duration_ms"], (int, float))
    assert reply["logs"] == "" and reply["logs_truncated"] is False


@pytest.mark.parametrize(
    "code",
    [
        "def handler(event):\n    return event\n",
        "def handler(event, context=None):\n    return event\n",
        "def handler(*args):\n    return args[0]\n",
        "class H:\n    def __call__(self, event):\n        return event\nhandler = H()\n",
        "import functools\ndef deco(f):\n    @functools.wraps(f)\n    def wrapper(*a):\n        return f(*a)\n"
        "    return wrapper\n@deco\ndef handler(event):\n    return event\n",
    ],
    ids=["event-only", "optional-context", "varargs", "callable-object", "decorated"],
)
def test_handler_signatures(agent, code):
    started(agent, code)
    assert agent.invoke({"k": "v"}) == {"k": "v"}


def test_none_result_is_null(agent):
    started(agent, "def handler(event):\n    pass\n")
    reply, output = agent.exec({})
    assert output == b"null"


def test_async_handler_runs_on_one_loop_for_the_machine(agent):
    started(
        agent,
        """
        import asyncio
        async def handler(event, context):
            await asyncio.sleep(0.01)
            return {"loop": id(asyncio.get_running_loop()), "x": event["x"]}
        """,
    )
    first = agent.invoke({"x": 1})
    second = agent.invoke({"x": 2})
    assert (first["x"], second["x"]) == (1, 2)
    assert first["loop"] == second["loop"]


def test_context_fields_and_remaining_time(agent):
    started(
        agent,
        """
        import time
        def handler(event, context):
            before = context.get_remaining_time_in_millis()
            time.sleep(0.2)
            return {
                "before": before,
                "after": context.get_remaining_time_in_millis(),
                "function_name": context.function_name,
                "function_version": context.function_version,
                "invocation_id": context.invocation_id,
                "aws_request_id": context.aws_request_id,
                "memory_limit_in_mb": context.memory_limit_in_mb,
            }
        """,
    )
    out = agent.invoke({}, invocation_id="inv-42", deadline_ms=5000)
    assert 4500 < out["before"] <= 5000
    assert out["before"] - out["after"] >= 190
    assert out["function_name"] == "hello"
    assert out["function_version"] == "3"
    assert out["invocation_id"] == out["aws_request_id"] == "inv-42"
    assert out["memory_limit_in_mb"] == "256"  # a string, as on Lambda


def test_environment_and_working_directory(agent):
    started(
        agent,
        "import os\ndef handler(event):\n    return {'env': dict(os.environ), 'cwd': os.getcwd()}\n",
        env={"GREETING": "hi", "AWS_LAMBDA_FUNCTION_NAME": "spoofed"},
    )
    out = agent.invoke({})
    env = out["env"]
    assert env["GREETING"] == "hi"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == env["NIMBUS_FUNCTION_NAME"] == "hello"
    assert env["AWS_LAMBDA_FUNCTION_VERSION"] == "3"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["PATH"] == SANDBOX_ENV["PATH"] and env["HOME"] == "/tmp" and env["LANG"] == "C.UTF-8"
    assert "DRIVER_SECRET" not in env
    assert out["cwd"] == str(agent.task_dir)


def test_module_state_survives_between_calls(agent):
    started(agent, "calls = 0\ndef handler(event):\n    global calls\n    calls += 1\n    return calls\n")
    assert [agent.invoke({}) for _ in range(3)] == [1, 2, 3]


# ---------------------------------------------------------------- python3: logs


def test_logs_capture_print_stderr_and_raw_writes_in_order(agent):
    started(
        agent,
        """
        import os, sys
        def handler(event):
            print("one")
            sys.stderr.write("two\\n")
            os.write(1, b"three\\n")
            os.write(2, b"four\\n")
            print("five", end="")
            return None
        """,
    )
    reply, _ = agent.exec({})
    assert reply["logs"] == "one\ntwo\nthree\nfour\nfive"
    assert reply["logs_truncated"] is False


def test_logs_belong_to_one_call(agent):
    started(agent, "def handler(event):\n    print('call', event)\n")
    assert agent.exec(1)[0]["logs"] == "call 1\n"
    assert agent.exec(2)[0]["logs"] == "call 2\n"


def test_module_level_output_goes_to_the_first_call(agent):
    started(agent, "print('cold start')\ndef handler(event):\n    print('call')\n")
    assert agent.exec({})[0]["logs"] == "cold start\ncall\n"
    assert agent.exec({})[0]["logs"] == "call\n"


def test_logs_keep_the_last_64_kib(agent):
    started(
        agent,
        """
        import os
        def handler(event):
            for i in range(2000):
                print(f"line {i:05d} " + "x" * 40)
            os.write(1, b"THE END\\n")
        """,
    )
    reply, _ = agent.exec({})
    assert reply["logs_truncated"] is True
    assert len(reply["logs"].encode()) == LOG_TAIL_MAX
    assert reply["logs"].endswith("line 01999 " + "x" * 40 + "\nTHE END\n")
    # Each call starts from an empty log: the next one returns the same tail, not more.
    assert agent.exec({})[0]["logs"] == reply["logs"]


def test_the_log_tail_never_starts_inside_a_character(agent):
    # 80,001 bytes: the last 64 KiB start in the middle of an "é" (two bytes in UTF-8).
    started(agent, "def handler(event):\n    print('é' * 40000 + '!', end='')\n")
    assert agent.exec({})[0]["logs"] == "é" * (LOG_TAIL_MAX // 2 - 1) + "!"


def test_a_log_flood_keeps_only_the_tail_and_no_file_grows(agent):
    """300 MB of output: the agent holds the 64 KiB tail in a pipe reader, never a file that grows with it."""
    started(agent, """
        import os
        def handler(event):
            chunk = b"x" * (1 << 20)
            for _ in range(300):
                os.write(1, chunk)
            print("THE END")
            return os.readlink("/proc/self/fd/1")
    """)
    reply, output = agent.exec({})
    assert reply["type"] == "result" and json.loads(output).startswith("pipe:"), reply
    assert reply["logs_truncated"] is True and len(reply["logs"].encode()) == LOG_TAIL_MAX
    assert reply["logs"].endswith("x" * 100 + "THE END\n")
    assert agent.exec({})[0]["logs"] == reply["logs"]  # and the next call starts from an empty log


def test_closing_the_agents_fds_loses_logs_not_the_agent(agent):
    """A function may close every fd it does not know (daemon-style): the agent reports it and carries on."""
    started(agent, """
        import os, sys
        def handler(event):
            print("before")
            if event == "close":
                channel = int(sys.argv[sys.argv.index("--fd") + 1])
                os.closerange(3, channel)
                os.closerange(channel + 1, 4096)
            try:
                print("after", event)
            except BrokenPipeError:  # the pipe has no reader now, unless the agent's drain thread
                pass                 # still held it for a moment: both are this function's doing
            return event
    """)
    reply, _ = agent.exec("close")
    assert reply["type"] == "result" and "closed the agent's log pipe" in reply["logs"], reply
    # A new pipe catches everything again. "after close" may lead it: when the drain thread still held the
    # old read end at the close, that line was written and is read late; it is this function's own output.
    assert agent.exec("again")[0]["logs"].endswith("before\nafter again\n")


# ---------------------------------------------------------------- python3: errors


def test_exception_becomes_an_error_with_stack_and_logs(agent):
    started(
        agent,
        """
        def check(event):
            raise ValueError(f"bad value {event['v']}")
        def handler(event, context):
            print("about to fail")
            check(event)
        """,
    )
    reply, output = agent.exec({"v": 7})
    error = assert_error(reply, "ValueError")
    assert output == b""
    assert error["message"] == "bad value 7"
    assert error["stack"].startswith("Traceback (most recent call last):")
    assert "main.py" in error["stack"] and "in check" in error["stack"]
    assert "nimbus/agent" not in error["stack"]
    assert reply["logs"] == "about to fail\n"
    assert isinstance(reply["duration_ms"], (int, float))
    # The machine keeps serving after a function error.
    assert agent.exec({"v": 8})[0]["error"]["message"] == "bad value 8"


def test_custom_exception_class_name(agent):
    started(agent, "class PaymentDeclined(Exception):\n    pass\n\ndef handler(event):\n    raise PaymentDeclined()\n")
    assert_error(agent.exec({})[0], "PaymentDeclined")


def test_system_exit_is_fatal(agent):
    started(agent, "import sys\ndef handler(event):\n    print('bye')\n    sys.exit(3)\n")
    reply, _ = agent.exec({})
    error = assert_error(reply, "RuntimeExit", fatal=True)
    assert error["message"] == "the function called sys.exit(3)"
    assert reply["logs"] == "bye\n"


def test_result_too_large(agent):
    started(agent, f"def handler(event):\n    return 'x' * {RESULT_MAX}\n")
    error = assert_error(agent.exec({})[0], "ResultTooLarge")
    assert str(RESULT_MAX + 2) in error["message"] and str(RESULT_MAX) in error["message"]


def test_result_at_the_limit_is_returned(agent):
    started(agent, f"def handler(event):\n    return 'x' * {RESULT_MAX - 2}\n")
    reply, output = agent.exec({})
    assert reply["type"] == "result"
    assert len(output) == RESULT_MAX


@pytest.mark.parametrize("value", ["object()", "float('nan')", "{1, 2}"])
def test_result_not_serializable(agent, value):
    started(agent, f"def handler(event):\n    return {value}\n")
    assert_error(agent.exec({})[0], "ResultNotSerializable")


def test_decimal_results_are_numbers(agent):
    started(agent, "from decimal import Decimal\ndef handler(event):\n    return [Decimal('2'), Decimal('1.5')]\n")
    assert agent.invoke({}) == [2, 1.5]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe\x00"])
def test_invalid_event(agent, raw):
    started(agent, "def handler(event):\n    return event\n")
    assert_error(agent.exec(raw=raw)[0], "InvalidEvent")
    assert agent.invoke(None) is None


def test_huge_error_message_is_clipped_to_fit_a_frame(agent):
    started(agent, "def handler(event):\n    raise ValueError('\\U0001F525' * 500_000)\n")
    error = assert_error(agent.exec({})[0], "ValueError")
    assert "characters cut" in error["message"]


# ---------------------------------------------------------------- nodejs


def node_started(agent: AgentProcess, code: str, **fields) -> AgentProcess:
    return started(agent, code, runtime="nodejs", **fields)


def node_messages(logs: str) -> list[str]:
    """Log lines without the time Lambda's console puts first (``<ISO time>\t<request id>\t<LEVEL>\t…``)."""
    return [re.sub(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\t", "", line) for line in logs.splitlines()]


def node_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("this kernel does not list /proc/<pid>/task/<tid>/children")
    return [int(child) for child in path.read_text().split()]


NODE_HANDLERS = {
    "async": "exports.handler = async (event, context) => ({ doubled: event.n * 2 });",
    "sync": "exports.handler = (event) => ({ doubled: event.n * 2 });",
    "promise": "exports.handler = (event) => new Promise((ok) => setTimeout(() => ok({ doubled: event.n * 2 }), 5));",
    "callback": (
        "exports.handler = (event, context, callback) => {\n"
        "  setTimeout(() => callback(null, { doubled: event.n * 2 }), 5);\n"
        "};"
    ),
    "context-succeed": "exports.handler = (event, context, cb) => { context.succeed({ doubled: event.n * 2 }); };",
    "esm": "export const handler = async (event) => ({ doubled: event.n * 2 });",
}


@needs_node
@pytest.mark.parametrize("style", list(NODE_HANDLERS))
def test_node_handler_styles(agent, style):
    filename = "index.mjs" if style == "esm" else "index.js"
    node_started(agent, NODE_HANDLERS[style], filename=filename)
    assert agent.invoke({"n": 21}) == {"doubled": 42}
    assert agent.invoke({"n": 2}) == {"doubled": 4}


@needs_node
def test_node_undefined_result_is_null(agent):
    node_started(agent, "exports.handler = async () => {};")
    assert agent.exec({})[1] == b"null"


@needs_node
def test_node_module_state_and_one_process_for_all_calls(agent):
    node_started(agent, "let calls = 0;\nexports.handler = async () => ({ calls: ++calls, pid: process.pid });")
    results = [agent.invoke({}) for _ in range(3)]
    assert [r["calls"] for r in results] == [1, 2, 3]
    assert len({r["pid"] for r in results}) == 1


@needs_node
def test_node_thrown_error(agent):
    node_started(
        agent,
        """
        class PaymentDeclined extends Error {
          constructor(message) { super(message); this.name = 'PaymentDeclined'; }
        }
        exports.handler = async (event) => {
          console.log('about to fail');
          if (event.kind === 'type') null.boom;
          throw new PaymentDeclined('card refused');
        };
        """,
    )
    reply, _ = agent.exec({})
    error = assert_error(reply, "PaymentDeclined")
    assert error["message"] == "card refused"
    assert "index.js" in error["stack"] and "node_runner" not in error["stack"]
    assert node_messages(reply["logs"]) == ["inv-1\tINFO\tabout to fail"]
    assert_error(agent.exec({"kind": "type"})[0], "TypeError")


@needs_node
def test_node_callback_error(agent):
    node_started(agent, "exports.handler = (event, context, cb) => cb(new RangeError('too far'));")
    assert assert_error(agent.exec({})[0], "RangeError")["message"] == "too far"


@needs_node
def test_node_logs(agent):
    node_started(
        agent,
        """
        exports.handler = async (event) => {
          console.log('log', event);
          console.error('error line');
          process.stdout.write('raw\\n');
          return null;
        };
        """,
    )
    reply, _ = agent.exec({"a": 1})
    assert node_messages(reply["logs"]) == ["inv-1\tINFO\tlog { a: 1 }", "inv-1\tERROR\terror line", "raw"]
    assert node_messages(agent.exec({"a": 2}, invocation_id="inv-2")[0]["logs"]) == [
        "inv-2\tINFO\tlog { a: 2 }", "inv-2\tERROR\terror line", "raw"]


@needs_node
def test_node_logs_keep_the_last_64_kib(agent):
    node_started(agent, "exports.handler = async () => { for (let i = 0; i < 2000; i++) console.log('y'.repeat(49)); };")
    reply, _ = agent.exec({})
    assert reply["logs_truncated"] is True
    assert len(reply["logs"]) == LOG_TAIL_MAX


@needs_node
def test_node_context(agent):
    node_started(
        agent,
        """
        exports.handler = async (event, context) => {
          const before = context.getRemainingTimeInMillis();
          await new Promise((ok) => setTimeout(ok, 200));
          return {
            before, after: context.getRemainingTimeInMillis(),
            functionName: context.functionName, functionVersion: context.functionVersion,
            invocationId: context.invocationId, awsRequestId: context.awsRequestId,
            memoryLimitInMB: context.memoryLimitInMB,
            env: { name: process.env.AWS_LAMBDA_FUNCTION_NAME, greeting: process.env.GREETING,
                   secret: process.env.DRIVER_SECRET || null },
            cwd: process.cwd(),
          };
        };
        """,
        env={"GREETING": "hi"},
    )
    out = agent.invoke({}, invocation_id="inv-7", deadline_ms=5000)
    assert 4500 < out["before"] <= 5000
    assert out["before"] - out["after"] >= 190
    assert out["functionName"] == "hello" and out["functionVersion"] == "3"
    assert out["invocationId"] == out["awsRequestId"] == "inv-7"
    assert out["memoryLimitInMB"] == "256"
    assert out["env"] == {"name": "hello", "greeting": "hi", "secret": None}
    assert out["cwd"] == str(agent.task_dir)


@needs_node
def test_node_process_exit_is_fatal(agent):
    node_started(agent, "exports.handler = async () => { console.log('bye'); process.exit(3); };")
    reply, _ = agent.exec({})
    error = assert_error(reply, "RuntimeExit", fatal=True)
    assert "code 3" in error["message"]
    assert node_messages(reply["logs"]) == ["inv-1\tINFO\tbye"]
    assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)
    assert agent.request({"type": "ping"})[0]["type"] == "pong"


@needs_node
def test_node_crash_outside_the_handler_is_fatal(agent):
    node_started(agent, "exports.handler = (e, c, cb) => { setTimeout(() => { throw new Error('late'); }, 1); };")
    reply, _ = agent.exec({})
    assert_error(reply, "RuntimeExit", fatal=True)
    assert "late" in reply["logs"]


@needs_node
@pytest.mark.parametrize(
    ("code", "handler", "expected"),
    [
        ("exports.handler = async (event => 1;", "index.handler", "SyntaxError"),
        ("exports.other = async () => 1;", "index.handler", "HandlerNotFound"),
        ("exports.handler = 42;", "index.handler", "HandlerNotFound"),
        ("exports.handler = async () => 1;", "app.handler", "ImportModuleError"),
        ("require('no-such-package'); exports.handler = async () => 1;", "index.handler", "ImportModuleError"),
        ("throw new TypeError('bad config');", "index.handler", "TypeError"),
        ("process.exit(5);", "index.handler", "RuntimeExit"),
    ],
    ids=["syntax", "missing-export", "not-a-function", "missing-module", "missing-dependency", "top-level-throw",
         "top-level-exit"],
)
def test_node_init_errors(agent, code, handler, expected):
    assert_error(agent.init(code, runtime="nodejs", handler=handler), expected, fatal=True)
    assert node_children(agent.proc.pid) == []  # the failed runtime was stopped


@needs_node
@pytest.mark.parametrize(
    ("code", "raw", "expected"),
    [
        ("exports.handler = async () => 10n;", b"{}", "ResultNotSerializable"),
        ("exports.handler = async (e) => e;", b"{oops", "InvalidEvent"),
        (f"exports.handler = async () => 'x'.repeat({RESULT_MAX});", b"{}", "ResultTooLarge"),
    ],
    ids=["bigint", "invalid-event", "too-large"],
)
def test_node_result_and_event_errors(agent, code, raw, expected):
    node_started(agent, code)
    assert_error(agent.exec(raw=raw)[0], expected)
    assert agent.request({"type": "ping"})[0]["type"] == "pong"


@needs_node
def test_node_large_event_and_result(agent):
    node_started(agent, "exports.handler = async (event) => event;")
    event = {"blob": "z" * (5 * 1024 * 1024)}
    assert agent.invoke(event) == event


@needs_node
def test_node_child_ends_with_the_agent(agent):
    node_started(agent, "exports.handler = async () => process.pid;")
    node_pid = agent.invoke({})
    assert node_children(agent.proc.pid) == [node_pid]
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.wait() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(node_pid, 0)


NODE_LAYER_PROBE = (
    "const fs = require('fs');\n"
    "exports.handler = async () => {\n"
    "  let link = null;\n"
    "  try { link = fs.readlinkSync('node_modules'); } catch (err) { link = err.code; }\n"
    "  return { link, nodePath: process.env.NODE_PATH || null };\n"
    "};\n"
)


@needs_node
def test_node_layer_is_linked_into_the_task_dir_and_on_node_path(agent):
    node_started(agent, NODE_LAYER_PROBE, layer="/opt/layer")
    assert agent.invoke({}) == {"link": "/opt/layer", "nodePath": "/opt/layer"}


@needs_node
def test_node_layer_keeps_the_functions_own_node_modules_and_node_path(agent, tmp_path):
    package = tmp_path / "package.zip"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("index.js", NODE_LAYER_PROBE)
        archive.writestr("node_modules/own/index.js", "module.exports = 1;\n")
    node_started(agent, package.read_bytes(), filename="package.zip", layer="/opt/layer", env={"NODE_PATH": "/tmp/x"})
    assert agent.invoke({}) == {"link": "EINVAL", "nodePath": "/tmp/x:/opt/layer"}


@needs_node
def test_node_without_a_layer_gets_no_link(agent):
    node_started(agent, NODE_LAYER_PROBE)
    assert agent.invoke({}) == {"link": "ENOENT", "nodePath": None}


# ---------------------------------------------------------------- sealing /var/task (template machines)


def test_the_seal_fd_is_parsed_and_optional():
    from nimbus.agent import main as agent_main

    assert agent_main.parse_args(["--fd", "10", "--seal-fd=11"]).seal_fd == 11
    assert agent_main.parse_args([]).seal_fd is None
    with pytest.raises(ValueError):
        agent_main.parse_args(["--seal-fd", "-1"])


@pytest.mark.parametrize(("answer", "ok"), [(b"k", True), (b"[Errno 30] EROFS", False), (b"", False)])
def test_the_agent_asks_its_init_once_and_fails_the_init_when_it_is_not_sealed(answer, ok):
    from nimbus.agent import main as agent_main
    from nimbus.agent.base import InvocationError

    agent_end, init_end = socket.socketpair()
    fd = agent_end.detach()
    if answer:
        init_end.sendall(answer)  # answered before it is asked: the request waits in the buffer
    else:
        init_end.close()  # an init that went away
    if ok:
        agent_main._seal(fd)
    else:
        with pytest.raises(InvocationError) as info:
            agent_main._seal(fd)
        assert info.value.type == "SealFailed" and info.value.fatal
    with pytest.raises(OSError):
        os.fstat(fd)  # closed either way: the function never sees it
    if answer:
        assert init_end.recv(1) == agent_main.SEAL_REQUEST
        init_end.close()
    agent_main._seal(None)  # a booted machine: nothing to ask


# ---------------------------------------------------------------- restored machines: entropy, reconnecting


RANDOM_HANDLER = """
    import os, random

    def handler(event, context):
        return {"random": random.random(), "urandom": os.urandom(8).hex()}
"""


def test_init_with_entropy_is_accepted_and_reseeds(agent):
    started(agent, RANDOM_HANDLER, entropy=os.urandom(32).hex())
    first, second = agent.invoke({}), agent.invoke({})
    assert first["urandom"] != second["urandom"]


@pytest.mark.parametrize("entropy", ["not hex", 42, "ab" * 600])
def test_init_with_bad_entropy_fails_plainly(agent, entropy):
    error = assert_error(agent.init(RANDOM_HANDLER, entropy=entropy), "InvalidInit", fatal=True)
    assert "entropy" in error["message"]


def test_reseeding_changes_a_random_module_imported_before_it(monkeypatch):
    """Clones of one snapshot share the ``random`` state an agent imported before it was taken."""
    import random

    from nimbus.agent import main as agent_main

    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    agent_main._reseed({"entropy": os.urandom(32).hex()})
    assert random.random() != expected
    random.seed(1234)
    agent_main._reseed({})  # no entropy (a machine that was not restored): nothing changes
    assert random.random() == expected


def test_listener_mode_serves_each_connection_with_one_function(tmp_path):
    """As under Firecracker: a snapshot restore drops the host's connection and the host connects again."""
    import threading

    from nimbus.agent import main as agent_main
    from nimbus.agent.logs import LogCapture

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen(1)
    task = tmp_path / "task"
    task.mkdir()
    agent_obj = agent_main.Agent(None, str(task), LogCapture())
    status = []
    thread = threading.Thread(target=lambda: status.append(agent_main.serve_listener(agent_obj, listener)),
                              daemon=True)
    thread.start()

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT_S)
        sock.connect(str(tmp_path / "agent.sock"))
        return sock

    with connect() as first:
        protocol.send_frame(first, {"type": "ping", "id": 1})
        assert protocol.recv_frame(first, protocol.GUEST_TYPES)[0] == {"type": "pong", "id": 1}
        header = {"type": "init", "runtime": "python3", "handler": "main.handler", "filename": "main.py",
                  "env": {}, "memory_mb": 128, "timeout_s": 5.0, "id": 2}
        protocol.send_frame(first, header, b"def handler(event, context):\n    return event * 2\n")
        assert protocol.recv_frame(first, protocol.GUEST_TYPES)[0]["type"] == "init_ok"
    with connect() as second:  # the function loaded over the first connection is still there
        protocol.send_frame(second, {"type": "exec", "id": 1, "invocation_id": "i", "deadline_ms": 5000}, b"21")
        reply, output = protocol.recv_frame(second, protocol.GUEST_TYPES)
        assert reply["type"] == "result" and output == b"42", reply
    with connect() as third:  # a protocol violation ends the machine, as in the fd mode
        third.sendall(b"\xff" * 16)
        thread.join(TIMEOUT_S)
    assert status == [agent_main.EXIT_PROTOCOL]
    agent_obj.close()
    listener.close()


# ---------------------------------------------------------------- security review: findings 6 and 8


@pytest.mark.parametrize("depth, over", [(protocol.NESTING_MAX, False), (protocol.NESTING_MAX + 1, True),
                                         (100_000, True)])
def test_nesting_over_counts_arrays_and_objects_not_brackets_in_strings(depth, over):
    raw = ('{"a":' * (depth // 2) + "[" * (depth - depth // 2) + "]" * (depth - depth // 2) + "}" * (depth // 2))
    assert protocol.nesting_over(raw.encode()) is over
    assert protocol.nesting_over(json.dumps({"s": "[" * 100_000}).encode()) is False


async def test_read_frame_refuses_an_oversized_announcement_before_reading_the_body():
    import asyncio

    reader = asyncio.StreamReader()
    reader.feed_data(protocol.PREFIX.pack(20, 60 << 20))  # the body never comes: only the prefix can be judged
    with pytest.raises(protocol.FrameTooLarge, match=str(60 << 20)):
        await asyncio.wait_for(protocol.read_frame(reader, protocol.GUEST_TYPES, max_blob=6 << 20), TIMEOUT_S)
