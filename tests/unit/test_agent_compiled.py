"""The guest agent's compiled runtimes (``go``, ``rust``, ``wasm``) outside a sandbox.

Artifacts are built here with the host's toolchains, as the compiler would: the Go handler with the
generated ``runtimes/nimbus_main.go`` (``CGO_ENABLED=0 go build -trimpath``), the Rust program with
``rustc -O``, and WASI modules written in WAT, converted with ``wasmtime.wat2wasm`` and serialized with
the agent's own ``make_engine()``. The agent runs as a machine driver runs it (see ``test_agent.py``),
with the wasmtime package alone put on its path, as the bwrap driver binds it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_agent import RESULT_MAX, SANDBOX_ENV, SRC, AgentProcess, assert_error

from nimbus.machines import layout
from toolchain_builds import go_binary, rust_binary

GO_HANDLER = r"""
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
)

type PaymentDeclined struct{ Amount int }

func (e *PaymentDeclined) Error() string { return fmt.Sprintf("card refused for %d", e.Amount) }

var calls int

type request struct {
	Action string `json:"action"`
	N      int    `json:"n"`
}

func Handle(event json.RawMessage) (any, error) {
	calls++
	var req request
	if err := json.Unmarshal(event, &req); err != nil {
		return nil, err
	}
	fmt.Println("call", calls, req.Action)
	fmt.Fprintln(os.Stderr, "stderr line")
	switch req.Action {
	case "error":
		return nil, &PaymentDeclined{Amount: req.N}
	case "plain-error":
		return nil, errors.New("plain failure")
	case "huge-error":
		return nil, errors.New(strings.Repeat("\U0001F525", 500000)) // 2 MB: over a frame header's limit
	case "panic":
		var counts map[string]int
		counts["boom"]++ // a nil map: a runtime panic
	case "panic-value":
		panic(fmt.Sprintf("custom panic %d", req.N))
	case "unserializable":
		return make(chan int), nil
	case "big":
		return strings.Repeat("x", 7<<20), nil
	case "exit":
		os.Exit(3)
	case "null":
		return nil, nil
	case "env":
		cwd, _ := os.Getwd()
		return map[string]string{"name": os.Getenv("AWS_LAMBDA_FUNCTION_NAME"), "greeting": os.Getenv("GREETING"),
			"secret": os.Getenv("DRIVER_SECRET"), "cwd": cwd}, nil
	}
	return map[string]any{"calls": calls, "pid": os.Getpid(), "event": event}, nil
}
"""

RUST_PROGRAM = r"""
use std::io::{self, BufRead, Write};

fn main() {
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    let mut count: u64 = 0;
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        count += 1;
        eprintln!("event {} has {} bytes", count, line.len());
        if line.contains("\"exit\"") {
            std::process::exit(3);
        } else if line.contains("\"panic\"") {
            panic!("boom at event {}", count);
        } else if line.contains("\"garbage\"") {
            writeln!(out, "this is not json").unwrap();
        } else if line.contains("\"big\"") {
            writeln!(out, "\"{}\"", "x".repeat(7 << 20)).unwrap();
        } else if line.contains("\"two-lines\"") {
            writeln!(out, "1\n2").unwrap();
        } else {
            writeln!(out, "{{\"count\":{},\"pid\":{},\"event\":{}}}", count, std::process::id(), line).unwrap();
        }
        out.flush().unwrap();
    }
}
"""

# WASI modules. Memory layout shared by all: iovecs at 0..32, scratch below 1024, the input buffer at 1024.
WASI_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (func $read (result i32)
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.const 60000))
    (drop (call $fd_read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 24)))
    (i32.load (i32.const 24)))
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
"""

WAT = {
    # cat: every byte read comes back, so each event line is its own result line.
    "echo": f"""(module {WASI_IMPORTS}
  (memory (export "memory") 2)
  (func (export "_start") (local $n i32)
    (loop $next
      (local.set $n (call $read))
      (if (i32.eqz (local.get $n)) (then (return)))
      (call $write (i32.const 1) (i32.const 1024) (local.get $n))
      (br $next))))""",
    # Answers each line with {{"count":N}}, N kept in a global across calls; logs "counted" on stderr.
    "counter": f"""(module {WASI_IMPORTS}
  (memory (export "memory") 2)
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 100) "{{\\"count\\":")
  (data (i32.const 200) "counted\\n")
  (func (export "_start") (local $n i32) (local $i i32) (local $v i32) (local $p i32)
    (loop $next
      (local.set $n (call $read))
      (if (i32.eqz (local.get $n)) (then (return)))
      (local.set $i (i32.const 0))
      (block $done (loop $scan
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.eq (i32.load8_u (i32.add (i32.const 1024) (local.get $i))) (i32.const 10))
          (then
            (global.set $count (i32.add (global.get $count) (i32.const 1)))
            (call $write (i32.const 2) (i32.const 200) (i32.const 8))
            (local.set $v (global.get $count))
            (local.set $p (i32.const 340))
            (loop $digit
              (local.set $p (i32.sub (local.get $p) (i32.const 1)))
              (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
              (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
              (br_if $digit (local.get $v)))
            (i32.store8 (i32.const 340) (i32.const 125))
            (i32.store8 (i32.const 341) (i32.const 10))
            (call $write (i32.const 1) (i32.const 100) (i32.const 9))
            (call $write (i32.const 1) (local.get $p) (i32.sub (i32.const 342) (local.get $p)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
      (br $next))))""",
    # Reads its event, then spins in wasm code forever: only the epoch deadline stops it.
    "spin": f"""(module {WASI_IMPORTS}
  (memory (export "memory") 2)
  (func (export "_start")
    (drop (call $read))
    (loop $forever (br $forever))))""",
    # Reads events and never answers: blocked in fd_read, where no epoch trap can land.
    "swallow": f"""(module {WASI_IMPORTS}
  (memory (export "memory") 2)
  (func (export "_start")
    (loop $next (br_if $next (call $read)))))""",
    # Grows its memory a page at a time; when memory.grow fails it gives up, as an allocator would.
    "grow": f"""(module {WASI_IMPORTS}
  (memory (export "memory") 2)
  (func (export "_start")
    (drop (call $read))
    (loop $more
      (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
      (br $more))))""",
    # Answers the first event, then calls proc_exit(7) on the second, saying goodbye on stderr.
    "exit": f"""(module {WASI_IMPORTS}
  (memory (export "memory") 2)
  (data (i32.const 200) "bye\\n")
  (data (i32.const 220) "1\\n")
  (func (export "_start")
    (drop (call $read))
    (call $write (i32.const 1) (i32.const 220) (i32.const 2))
    (drop (call $read))
    (call $write (i32.const 2) (i32.const 200) (i32.const 4))
    (call $proc_exit (i32.const 7))))""",
    # Divides by zero in a named function after reading its event.
    "trap": f"""(module {WASI_IMPORTS}
  (memory (export "memory") 2)
  (func $divide (param i32) (result i32) (i32.div_u (i32.const 1) (local.get 0)))
  (func (export "_start") (local $n i32)
    (local.set $n (call $read))
    (drop (call $divide (i32.sub (local.get $n) (local.get $n))))))""",
    # Needs 100 pages (6.25 MiB) before it runs at all.
    "huge-memory": """(module (memory (export "memory") 100) (func (export "_start")))""",
    # Imports something WASI does not provide.
    "unknown-import": """(module (import "env" "missing" (func)) (func (export "_start")))""",
    # Not a command module: nothing to run.
    "no-start": """(module (memory (export "memory") 1) (func (export "main")))""",
}


# ---------------------------------------------------------------- building the artifacts


@pytest.fixture(scope="session")
def go_bootstrap(tmp_path_factory) -> bytes:
    return go_binary(tmp_path_factory.mktemp("go"), GO_HANDLER)


@pytest.fixture(scope="session")
def rust_bootstrap(tmp_path_factory) -> bytes:
    return rust_binary(tmp_path_factory.mktemp("rust"), RUST_PROGRAM)


@pytest.fixture(scope="session")
def wasmtime_site(tmp_path_factory) -> Path:
    """A directory holding only the wasmtime package, as bwrap machines see it under WASMTIME_SITE.

    Empty without wasmtime: the go and rust tests still run, the wasm ones skip (see ``cwasm``).
    """
    site = tmp_path_factory.mktemp("site")
    package = layout.wasmtime_package()
    if package is not None:
        (site / "wasmtime").symlink_to(package)
    return site


@pytest.fixture(scope="session")
def cwasm():
    """``cwasm(name)``: the serialized module the compiler would store for ``WAT[name]``."""
    wasmtime = pytest.importorskip("wasmtime")
    from nimbus.agent.wasm import make_engine

    engine = make_engine()
    built = {}

    def build(name: str) -> bytes:
        if name not in built:
            built[name] = bytes(wasmtime.Module(engine, wasmtime.wat2wasm(WAT[name])).serialize())
        return built[name]

    return build


# ---------------------------------------------------------------- the agent


class CompiledAgent(AgentProcess):
    """test_agent's AgentProcess, launched with an extra import path (the wasmtime package alone)."""

    def __init__(self, task_dir: Path, site: Path, extra_env: dict | None = None) -> None:
        self.task_dir = task_dir
        launch = (f"import sys; sys.path[:0] = [{str(SRC)!r}, {str(site)!r}]; "
                  "from nimbus.agent.main import main; main(sys.argv[1:])")
        self.sock, theirs = socket.socketpair()
        fd = theirs.fileno()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", launch, "--fd", str(fd), "--task-dir", str(task_dir)],
                pass_fds=(fd,), env={**SANDBOX_ENV, **(extra_env or {})},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        finally:
            theirs.close()
        self.sock.settimeout(60)
        self.last_id = 0
        self.diagnostics = ""

    def load(self, runtime: str, artifact: bytes, **fields) -> "CompiledAgent":
        filename = "module.cwasm" if runtime == "wasm" else "bootstrap"
        handler = {"go": "main.Handle", "rust": "main.main", "wasm": "module._start"}[runtime]
        reply = self.init(artifact, runtime=runtime, handler=handler, filename=filename, **fields)
        assert reply["type"] == "init_ok", reply
        return self

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if not path.exists():
            pytest.skip("this kernel does not list /proc/<pid>/task/<tid>/children")
        return [int(child) for child in path.read_text().split()]


@pytest.fixture
def agent(tmp_path, wasmtime_site):
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    process = CompiledAgent(task_dir, wasmtime_site, extra_env={"DRIVER_SECRET": "must-not-leak"})
    yield process
    process.close()


def assert_alive(agent: CompiledAgent) -> None:
    assert agent.request({"type": "ping"})[0]["type"] == "pong"


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ---------------------------------------------------------------- init


def test_handler_is_not_checked_for_compiled_runtimes(agent, rust_bootstrap):
    reply = agent.init(rust_bootstrap, runtime="rust", handler="", filename="bootstrap")
    assert reply["type"] == "init_ok", reply
    assert os.stat(agent.task_dir / "bootstrap").st_mode & 0o777 == 0o755


def test_an_artifact_that_is_no_program_fails_the_init(agent):
    assert_error(agent.init(b"\x00garbage", runtime="go", handler="main.Handle", filename="bootstrap"),
                 "RuntimeUnavailable", fatal=True)


def test_a_go_artifact_must_answer_the_ping(agent, rust_bootstrap):
    # A program that does not speak frames on fds 3/4 (here it dies reading them) fails the init.
    reply = agent.init(rust_bootstrap, runtime="go", handler="main.Handle", filename="bootstrap")
    assert_error(reply, "RuntimeExit", fatal=True)
    assert agent.children() == []


# ---------------------------------------------------------------- go


def test_go_results_and_hot_reuse(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    first = agent.invoke({"n": 1})
    second = agent.invoke({"n": 2, "nested": {"list": [1, "two"]}})
    assert (first["calls"], second["calls"]) == (1, 2)
    assert first["pid"] == second["pid"] == agent.children()[0]
    assert second["event"] == {"n": 2, "nested": {"list": [1, "two"]}}
    assert agent.exec({"action": "null"})[1] == b"null"


def test_go_logs_come_from_stdout_and_stderr(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    reply, _ = agent.exec({"action": "log"})
    assert reply["type"] == "result"
    assert reply["logs"] == "call 1 log\nstderr line\n"
    assert agent.exec({"action": "again"})[0]["logs"] == "call 2 again\nstderr line\n"


def test_go_environment_and_working_directory(agent, go_bootstrap):
    agent.load("go", go_bootstrap, env={"GREETING": "hi"})
    out = agent.invoke({"action": "env"})
    assert out == {"name": "hello", "greeting": "hi", "secret": "", "cwd": str(agent.task_dir)}


def test_go_returned_errors_keep_their_type(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    reply, output = agent.exec({"action": "error", "n": 42})
    error = assert_error(reply, "PaymentDeclined")
    assert error["message"] == "card refused for 42" and output == b""
    assert reply["logs"] == "call 1 error\nstderr line\n"
    assert assert_error(agent.exec({"action": "plain-error"})[0], "Error")["message"] == "plain failure"
    assert agent.invoke({})["calls"] == 3


def test_go_huge_error_message_is_clipped_to_fit_a_frame(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    error = assert_error(agent.exec({"action": "huge-error"})[0], "Error")
    assert "bytes cut" in error["message"] and error["message"].startswith("\U0001F525")
    assert agent.invoke({})["calls"] == 2


def test_go_panic_is_reported_and_the_program_serves_on(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    pid = agent.invoke({})["pid"]
    error = assert_error(agent.exec({"action": "panic"})[0], "Panic")
    assert "assignment to entry in nil map" in error["message"]
    assert error["stack"].startswith("goroutine ")
    assert "main.Handle" in error["stack"] and "handler.go" in error["stack"]
    assert "nimbus_main.go" not in error["stack"] and "debug.Stack" not in error["stack"]  # machinery cut out
    assert assert_error(agent.exec({"action": "panic-value", "n": 9})[0], "Panic")["message"] == "custom panic 9"
    after = agent.invoke({})
    assert after["pid"] == pid and after["calls"] == 4


def test_go_result_errors_are_not_fatal(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    assert_error(agent.exec({"action": "unserializable"})[0], "ResultNotSerializable")
    error = assert_error(agent.exec({"action": "big"})[0], "ResultTooLarge")
    assert str(RESULT_MAX) in error["message"]
    assert agent.invoke({})["calls"] == 3


def test_go_exit_is_fatal_and_quotes_the_code(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    pid = agent.invoke({})["pid"]
    reply, _ = agent.exec({"action": "exit"})
    error = assert_error(reply, "RuntimeExit", fatal=True)
    assert "exited with code 3 during the call" in error["message"]
    assert reply["logs"] == "call 2 exit\nstderr line\n"
    assert "before this call" in assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)["message"]
    assert_alive(agent)
    assert_gone(pid)


def test_go_program_ends_with_the_agent(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    pid = agent.invoke({})["pid"]
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.wait() == 0
    assert_gone(pid)


def test_go_killed_by_a_signal(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    pid = agent.invoke({})["pid"]
    os.kill(pid, 9)
    error = assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)
    assert "killed by signal 9" in error["message"]


def test_go_large_event_and_result(agent, go_bootstrap):
    agent.load("go", go_bootstrap)
    event = {"blob": "z" * (5 << 20)}
    assert agent.invoke(event)["event"] == event


# ---------------------------------------------------------------- rust


def test_rust_results_and_hot_reuse(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    first = agent.invoke({"n": 1})
    second = agent.invoke({"n": 2})
    assert (first["count"], second["count"]) == (1, 2)
    assert first["pid"] == second["pid"] == agent.children()[0]
    assert second["event"] == {"n": 2}


def test_rust_logs_come_from_stderr(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    reply, _ = agent.exec(raw=b'{"a":1}')
    assert reply["logs"] == "event 1 has 7 bytes\n"
    assert agent.exec(raw=b'{"a":22}')[0]["logs"] == "event 2 has 8 bytes\n"


def test_rust_event_newlines_become_spaces(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    reply, output = agent.exec(raw=b'{"text": "two\\nlines",\r\n "n": 1}')
    assert reply["type"] == "result", reply
    assert json.loads(output)["event"] == {"text": "two\nlines", "n": 1}
    assert b"\n" not in output


def test_rust_invalid_result_line_is_not_fatal(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    error = assert_error(agent.exec({"action": "garbage"})[0], "InvalidResult")
    assert "this is not json" in error["message"]
    assert agent.invoke({})["count"] == 2


def test_rust_result_too_large_is_fatal(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    pid = agent.invoke({})["pid"]
    error = assert_error(agent.exec({"action": "big"})[0], "ResultTooLarge", fatal=True)
    assert str(RESULT_MAX) in error["message"]
    assert_gone(pid)  # the stream is out of step: the program was stopped
    assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)


def test_rust_more_than_one_line_per_event_is_fatal(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    assert agent.invoke({"action": "two-lines"}) == 1
    error = assert_error(agent.exec({})[0], "InvalidResult", fatal=True)
    assert "one event, one result line" in error["message"]


@pytest.mark.parametrize(("action", "code"), [("exit", 3), ("panic", 101)])
def test_rust_exit_is_fatal_and_quotes_the_status(agent, rust_bootstrap, action, code):
    agent.load("rust", rust_bootstrap)
    agent.invoke({})
    reply, _ = agent.exec({"action": action})
    error = assert_error(reply, "RuntimeExit", fatal=True)
    assert f"exited with code {code} during the call" in error["message"]
    assert reply["logs"].startswith("event 2 has")
    if action == "panic":
        assert "boom at event 2" in reply["logs"]
    assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)
    assert_alive(agent)


def test_rust_large_event(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    event = {"blob": "r" * (5 << 20)}
    assert agent.invoke(event)["event"] == event


def test_a_program_starts_with_default_signal_dispositions(agent):
    # Python ignores SIGPIPE and SIGXFSZ; a function's program (here any executable speaking the line
    # protocol) and what it runs must not inherit that.
    script = b"""#!/bin/sh
while read -r line; do
  printf '"%s"\\n' "$(grep SigIgn /proc/self/status | cut -f2)"
done
"""
    agent.load("rust", script)
    ignored = int(agent.invoke({}), 16)
    assert ignored & (1 << (13 - 1)) == 0, "SIGPIPE is ignored"
    assert ignored & (1 << (25 - 1)) == 0, "SIGXFSZ is ignored"


def test_rust_program_ends_with_the_agent(agent, rust_bootstrap):
    agent.load("rust", rust_bootstrap)
    pid = agent.invoke({})["pid"]
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.wait() == 0
    assert_gone(pid)


# ---------------------------------------------------------------- wasm


def test_wasm_echo(agent, cwasm):
    agent.load("wasm", cwasm("echo"))
    assert agent.invoke({"a": [1, 2, 3]}) == {"a": [1, 2, 3]}
    assert agent.invoke("second") == "second"
    assert agent.children() == []  # in-process: no child


def test_wasm_state_persists_and_stderr_is_logged(agent, cwasm):
    agent.load("wasm", cwasm("counter"))
    replies = [agent.exec({"n": n}) for n in range(3)]
    assert [json.loads(output) for _, output in replies] == [{"count": 1}, {"count": 2}, {"count": 3}]
    assert all(reply["logs"] == "counted\n" for reply, _ in replies)


def test_wasm_large_event_streams_through(agent, cwasm):
    agent.load("wasm", cwasm("echo"))
    event = {"blob": "w" * (5 << 20)}  # far more than a pipe holds: written and read in one loop
    assert agent.invoke(event) == event


def test_wasm_result_too_large_is_fatal(agent, cwasm):
    agent.load("wasm", cwasm("echo"))
    assert_error(agent.exec("x" * RESULT_MAX)[0], "ResultTooLarge", fatal=True)
    assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)


def test_wasm_deadline_interrupts_a_spinning_module(agent, cwasm):
    agent.load("wasm", cwasm("spin"))
    reply, _ = agent.exec({}, deadline_ms=300)
    error = assert_error(reply, "TimeoutError", fatal=True)
    assert "300 ms" in error["message"] and "blocked" not in error["message"]
    assert_alive(agent)


def test_wasm_deadline_while_blocked_in_wasi(agent, cwasm):
    agent.load("wasm", cwasm("swallow"))
    reply, _ = agent.exec({}, deadline_ms=200)
    error = assert_error(reply, "TimeoutError", fatal=True)
    assert "blocked in a WASI call" in error["message"]
    assert_alive(agent)


def test_wasm_epoch_is_only_ticked_by_a_deadline(agent, cwasm):
    # Calls well within their deadlines, with idle time between them, never trap.
    agent.load("wasm", cwasm("counter"))
    for n in range(1, 4):
        assert agent.invoke({}, deadline_ms=100) == {"count": n}


def test_wasm_memory_growth_past_the_limit(agent, cwasm):
    agent.load("wasm", cwasm("grow"), memory_mb=2)
    error = assert_error(agent.exec({})[0], "MemoryLimitExceeded", fatal=True)
    assert "unreachable" in error["message"] and "limit of 2 MiB" in error["message"]


def test_wasm_initial_memory_over_the_limit(agent, cwasm):
    reply = agent.init(cwasm("huge-memory"), runtime="wasm", handler="module._start", filename="module.cwasm",
                       memory_mb=2)
    error = assert_error(reply, "MemoryLimitExceeded", fatal=True)
    assert "exceeds memory limits" in error["message"] and "2 MiB" in error["message"]


def test_wasm_proc_exit_is_fatal(agent, cwasm):
    agent.load("wasm", cwasm("exit"))
    assert agent.invoke({}) == 1
    reply, _ = agent.exec({})
    error = assert_error(reply, "RuntimeExit", fatal=True)
    assert "exited with code 7" in error["message"]
    assert reply["logs"] == "bye\n"
    assert "before this call" in assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)["message"]


def test_wasm_trap_is_fatal_with_its_message(agent, cwasm):
    agent.load("wasm", cwasm("trap"))
    error = assert_error(agent.exec({})[0], "Trap", fatal=True)
    assert error["message"] == "wasm trap: integer divide by zero"
    assert "divide" in error["stack"]  # the wasm backtrace names the function
    assert "before this call" in assert_error(agent.exec({})[0], "RuntimeExit", fatal=True)["message"]


def test_wasm_module_without_start(agent, cwasm):
    reply = agent.init(cwasm("no-start"), runtime="wasm", handler="module._start", filename="module.cwasm")
    assert "_start" in assert_error(reply, "InvalidCode", fatal=True)["message"]


def test_wasm_module_with_an_unknown_import(agent, cwasm):
    reply = agent.init(cwasm("unknown-import"), runtime="wasm", handler="module._start", filename="module.cwasm")
    assert "env::missing" in assert_error(reply, "InvalidCode", fatal=True)["message"]


def test_wasm_artifact_from_another_engine_is_refused(agent):
    reply = agent.init(b"\x00asm\x01\x00\x00\x00", runtime="wasm", handler="module._start", filename="module.cwasm")
    assert_error(reply, "InvalidCode", fatal=True)


def test_wasm_agent_exits_cleanly_at_eof(agent, cwasm):
    agent.load("wasm", cwasm("counter"))
    assert agent.invoke({}) == {"count": 1}
    agent.sock.shutdown(socket.SHUT_WR)
    assert agent.wait() == 0
