"""Acceptance fixtures: the installed ``nimbus`` command, and a real node started with ``nimbus up``.

Everything here goes through subprocesses, as a user at a shell would: no imports of Nimbus itself.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

NODE_START_TIMEOUT_S = 30.0
NODE_STOP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 120.0


def _nimbus_binary() -> str:
    # The console script installed next to the interpreter running pytest (.venv/bin/nimbus).
    beside = Path(sys.executable).with_name("nimbus")
    if beside.exists():
        return str(beside)
    found = shutil.which("nimbus")
    if found is None:
        pytest.fail("no 'nimbus' command: install the project (make setup) before running the acceptance tests")
    return found


def _clean_env() -> dict[str, str]:
    """The caller's environment without NIMBUS_* variables, so a developer's settings cannot leak in."""
    return {key: value for key, value in os.environ.items() if not key.startswith("NIMBUS_")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Result:
    """What a finished ``nimbus`` run printed and returned."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"nimbus {' '.join(self.args)} → exit {self.code}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"


class Cli:
    """Runs ``nimbus`` subprocesses against one node URL."""

    def __init__(self, binary: str, url: str, cwd: Path) -> None:
        self.binary = binary
        self.url = url
        self.cwd = cwd

    def __call__(self, *args: str, input: str | None = None,  # noqa: A002 - as subprocess.run names it
                 env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S) -> Result:
        full_env = {**_clean_env(), "NIMBUS_URL": self.url, **(env or {})}
        done = subprocess.run(
            [self.binary, *args], input=input, capture_output=True, text=True, env=full_env, cwd=self.cwd,
            timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL,
        )
        return Result(tuple(args), done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="session")
def nimbus_bin() -> str:
    return _nimbus_binary()


@pytest.fixture(scope="session")
def node_url(nimbus_bin, tmp_path_factory):
    """A node started as a user would (``nimbus up``) on a free port with a scratch home; stopped with SIGTERM."""
    workdir = tmp_path_factory.mktemp("node")
    home = workdir / "home"
    log_path = workdir / "node.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**_clean_env(), "NIMBUS_MIN_WARM": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [nimbus_bin, "up", "--port", str(port), "--home", str(home)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )
    try:
        _wait_healthy(url, process, log_path)
        yield url
    finally:
        _stop(process)


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"'nimbus up' exited with {process.returncode} before it was healthy:\n{_log_tail(log_path)}")
        try:
            response = httpx.get(f"{url}/health", timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    pytest.fail(f"the node at {url} was not healthy within {NODE_START_TIMEOUT_S:g} s ({last}):\n{_log_tail(log_path)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(NODE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def nimbus(nimbus_bin, node_url, tmp_path) -> Cli:
    """``nimbus`` pointed at the running node (NIMBUS_URL)."""
    return Cli(nimbus_bin, node_url, tmp_path)


@pytest.fixture
def nimbus_offline(nimbus_bin, tmp_path) -> Cli:
    """``nimbus`` pointed at a port where nothing listens: for what must work, or fail clearly, without a node."""
    return Cli(nimbus_bin, f"http://127.0.0.1:{free_port()}", tmp_path)
