"""Floors: what the hardware and the kernel give before Nimbus adds anything, measured in the same run."""

import os
import socket
import subprocess
import sys
import threading
import time

from nimbus import protocol


def socketpair_round_trip(n: int = 5000) -> list[float]:
    """One exec-shaped frame there and back over a socketpair, echoed by a thread: the channel's floor."""
    a, b = socket.socketpair()

    def echo():
        try:
            while True:
                header, blob = protocol.recv_frame(b)
                protocol.send_frame(b, header, blob)
        except (EOFError, OSError):
            pass

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        protocol.send_frame(a, {"type": "exec", "id": 1}, b"{}")
        protocol.recv_frame(a)
        out.append(time.perf_counter() - t)
    a.close()
    thread.join(2)
    b.close()
    return out


def bare_bwrap_command() -> list[str]:
    """``bwrap --unshare-all … python3 -I -S -c pass``: a sandboxed interpreter that does nothing."""
    from nimbus.machines import bwrap

    binary = bwrap.find_bwrap()
    prefix = sys.base_prefix
    python = os.path.realpath(os.path.join(prefix, "bin", f"python3.{sys.version_info.minor}"))
    return [binary, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", "/tmp", "--ro-bind", prefix, prefix, python, "-I", "-S", "-c", "pass"]


def bare_bwrap_start(n: int) -> list[float]:
    cmd = bare_bwrap_command()
    subprocess.run(cmd, check=True)  # warm the page cache like the node's first machine did
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        out.append(time.perf_counter() - t)
    return out
