"""The pool sizes itself on a real node: blank machines follow the start rate, idle machines expire, bursts queue.

Windows and TTLs are set small so each test runs in seconds; every wait is a generous bound on a
condition, never a timing assertion.
"""

import concurrent.futures
import re
import threading
import time
import uuid

import pytest

pytestmark = pytest.mark.sandbox

SLEEPY = "import time\ndef handler(e, c):\n    time.sleep(e.get('s', 0))\n    return 'done'\n"


def create(client, code=SLEEPY, **settings) -> dict:
    name = f"a-{uuid.uuid4().hex[:8]}"
    resp = client.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": code, **settings})
    assert resp.status_code == 201, resp.text
    return resp.json()


def wait_until(check, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def python3_gauges(client) -> dict[str, float]:
    """The python3 blank count and blank target, as Prometheus scrapes them."""
    text = client.get("/metrics").text
    blank = re.search(r'^nimbus_pool_machines\{node="[^"]+",runtime="python3",state="blank"\} (\S+)$', text, re.M)
    target = re.search(r'^nimbus_pool_target_blank\{node="[^"]+",runtime="python3"\} (\S+)$', text, re.M)
    assert blank and target, text
    return {"blank": float(blank.group(1)), "target": float(target.group(1))}


def test_blank_machines_follow_the_start_rate_up_under_load_and_back_down_when_idle(tmp_path, make_node):
    """With min_warm=0 a warm start can only come from a blank the autoscaler asked for."""
    with make_node(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", runtimes=["python3"], min_warm=0, max_warm=4,
                   autoscale_window_s=2, max_uses=1, health_interval_s=60) as running, running.client() as client:
        fn = create(client)
        url = f"/api/v1/functions/{fn['name']}/invoke"
        assert python3_gauges(client) == {"blank": 0, "target": 0}

        # max_uses=1: no machine serves twice, so every call is a warm or a cold start
        stop = threading.Event()
        starts: list[str] = []
        failures: list[str] = []

        def hammer() -> None:
            with running.client() as own:
                while not stop.is_set():
                    resp = own.post(url, json={})
                    if resp.status_code != 200 or resp.json()["status"] != "succeeded":
                        failures.append(resp.text)
                    starts.append(resp.json().get("start"))

        peak = {"blank": 0.0, "target": 0.0}
        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            deadline = time.monotonic() + 30
            while "warm" not in starts or len(starts) < 20:
                assert time.monotonic() < deadline, f"no warm start under load: {starts}"
                now = python3_gauges(client)
                peak = {key: max(peak[key], now[key]) for key in peak}
                time.sleep(0.05)
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert not failures, failures[:3]
        assert set(starts) <= {"cold", "warm"}

        def record_peak() -> bool:
            now = python3_gauges(client)
            peak.update({key: max(peak[key], now[key]) for key in peak})
            return peak["blank"] >= 1

        wait_until(record_peak)  # up: blanks booted ahead of demand (during the load, or refilled just after)
        assert 1 <= peak["target"] <= 4
        # down: with no more starts the rate decays, the target returns to min_warm and the surplus is destroyed
        wait_until(lambda: python3_gauges(client) == {"blank": 0, "target": 0})
        health = client.get("/health").json()["pool"]["python3"]
        assert health["blank"] == 0 and health["target"] == 0 and health["booting"] == 0


def test_idle_initialised_machines_expire_after_idle_ttl(tmp_path, make_node):
    """An idle machine serves hot until NIMBUS_IDLE_TTL_S passes without a call; then it is destroyed."""
    with make_node(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", runtimes=["python3"], min_warm=0, idle_ttl_s=2,
                   health_interval_s=0.2) as running, running.client() as client:
        fn = create(client)
        url = f"/api/v1/functions/{fn['name']}/invoke"
        assert client.post(url, json={}).json()["start"] == "cold"
        assert client.post(url, json={}).json()["start"] == "hot"
        # Not "idle == 0": the health loop takes an idle machine out while it pings it, and puts it back.
        wait_until(lambda: client.get("/health").json()["machines"] == 0)
        assert client.post(url, json={}).json()["start"] in ("cold", "warm")


def test_a_burst_beyond_machine_capacity_waits_for_machines_then_is_refused_with_429(tmp_path, make_node):
    """Calls past max_machines wait for a machine; past workers they queue; past the queue they get 429."""
    with make_node(tmp_path, f"sqlite:///{tmp_path / 'n.db'}", runtimes=["python3"], min_warm=0, max_machines=2,
                   workers=4, queue_size=2) as running, running.client() as client:
        fn = create(client, concurrency=10)
        url = f"/api/v1/functions/{fn['name']}/invoke"
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: client.post(url, json={"s": 1.5}), range(12)))
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429}, codes
        served = [r.json() for r in responses if r.status_code == 200]
        assert len(served) > 2, codes  # more calls than machines were served: the rest waited, not failed
        assert all(out["status"] == "succeeded" for out in served), served
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] and "queue" in refused.json()["detail"]
        assert client.get("/health").json()["machines"] <= 2
