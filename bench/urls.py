"""A hot function URL call (``/fn/{name}/``, payload 2.0) beside /api/v1's warm invoke, same node and function.

The function returns its event, so the URL's answer is the whole payload 2.0 event (a 200 JSON of the
result, no statusCode): the mapping both ways is in the figure. The /api/v1 side is sent the very event
the URL path built (taken from a first URL call's answer), so both run the same function on the same
bytes and the ratio is the URL path's own cost, not the size of its event. The two paths are measured in
alternating rounds so drift in the machine's speed falls on both alike.
"""

import httpx

from bench.common import p50_ms
from bench.loadgen import sequential

ROUNDS = 3


def measure(base: str, name: str, invoke_url: str, body: bytes, n: int) -> dict:
    made = httpx.put(f"{base}/api/v1/functions/{name}/url", json={"auth": "none"}, timeout=30)
    if made.status_code not in (200, 201):
        raise SystemExit(f"making the URL of {name}: {made.status_code} {made.text[:300]}")
    url = f"{base}/fn/{name}/hook?source=bench"
    first = httpx.post(url, content=body, timeout=30)
    if first.status_code != 200:
        raise SystemExit(f"calling the URL of {name}: {first.status_code} {first.text[:300]}")
    event = first.content  # the payload 2.0 event, echoed
    native: list[float] = []
    served: list[float] = []
    for _ in range(ROUNDS):
        native += sequential(invoke_url, event, n)
        served += sequential(url, body, n)
    value, floor = p50_ms(served), p50_ms(native)
    return {"value": value, "floor": floor, "ratio": value / floor, "samples": len(served),
            "floor_is": "the same node's /api/v1 warm invoke p50 with the same event, in alternating rounds"}
