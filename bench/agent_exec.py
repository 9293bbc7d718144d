"""The python3 agent's CPU per warm call, without a sandbox or a node: `python -m bench.agent_exec`.

Starts the real agent (``nimbus.agent.main``) as a machine driver does, on one end of a socketpair,
initialises a no-op ``handler(event, context): return event`` and sends it ``--calls`` exec frames one
after another, as the pool does. What it prints is the agent process's own utime + stime per call
(from /proc/<pid>/stat, all threads), so a change to the agent's exec path can be measured on a busy
shared machine where wall-clock times are noise. ``--repeat`` runs that many rounds on one agent and
prints each. ``--py-spy FILE`` samples the agent while it runs (raw collapsed stacks, for a profile).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nimbus import protocol

SRC = Path(__file__).resolve().parents[1] / "src"
LAUNCH = f"import sys; sys.path.insert(0, {str(SRC)!r}); from nimbus.agent.main import main; main(sys.argv[1:])"
SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
# The floor: a bare loop over the same frames (read, parse the header and event, call, answer), no agent.
FLOOR = f"""
import json, os, struct, sys
sys.path.insert(0, {str(SRC)!r})
prefix, fd = struct.Struct(">II"), int(sys.argv[2])
def handler(event, context):
    return event
os.read(fd, 1 << 20)
ok = b'{{"type":"init_ok","id":0}}'
os.write(fd, prefix.pack(len(ok), 0) + ok)
while head := os.read(fd, 8):
    head_len, blob_len = prefix.unpack(head)
    header = json.loads(os.read(fd, head_len))
    event = json.loads(os.read(fd, blob_len))
    output = json.dumps(handler(event, None)).encode()
    reply = json.dumps({{"type": "result", "id": header["id"], "logs": ""}}).encode()
    os.write(fd, prefix.pack(len(reply), len(output)) + reply + output)
"""
NOOP = b"def handler(event, context):\n    return event\n"
EVENT = b'{"hello": "world"}'


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def run(calls: int, repeat: int, code: bytes, spy: str | None, floor: bool = False) -> list[tuple[float, float]]:
    """(user, system) CPU µs per call of the agent, one pair per round."""
    with tempfile.TemporaryDirectory() as task_dir:
        host, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", FLOOR if floor else LAUNCH, "--fd", str(theirs.fileno()),
                                 "--task-dir", task_dir], pass_fds=(theirs.fileno(),), env=SANDBOX_ENV,
                                stdin=subprocess.DEVNULL)
        theirs.close()
        sampler = None
        try:
            protocol.send_frame(host, {"type": "init", "id": 0, "runtime": "python3", "handler": "main.handler",
                                       "filename": "main.py", "function_name": "noop"}, code)
            reply, _ = protocol.recv_frame(host, protocol.GUEST_TYPES)
            if reply["type"] != "init_ok":
                raise SystemExit(f"init failed: {reply}")
            header = {"type": "exec", "id": 0, "invocation_id": "0" * 32, "deadline_ms": 30000}
            for _ in range(200):  # warm up
                protocol.send_frame(host, header, EVENT)
                protocol.recv_frame(host, protocol.GUEST_TYPES)
            if spy:
                sampler = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(proc.pid), "--nonblocking", "-r", "500",
                                            "-f", "raw", "-o", spy], stdout=subprocess.DEVNULL)
                time.sleep(1)
            figures = []
            for _ in range(repeat):
                before = cpu_seconds(proc.pid)
                for number in range(calls):
                    header["id"] = header["invocation_id"] = f"{number:032x}"
                    protocol.send_frame(host, header, EVENT)
                    reply, output = protocol.recv_frame(host, protocol.GUEST_TYPES)
                    if reply["type"] != "result":
                        raise SystemExit(f"exec failed: {reply}")
                after = cpu_seconds(proc.pid)
                figures.append(((after[0] - before[0]) / calls * 1e6, (after[1] - before[1]) / calls * 1e6))
        finally:
            if sampler is not None:
                sampler.send_signal(2)
                sampler.wait()
            host.close()
            proc.wait(30)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--logging", action="store_true", help="a handler that imports logging (root handler set)")
    parser.add_argument("--floor", action="store_true", help="a bare frame loop instead of the agent")
    parser.add_argument("--py-spy", dest="spy", metavar="FILE", help="sample the agent with py-spy into FILE")
    args = parser.parse_args()
    code = b"import logging\n" + NOOP if args.logging else NOOP
    figures = run(args.calls, args.repeat, code, args.spy, args.floor)
    print(json.dumps({"calls": args.calls,
                      "agent_cpu_us_per_call": [round(user + system, 1) for user, system in figures],
                      "user_us": [round(user, 1) for user, _ in figures],
                      "system_us": [round(system, 1) for _, system in figures]}))


if __name__ == "__main__":
    main()
