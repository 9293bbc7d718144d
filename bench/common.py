"""Helpers shared by the benchmarks: processes (a node, the echo floor), HTTP load, percentiles, /proc."""

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent
NOOP_CODE = "def handler(event, context):\n    return event\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server at {url} did not come up")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}


def start_echo(port: int) -> subprocess.Popen:
    """The HTTP floor: a bare ASGI JSON echo under the same uvicorn the node uses."""
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.echo:app", "--port", str(port),
                             "--log-level", "warning", "--no-access-log"], cwd=HERE.parent, env=clean_env())


def start_node(port: int, home: Path, **settings: object) -> subprocess.Popen:
    """A real node (`nimbus up`) in its own home; ``settings`` become NIMBUS_* variables."""
    env = {**clean_env(), "NIMBUS_LOG_LEVEL": "warning", **{f"NIMBUS_{k.upper()}": str(v) for k, v in settings.items()}}
    return subprocess.Popen([str(VENV_BIN / "nimbus"), "up", "--port", str(port), "--home", str(home)],
                            env=env, stdout=subprocess.DEVNULL)


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def ms(seconds: float) -> float:
    return seconds * 1000


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p99_ms(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] * 1000


# ------------------------------------------------------------------ /proc


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup (Rss, Pss, ...), {} if the process is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def tree_memory_kib(pid: int) -> dict[str, int]:
    """Summed Pss and Rss (KiB) of every process of a machine, and how many processes it has."""
    pss = rss = n = 0
    for p in process_tree(pid):
        roll = smaps_rollup(p)
        if roll:
            pss, rss, n = pss + roll.get("Pss", 0), rss + roll.get("Rss", 0), n + 1
    return {"pss_kib": pss, "rss_kib": rss, "processes": n}


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        pass
    return out
