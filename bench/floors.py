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


ECHO_PROCESS = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(65536):
    conn.sendall(data)
"""


def loopback_process_round_trip(n: int = 5000) -> list[float]:
    """A small message to another process over TCP loopback and back: the floor of a hop to a second
    process (a custom runtime's bootstrap) that does nothing with it."""
    child = subprocess.Popen([sys.executable, "-I", "-c", ECHO_PROCESS], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            message = b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n\r\n"
            out = []
            for _ in range(n):
                t = time.perf_counter()
                sock.sendall(message)
                got = 0
                while got < len(message):
                    got += len(sock.recv(65536))
                out.append(time.perf_counter() - t)
        return out
    finally:
        child.kill()
        child.wait()


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
