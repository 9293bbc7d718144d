"""The overview page in a real browser: a tenant's own figures and charts, nothing of another tenant's,
and the node section for admins only."""

import time
import uuid

import pytest
from tests.console.conftest import HTML, api, shoot, sign_in, watch

pytestmark = pytest.mark.sandbox

OK = "def handler(event, context):\n    return {'echo': event}\n"
FAILS = "def handler(event, context):\n    raise ValueError('<img src=x onerror=alert(1)>')\n"


def deploy(running, key: str, name: str, code: str) -> None:
    with api(running, key) as client:
        r = client.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": code})
        assert r.status_code == 201, r.text


def invoke(running, key: str, name: str) -> dict:
    with api(running, key) as client:
        return client.post(f"/api/v1/functions/{name}/invoke", json={"n": 1}).json()


@pytest.fixture(scope="module")
def alice_calls(console):
    """Alice's functions, called: three good calls and one failure; (good name, bad name, failed id)."""
    running, keys = console
    key = keys["alice"]["key"]
    good, bad = f"ok-{uuid.uuid4().hex[:6]}", f"bad-{uuid.uuid4().hex[:6]}"
    deploy(running, key, good, OK)
    deploy(running, key, bad, FAILS)
    for _ in range(3):
        assert invoke(running, key, good)["status"] == "succeeded"
    failed = invoke(running, key, bad)
    assert failed["status"] == "failed"
    return good, bad, failed["invocation_id"]


def open_overview(page, running, expected_calls: str) -> None:
    """Open the overview until it counts ``expected_calls`` (sync calls are written behind by a few ms)."""
    deadline = time.monotonic() + 15
    while True:
        page.goto(f"{running.url}/console/")
        if page.locator("#stat-calls").inner_text().strip() == expected_calls or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    page.locator(".chart canvas").nth(1).wait_for()


def test_a_tenant_sees_its_calls_charts_and_failures(console, alice_calls, page):
    running, keys = console
    good, bad, failed_id = alice_calls
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    problems = watch(page)
    sign_in(page, running, keys["alice"]["key"])
    open_overview(page, running, "4")

    assert page.locator("#stat-calls").inner_text().strip() == "4"
    assert page.locator("#stat-errors").inner_text().startswith("1")
    assert "ms" in page.locator("#stat-p50").inner_text() and "ms" in page.locator("#stat-p99").inner_text()
    assert page.locator("#stat-backlog").inner_text().strip() == "0"
    starts = page.locator("#stat-starts").inner_text()
    assert all(kind in starts for kind in ("cold", "warm", "hot"))
    assert page.locator(".chart canvas").count() == 2  # both charts drawn by uPlot
    assert page.locator(".chart .u-legend").count() == 2

    row = page.locator("#failures tbody tr")
    assert row.count() == 1
    assert bad in row.inner_text() and "ValueError" in row.inner_text()
    assert "<img src=x onerror=alert(1)>" in row.inner_text()  # the function's message, as text
    assert page.locator("#failures img").count() == 0 and dialogs == []
    link = row.locator(f'a[href="/console/invocations/{failed_id}"]')
    assert link.count() == 1
    assert row.locator(f'a[href="/console/functions/{bad}"]').count() == 1

    assert page.locator("#node-section").count() == 0  # a tenant sees nothing node-wide
    assert "Nodes" not in page.locator("main").inner_text()
    assert page.locator('nav a[aria-current="page"]').inner_text() == "Overview"
    shoot(page, "overview")
    assert problems == []

    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    page.locator(".chart canvas").nth(1).wait_for()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width} px)"
    shoot(page, "overview-phone")
    assert problems == []


def test_another_tenant_sees_none_of_it(console, alice_calls, page):
    running, keys = console
    good, bad, _ = alice_calls
    problems = watch(page)
    sign_in(page, running, keys["bob"]["key"])
    page.locator(".chart canvas").nth(1).wait_for()
    assert page.locator("#stat-calls").inner_text().strip() == "0"
    assert page.locator("#stat-errors").inner_text().startswith("0")
    assert page.locator("#failures tbody tr").count() == 0
    html = page.content()
    assert good not in html and bad not in html
    assert page.locator("#node-section").count() == 0
    fragment = page.request.get(f"{running.url}/console/overview/figures", headers={"HX-Request": "true"})
    assert fragment.status == 200 and "<html" not in fragment.text()
    assert 'id="stat-calls"' in fragment.text() and bad not in fragment.text() and "node-section" not in fragment.text()
    assert problems == []


def test_an_admin_sees_the_node_and_the_figures_refresh(console, alice_calls, page):
    running, keys = console
    problems = watch(page)
    sign_in(page, running, keys["admin"]["key"])
    page.locator(".chart canvas").nth(1).wait_for()
    section = page.locator("#node-section")
    assert section.count() == 1
    pool = page.locator("#pool tbody").inner_text()
    assert "python3" in pool
    nodes = page.locator("#nodes tbody tr")
    assert nodes.count() >= 1 and "this node" in nodes.first.inner_text() and "up" in nodes.first.inner_text()
    # The admin's own tenant ("default") made no call: alice's stay hers.
    assert page.locator("#stat-calls").inner_text().strip() == "0"
    shoot(page, "overview-admin")

    with page.expect_response(lambda r: "/console/overview/figures" in r.url, timeout=20_000) as refreshed:
        pass
    assert refreshed.value.status == 200
    page.locator("#node-section").wait_for()
    page.locator(".chart canvas").nth(1).wait_for()
    assert page.locator(".chart canvas").count() == 2  # redrawn, not piled up
    assert problems == []


def test_signed_out_requests_go_to_the_login(console):
    running, _ = console
    with running.client() as anonymous:
        page = anonymous.get("/console/", headers=HTML)
        assert page.status_code == 303 and page.headers["location"].startswith("/console/login")
        fragment = anonymous.get("/console/overview/figures", headers={"HX-Request": "true"})
        assert fragment.status_code == 401 and fragment.headers["hx-redirect"].startswith("/console/login")
