"""Custom runtimes (issue 23): a provided function's hot call beside the python3 runtime's, same handler.

The provided function's bootstrap is a Runtime API client in plain python3 (``http.client`` on one
kept-alive connection, ``json``), about as small as a custom runtime gets; it imports the same
``main.handler`` the python3 function runs. Both live on one fresh node and are called over one
kept-alive connection each (loadgen's client), in alternating rounds so that drift in the machine's
speed falls on both alike. What the provided call pays on top is the Runtime API hop: the agent's
loopback HTTP server, the bootstrap's HTTP client, and a second process in the path. The hop is the
difference of the two p50s; the issue's target is 0.3 ms.

Also measured, informational: the same handler under awslambdaric (AWS's Python client, from PyPI
through a pip layer; left out with a note where it cannot be installed), and cold starts (the first
call of a new function, memory_mb 256 so no blank machine fits) of provided beside python3.

``python -m bench.provided`` prints the rows; ``python -m bench --only provided`` does the same.
"""

import base64
import io
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import httpx

from bench import floors
from bench.common import NOOP_CODE, free_port, p50_ms, p99_ms, start_node, stop, wait_http
from bench.loadgen import sequential

BODY = b'{"hello": "world"}'
ROUNDS = 3
COLD = 10
TARGET_HOP_MS = 0.3
BOOTSTRAP = r'''#!/usr/bin/env python3
import http.client, json, os, sys
sys.path.insert(0, os.environ["LAMBDA_TASK_ROOT"])
from main import handler

host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port))
base = "/2018-06-01/runtime/invocation/"
while True:
    conn.request("GET", base + "next")
    resp = conn.getresponse()
    event = json.loads(resp.read())
    rid = resp.getheader("Lambda-Runtime-Aws-Request-Id")
    conn.request("POST", base + rid + "/response", json.dumps(handler(event, None)))
    conn.getresponse().read()
'''
# The least a client can do (one socket, Content-Length framing only): what is left of the hop with it is
# the agent's Runtime API and the second process, not an HTTP library.
MINIMAL = r'''#!/usr/bin/env python3
import json, os, socket, sys
sys.path.insert(0, os.environ["LAMBDA_TASK_ROOT"])
from main import handler

host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].rsplit(":", 1)
sock = socket.create_connection((host, int(port)))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
stream = sock.makefile("rb")


def reply():
    headers = {}
    stream.readline()
    while (line := stream.readline()) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.lower()] = value.strip()
    return headers, stream.read(int(headers["content-length"]))


while True:
    sock.sendall(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: api\r\n\r\n")
    headers, body = reply()
    out = json.dumps(handler(json.loads(body), None)).encode()
    rid = headers["lambda-runtime-aws-request-id"].encode()
    sock.sendall(b"POST /2018-06-01/runtime/invocation/" + rid + b"/response HTTP/1.1\r\nHost: api\r\n"
                 b"Content-Length: " + str(len(out)).encode() + b"\r\n\r\n" + out)
    reply()
'''
AWSLAMBDARIC = {"bootstrap": "#!/bin/sh\nexec python3 -m awslambdaric \"$_HANDLER\"\n",
                "requirements.txt": "awslambdaric==4.2.2\n"}


def package(files: dict[str, str]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if name == "bootstrap" else 0o100644) << 16
            archive.writestr(info, text)
    return base64.b64encode(buffer.getvalue()).decode()


def create(client: httpx.Client, name: str, runtime: str, **fields) -> str | None:
    """The function's name, or None (and a note printed) when it cannot be created here."""
    body = {"name": name, "runtime": runtime, "handler": "main.handler", **fields}
    if "code_base64" not in body:
        body["code"] = NOOP_CODE
    r = client.post("/api/v1/functions", json=body)
    if r.status_code != 201:
        print(f"{name}: not measured ({r.status_code}: {r.json().get('detail', '')[:200]})")
        return None
    return name


def cold_starts(client: httpx.Client, runtime: str, n: int, **fields) -> list[float]:
    """First calls of ``n`` new functions (memory_mb 256: no blank machine fits), in seconds."""
    times = []
    for i in range(n):
        name = create(client, f"cold-{runtime.replace('.', '-')}-{uuid.uuid4().hex[:6]}-{i}", runtime,
                      memory_mb=256, **fields)
        if name is None:
            break
        time.sleep(0.05)  # arrivals, not a burst
        t = time.perf_counter()
        out = client.post(f"/api/v1/functions/{name}/invoke", content=BODY).json()
        if out.get("start") == "cold" and out.get("status") == "succeeded":
            times.append(time.perf_counter() - t)
    return times


def measure(home: Path, n: int = 400) -> dict[str, dict]:
    port = free_port()
    node = start_node(port, home, runtimes="python3", max_machines=64)
    base = f"http://127.0.0.1:{port}"
    out: dict[str, dict] = {}
    try:
        wait_http(f"{base}/health")
        client = httpx.Client(base_url=base, timeout=600)
        tag = uuid.uuid4().hex[:6]
        native = create(client, f"native-{tag}", "python3")
        custom = create(client, f"custom-{tag}", "provided",
                        code_base64=package({"bootstrap": BOOTSTRAP, "main.py": NOOP_CODE}))
        minimal = create(client, f"minimal-{tag}", "provided",
                         code_base64=package({"bootstrap": MINIMAL, "main.py": NOOP_CODE}))
        ric = create(client, f"ric-{tag}", "provided", code_base64=package({**AWSLAMBDARIC, "main.py": NOOP_CODE}))
        if native is None or custom is None:
            return out
        urls = {"native": native, "custom": custom, **({"minimal": minimal} if minimal else {}),
                **({"ric": ric} if ric else {})}
        samples: dict[str, list[float]] = {k: [] for k in urls}
        for _ in range(ROUNDS):
            for key, name in urls.items():
                samples[key] += sequential(f"{base}/api/v1/functions/{name}/invoke", BODY, n)
        floor = p50_ms(samples["native"])
        value = p50_ms(samples["custom"])
        out["provided_warm_p50_ms"] = {
            "value": value, "floor": floor, "ratio": value / floor, "hop_ms": value - floor,
            "p99_ms": p99_ms(samples["custom"]), "floor_p99_ms": p99_ms(samples["native"]),
            "samples": len(samples["custom"]),
            "floor_is": "the same node's python3 function with the same handler, hot, in alternating rounds"}
        trip = p50_ms(floors.loopback_process_round_trip())
        out["provided_warm_p50_ms"]["loopback_round_trip_ms"] = trip
        if "minimal" in samples:
            low = p50_ms(samples["minimal"])
            out["provided_minimal_warm_p50_ms"] = {"value": low, "floor": floor, "ratio": low / floor,
                                                   "hop_ms": low - floor, "p99_ms": p99_ms(samples["minimal"]),
                                                   "loopback_round_trip_ms": trip}
        if "ric" in samples:
            ric_p50 = p50_ms(samples["ric"])
            out["awslambdaric_warm_p50_ms"] = {"value": ric_p50, "floor": floor, "ratio": ric_p50 / floor,
                                               "hop_ms": ric_p50 - floor, "p99_ms": p99_ms(samples["ric"])}
        pycold = cold_starts(client, "python3", COLD)
        provcold = cold_starts(client, "provided", COLD,
                               code_base64=package({"bootstrap": BOOTSTRAP, "main.py": NOOP_CODE}))
        if pycold and provcold:
            out["provided_cold_start_p50_ms"] = {
                "value": p50_ms(provcold), "floor": p50_ms(pycold), "ratio": p50_ms(provcold) / p50_ms(pycold),
                "samples": len(provcold), "floor_samples": len(pycold),
                "floor_is": "python3 cold starts of the same handler on the same node"}
        client.close()
    finally:
        stop(node)
    return out


def details(rows: dict[str, dict]) -> list[str]:
    lines = []
    if (row := rows.get("provided_warm_p50_ms")) is not None:
        met = "met" if row["hop_ms"] <= TARGET_HOP_MS else "NOT met"
        lines.append(f"provided (stdlib python3 bootstrap) hot p50 {row['value']:.3f} ms, p99 {row['p99_ms']:.3f} ms; "
                     f"python3 runtime {row['floor']:.3f} ms, p99 {row['floor_p99_ms']:.3f} ms; Runtime API hop "
                     f"{row['hop_ms']:.3f} ms (target <= {TARGET_HOP_MS} ms: {met}); {row['samples']} calls each")
    if (row := rows.get("provided_minimal_warm_p50_ms")) is not None:
        lines.append(f"provided (minimal socket client) hot p50 {row['value']:.3f} ms, p99 {row['p99_ms']:.3f} ms "
                     f"({row['hop_ms']:+.3f} ms beside the python3 runtime: the agent's side of the hop; a bare "
                     f"round trip to another process over loopback, same run: {row['loopback_round_trip_ms']:.3f} ms)")
    if (row := rows.get("awslambdaric_warm_p50_ms")) is not None:
        lines.append(f"awslambdaric hot p50 {row['value']:.3f} ms, p99 {row['p99_ms']:.3f} ms "
                     f"({row['hop_ms']:+.3f} ms beside the python3 runtime)")
    if (row := rows.get("provided_cold_start_p50_ms")) is not None:
        lines.append(f"provided cold start p50 {row['value']:.1f} ms ({row['samples']} starts) beside python3's "
                     f"{row['floor']:.1f} ms ({row['floor_samples']})")
    return lines


def main() -> None:
    rows = measure(Path(tempfile.mkdtemp(prefix="nimbus-bench-provided-")))
    print("\n".join(details(rows)) or "provided: nothing measured")


if __name__ == "__main__":
    main()
