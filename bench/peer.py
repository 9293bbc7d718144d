"""The peer row of issue 24: serverless-offline, the local Lambda emulator people use, under the same wrk.

npm's ``serverless@3`` and ``serverless-offline@13`` go into a cache directory outside the repository
(``~/.cache/nimbus/bench-peer``, or ``$XDG_CACHE_HOME``), installed once and reused; the service
(serverless.yml and a python no-op handler) is written beside them so node finds the plugin, and
serverless-offline runs the handler with the machine's ``python3``, as it does for users. Nothing is
fetched at run time: telemetry, notifications and update checks are switched off.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from bench import wrk
from bench.common import comm, free_port, process_tree

PACKAGES = ("serverless@3", "serverless-offline@13")
PATH = "/invoke"
HANDLER = "def handler(event, context):\n    return {\"statusCode\": 200, \"body\": event.get(\"body\") or \"{}\"}\n"
QUIET_ENV = {"SLS_TELEMETRY_DISABLED": "1", "SLS_TRACKING_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off",
             "SLS_DEPRECATION_DISABLE": "*", "SLS_INTERACTIVE_SETUP_DISABLE": "1", "SLS_AWS_MONITORING_FREQUENCY": "0",
             "NO_UPDATE_NOTIFIER": "1", "npm_config_update_notifier": "false", "CI": "1"}


class Unavailable(Exception):
    """The peer cannot be measured here; the message says why."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nimbus" / "bench-peer"


def installed(root: Path) -> bool:
    return ((root / "node_modules" / ".bin" / "serverless").exists()
            and (root / "node_modules" / "serverless-offline" / "package.json").exists())


def install(root: Path, npm: str = "npm") -> Path:
    """``root`` with both packages in its node_modules (npm install the first time only)."""
    if installed(root):
        return root
    if shutil.which(npm) is None:
        raise Unavailable(f"{npm} not found")
    root.mkdir(parents=True, exist_ok=True)
    print(f"installing {' '.join(PACKAGES)} into {root} (once) ...", flush=True)
    try:
        done = subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(root), *PACKAGES],
                              cwd=root, capture_output=True, text=True, timeout=900, env={**os.environ, **QUIET_ENV})
    except subprocess.TimeoutExpired:
        raise Unavailable("npm install took over 15 minutes") from None
    if done.returncode != 0 or not installed(root):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(f"npm install {' '.join(PACKAGES)} failed ({done.returncode}): {tail[0][:200]}")
    return root


def python_runtime() -> str:
    """The Lambda runtime name of the machine's python3 (serverless-offline spawns ``python3``)."""
    try:
        minor = subprocess.run(["python3", "-c", "import sys; print(sys.version_info.minor)"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"no python3 to run the handler: {exc}") from None
    return f"python3.{minor}"


def write_service(service: Path, port: int, lambda_port: int, runtime: str) -> None:
    service.mkdir(parents=True, exist_ok=True)
    (service / "handler.py").write_text(HANDLER)
    (service / "serverless.yml").write_text(f"""\
service: nimbus-bench-peer
frameworkVersion: "3"
provider:
  name: aws
  runtime: {runtime}
  region: us-east-1
plugins:
  - serverless-offline
custom:
  serverless-offline:
    host: 127.0.0.1
    httpPort: {port}
    lambdaPort: {lambda_port}
    noPrependStageInUrl: true
functions:
  noop:
    handler: handler.handler
    events:
      - httpApi:
          path: {PATH}
          method: post
""")


def start(root: Path, port: int) -> subprocess.Popen:
    """``serverless offline`` in ``root``/service (its own process group: it spawns python3 children)."""
    service = root / "service"
    write_service(service, port, free_port(), python_runtime())
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_") and k != "VIRTUAL_ENV"}
    env.update(QUIET_ENV, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", HOME=str(root))
    log = open(root / "offline.log", "wb")
    try:
        return subprocess.Popen([str(root / "node_modules" / ".bin" / "serverless"), "offline", "start"], cwd=service,
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        log.close()


def wait_ready(proc: subprocess.Popen, url: str, body: bytes, seconds: float = 90) -> None:
    """Until ``url`` answers a POST with 200 (the first call starts the handler's python3)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"serverless offline exited {proc.returncode}")
        try:
            if httpx.post(url, content=body, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise Unavailable(f"serverless offline did not answer at {url} within {seconds:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """The process group this module started: serverless and the python3 it spawned."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(10)
            os.killpg(proc.pid, 0)  # children may outlive the leader
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
        time.sleep(0.5)


def warm_up(proc: subprocess.Popen, url: str, body: bytes, conc: int, rounds: int = 8) -> int:
    """Load at ``conc`` until no more handler processes appear; how many there are.

    serverless-offline starts a python3 per call in flight (each a cold start, seconds in all on 2 busy
    cores); a short warm-up would leave those starts inside the measured run.
    """
    count = -1
    for _ in range(rounds):
        wrk.run(url, body, conc, 2, warmup_s=0)
        now = sum(1 for p in process_tree(proc.pid) if comm(p).startswith("python"))
        if now == count:
            break
        count = now
    return count


def measure(body: bytes, seconds: float, conc: int, root: Path | None = None) -> dict:
    """wrk c=1 p50 and c=``conc`` req/s, p99, p99.9 and errors of the peer, or the reason it was not measured."""
    root = root or cache_dir()
    try:
        if wrk.find() is None:
            raise Unavailable(wrk.MISSING)
        install(root)
        port = free_port()
        proc = start(root, port)
        try:
            url = f"http://127.0.0.1:{port}{PATH}"
            wait_ready(proc, url, body)
            single = wrk.run(url, body, 1, seconds)
            handlers = warm_up(proc, url, body, conc)
            many = wrk.run(url, body, conc, seconds, warmup_s=0)
        finally:
            stop(proc)
    except (Unavailable, RuntimeError, OSError) as exc:
        return {"available": False, "note": f"serverless-offline not measured: {exc}"}
    return {"available": True, "p50_ms_c1": single.p(50), "rps": many.rps, "p50_ms": many.p(50), "p99_ms": many.p(99),
            "p999_ms": many.p(99.9), "errors": many.error_count, "requests": many.requests,
            "handler_processes": handlers, "packages": _versions(root)}


def _versions(root: Path) -> dict[str, str]:
    out = {}
    for name in ("serverless", "serverless-offline"):
        try:
            out[name] = json.loads((root / "node_modules" / name / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[name] = "?"
    return out


if __name__ == "__main__":
    print(measure(b'{"hello": "world"}', 3, 32))
