"""Load figures measured with wrk (Debian's package), the HTTP load tool users reach for (issue 24).

One wrk thread (``-t1``): the machine has 2 cores and the server needs them. Percentiles come from a Lua
``done()`` that prints ``latency:percentile(p)``, because ``--latency`` stops at p99; errors are wrk's
socket errors (connect, read, write, timeout) plus its ``status`` count (replies >= 400). Counting
replies needs a Lua ``response()``, which makes wrk parse every body in Lua, so it runs as its own
short run and never inside a measured one.

``python -m bench.wrk URL`` measures one URL (c=1 and c=32) and prints what it found.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

PERCENTILES = (50, 99, 99.9)
ERROR_KINDS = ("connect", "read", "write", "status", "timeout")
MARK = "NIMBUS-WRK "
WARMUP_S = 1.0
MISSING = "wrk missing (apt-get install wrk; `make bench` does it as root)"


@dataclass
class Result:
    """One wrk run: times in ms; ``starts`` only from a counting run (start kind -> replies)."""

    requests: int
    seconds: float
    latency_ms: dict[float, float]
    mean_ms: float
    max_ms: float
    errors: dict[str, int]
    starts: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def p(self, percentile: float) -> float:
        return self.latency_ms[percentile]

    def hot_share(self) -> float | None:
        counted = sum(self.starts.values())
        return self.starts.get("hot", 0) / counted if counted else None


def find() -> str | None:
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII is a valid Lua string literal


def script(body: bytes, paths: list[str] | None = None, count_starts: bool = False) -> str:
    """The Lua script: POST ``body`` (to each of ``paths`` in turn), report in ``done()``.

    ``count_starts``: also count the ``"start":"…"`` of every reply (per thread, summed in ``done()``).
    """
    text = body.decode("ascii")
    lua = [
        'wrk.method = "POST"',
        f"wrk.body = {_lua_string(text)}",
        'wrk.headers["Content-Type"] = "application/json"',
        "local threads = {}",
        "function setup(thread) table.insert(threads, thread) end",
    ]
    if paths:
        listed = ", ".join(_lua_string(p) for p in paths)
        lua += [
            f"local paths = {{{listed}}}",
            "local requests, next_request = {}, 0",
            "function init(args)",
            "  for i, path in ipairs(paths) do requests[i] = wrk.format(nil, path) end",
            "end",
            "function request()",
            "  next_request = next_request % #requests + 1",
            "  return requests[next_request]",
            "end",
        ]
    if count_starts:
        lua += [
            "starts = {}",
            "function response(status, headers, body)",
            '  local kind = string.match(body, \'"start":"(%a+)"\') or "none"',
            "  starts[kind] = (starts[kind] or 0) + 1",
            "end",
        ]
    lua += [
        "function done(summary, latency, requests)",
        "  local e = summary.errors",
        f'  io.write(string.format("{MARK}requests %d\\n{MARK}duration_us %d\\n", summary.requests, summary.duration))',
        *(f'  io.write(string.format("{MARK}error_{k} %d\\n", e.{k}))' for k in ERROR_KINDS),
        *(f'  io.write(string.format("{MARK}p{p} %d\\n", latency:percentile({p})))' for p in PERCENTILES),
        f'  io.write(string.format("{MARK}mean_us %f\\n{MARK}max_us %d\\n", latency.mean, latency.max))',
    ]
    if count_starts:
        lua += [
            "  for _, thread in ipairs(threads) do",
            '    for kind, n in pairs(thread:get("starts")) do',
            f'      io.write(string.format("{MARK}start_%s %d\\n", kind, n))',
            "    end",
            "  end",
        ]
    lua.append("end")
    return "\n".join(lua) + "\n"


def parse(output: str) -> Result:
    """The figures ``done()`` printed (lines starting with MARK); wrk's own text is ignored."""
    found: dict[str, float] = {}
    starts: dict[str, int] = {}
    for line in output.splitlines():
        if not line.startswith(MARK):
            continue
        key, value = line[len(MARK):].split()
        if key.startswith("start_"):
            starts[key[6:]] = starts.get(key[6:], 0) + int(value)
        else:
            found[key] = float(value)
    try:
        return Result(requests=int(found["requests"]), seconds=found["duration_us"] / 1e6,
                      latency_ms={p: found[f"p{p:g}"] / 1000 for p in PERCENTILES},
                      mean_ms=found["mean_us"] / 1000, max_ms=found["max_us"] / 1000,
                      errors={k: int(found[f"error_{k}"]) for k in ERROR_KINDS}, starts=starts)
    except KeyError as missing:
        raise RuntimeError(f"wrk printed no {missing}: {output[-500:]!r}") from None


def run(url: str, body: bytes, connections: int, seconds: float, *, paths: list[str] | None = None,
        count_starts: bool = False, warmup_s: float = WARMUP_S, timeout_s: float = 10) -> Result:
    """One measured wrk run (after a ``warmup_s`` run of the same script, when > 0).

    ``url``'s path is used unless ``paths`` are given; then each request takes the next of them.
    """
    binary = find()
    if binary is None:
        raise RuntimeError(MISSING)
    parts = urlsplit(url)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="nimbus-wrk-") as f:
        f.write(script(body, paths, count_starts))
        f.flush()

        def once(duration: float) -> Result:
            cmd = [binary, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", f"--timeout={timeout_s:g}s",
                   "-s", f.name, url if not paths else f"{parts.scheme}://{parts.netloc}"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout_s + 30)
            if done.returncode != 0:
                raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()[:300]}")
            return parse(done.stdout)

        if warmup_s > 0:
            once(warmup_s)
        return once(seconds)


def tree_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants, in seconds (/proc/<pid>/stat)."""
    from bench.common import process_tree

    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or not re.match(r"https?://", args[0]):
        raise SystemExit("usage: python -m bench.wrk URL [BODY]")
    body = args[1].encode() if len(args) > 1 else b'{"hello": "world"}'
    for conc in (1, 32):
        r = run(args[0], body, conc, 3)
        print(f"c={conc}: {r.rps:.0f} req/s, p50 {r.p(50):.3f} ms, p99 {r.p(99):.2f} ms, "
              f"p99.9 {r.p(99.9):.2f} ms, errors {r.errors}")


if __name__ == "__main__":
    main()
