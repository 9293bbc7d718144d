"""Profile a node's warm invoke path with py-spy: `python -m bench.profile [--concurrency 1] [--seconds 20]`.

Starts a node, deploys the no-op python3 function, drives warm calls at it while ``py-spy record``
samples the node process, then prints the hottest functions by own time ("self") and by time with
callees ("total"), as percentages of the samples taken while the node was busy (py-spy leaves out
idle threads, so a loop waiting in epoll is not counted). The raw collapsed stacks are kept for a
flame graph (``--out``; e.g. ``flamegraph.pl`` or speedscope).
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

from bench.common import NOOP_CODE, VENV_BIN, free_port, process_tree, start_node, stop, wait_http
from bench.loadgen import concurrent, sequential

BODY = b'{"hello": "world"}'


def py_spy() -> str:
    found = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


# Parts of the warm path, recognised by a file in the stack.
AREAS = {
    "store (sqlalchemy, aiosqlite, nimbus/store)": ("(sqlalchemy/", "(aiosqlite/", "(nimbus/store/"),
    "web framework (fastapi, starlette, pydantic)": ("(fastapi/", "(starlette/", "(pydantic"),
    "nimbus gateway middleware and routes": ("(nimbus/gateway/",),
    "scheduler + pool": ("(nimbus/scheduler/", "(nimbus/pool/", "(nimbus/deployment.py"),
    "machine channel (bwrap driver, protocol)": ("(nimbus/machines/", "(nimbus/protocol.py"),
    "metrics (nimbus/metrics, prometheus_client)": ("(nimbus/metrics.py", "(prometheus_client/"),
    "uvicorn HTTP protocol": ("(uvicorn/protocols/",),
}


def _package(frame: str) -> str:
    """``f (pkg/mod.py:12)`` -> ``pkg``; the event loop's own C code shows up as asyncio's Runner.run."""
    where = frame.rpartition("(")[2]
    if where.startswith("asyncio/runners.py"):
        return "event loop internals (uvloop C code under Runner.run)"
    head = where.split("/")[0].split(":")[0]
    return head[:-3] if head.endswith(".py") else head


def summarise(raw: Path, top: int) -> str:
    """Self and total percentages per function from py-spy's collapsed stacks ("f1;f2;f3 count")."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    packages: collections.Counter = collections.Counter()
    areas: collections.Counter = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        text = ";".join(frames)
        for area, needles in AREAS.items():
            if any(needle in text for needle in needles):
                areas[area] += n
        for frame in set(frames):
            total[frame] += n
    lines = [f"{samples} samples (non-idle)", "", "by package of the innermost Python frame (own time):"]
    lines += [f"  {100 * n / samples:5.1f}%  {pkg}" for pkg, n in packages.most_common(12)]
    lines += ["", "samples whose stack passes through (inclusive; areas overlap):"]
    lines += [f"  {100 * n / samples:5.1f}%  {area}" for area, n in areas.most_common()]
    lines += ["", "by own time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "by total time (with callees):"]
    lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in total.most_common(top * 2)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long py-spy samples")
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (Python CPU time)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "nimbus-profile.txt",
                    help="where the raw collapsed stacks go")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="nimbus-profile-"))
    port = free_port()
    node = start_node(port, home, min_warm=1, runtimes="python3", max_machines=64 + args.concurrency)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health")
        name = f"prof-{uuid.uuid4().hex[:6]}"
        httpx.post(f"{base}/api/v1/functions", timeout=30, json={
            "name": name, "runtime": "python3", "code": NOOP_CODE, "concurrency": max(1, args.concurrency),
        }).raise_for_status()
        url = f"{base}/api/v1/functions/{name}/invoke"
        sequential(url, BODY, 200)  # warm: machines initialised, first-call paths taken
        if args.concurrency > 1:
            concurrent(url, BODY, 200, args.concurrency)

        stop_load = threading.Event()
        calls = [0]

        def load():
            while not stop_load.is_set():
                if args.concurrency == 1:
                    sequential(url, BODY, 200, warmup=0)
                    calls[0] += 200
                else:
                    concurrent(url, BODY, 500, args.concurrency)
                    calls[0] += 500

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(0.5)
        # CPU per call first, without py-spy attached: the node process (all threads) and its machines.
        machines = [p for p in process_tree(node.pid) if p != node.pid]
        before, before_m, calls0, t0 = cpu_seconds([node.pid]), cpu_seconds(machines), calls[0], time.monotonic()
        time.sleep(5)
        n_calls, wall = calls[0] - calls0, time.monotonic() - t0
        node_cpu, machine_cpu = cpu_seconds([node.pid]) - before, cpu_seconds(machines) - before_m
        began = time.monotonic()
        calls0 = calls[0]
        cmd = [py_spy(), "record", "--pid", str(node.pid), "--rate", str(args.rate), "--duration",
               str(int(args.seconds)), "--format", "raw", "--output", str(args.out), "--nonblocking"]
        subprocess.run(cmd + (["--gil"] if args.gil else []), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        elapsed = time.monotonic() - began
        profiled_calls = calls[0] - calls0
        stop_load.set()
        thread.join(60)
    finally:
        stop(node)
    per = max(n_calls, 1)
    print(f"unprofiled: ~{n_calls} warm calls in {wall:.1f} s ({n_calls / wall:.0f}/s) at concurrency "
          f"{args.concurrency}; node CPU {1000 * node_cpu / per:.3f} ms/call, machines' CPU "
          f"{1000 * machine_cpu / per:.3f} ms/call (calls counted in batches, so rates are approximate)")
    print(f"profiled: {elapsed:.0f} s, ~{profiled_calls} calls ({profiled_calls / elapsed:.0f}/s)"
          f"{', GIL holder only' if args.gil else ''}; raw stacks in {args.out}\n")
    print(summarise(args.out, args.top))


if __name__ == "__main__":
    sys.exit(main())
