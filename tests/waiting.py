"""Helpers for tests that run real nodes in other processes: a free port, waiting for a condition, and stopping a
process as a service manager would."""

import signal
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, seconds: float = 90.0, what: str = "condition"):
    """``check()``'s first truthy result; the bound is for a broken test, not a timing threshold."""
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} not reached within {seconds} s"
        time.sleep(0.05)
    return result


def stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (a node drains and exits), then SIGKILL if it is still there after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
