"""A page served by a function, opened in a real browser: Debian's headless Chromium driven by
Playwright's Python package (its own browser download cannot work here, so ``executable_path``).

The page is HTML from a function URL whose script fetches JSON from the same function URL and
renders it; a form POSTs back and the answer page shows what the function parsed. So the browser's
own requests (its headers, its form encoding, its fetch) go through the payload 2.0 mapping both ways.
"""

import os
import shutil

import pytest

pytestmark = pytest.mark.sandbox

CHROMIUM = os.environ.get("NIMBUS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (pip install -e .[dev])")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM}: make test installs Debian's chromium when it runs as root",
                allow_module_level=True)

SITE = """
import json
from urllib.parse import parse_qs

PAGE = '''<!doctype html>
<html><head><title>Nimbus site</title></head>
<body>
<h1 id="title">Served by a function</h1>
<p id="data">loading</p>
<form method="post" action="greet"><input name="who" value="chromium"><button id="send">send</button></form>
<script>
fetch("api/items?tag=a&tag=b").then(r => r.json()).then(d => {
  document.getElementById("data").textContent = d.items.join(",") + " for " + d.tags;
});
</script>
</body></html>'''


def handler(event, context):
    path = event["rawPath"].strip("/")
    if path == "api/items":
        tags = event["queryStringParameters"]["tag"]
        return {"items": ["x", "y", "z"], "tags": tags, "agent": event["requestContext"]["http"]["userAgent"]}
    if path == "greet" and event["requestContext"]["http"]["method"] == "POST":
        form = parse_qs(event["body"])
        return {"statusCode": 200, "headers": {"content-type": "text/html; charset=utf-8"},
                "body": "<html><body><p id='hello'>hello " + form["who"][0] + "</p></body></html>"}
    return {"statusCode": 200, "headers": {"content-type": "text/html; charset=utf-8"}, "body": PAGE}
"""


@pytest.fixture(scope="module")
def site(make_module_node, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with make_module_node(home, f"sqlite:///{home / 'nimbus.db'}") as running:
        with running.client() as api:
            resp = api.post("/api/v1/functions", json={"name": "site", "runtime": "python3", "code": SITE})
            assert resp.status_code == 201, resp.text
            resp = api.put("/api/v1/functions/site/url", json={"auth": "none"})
            assert resp.status_code in (200, 201), resp.text
            yield running, api


def test_a_page_served_by_a_function_renders_fetches_and_posts_in_chromium(site):
    node, api = site
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            response = page.goto(f"{node.url}/fn/site/index.html")
            assert response is not None and response.status == 200
            assert page.title() == "Nimbus site"
            assert page.locator("#title").inner_text() == "Served by a function"
            # the page's script fetched JSON from the function: repeated query keys arrive comma-joined
            page.wait_for_function("document.getElementById('data').textContent !== 'loading'")
            assert page.locator("#data").inner_text() == "x,y,z for a,b"
            page.click("#send")
            page.wait_for_selector("#hello")
            assert page.locator("#hello").inner_text() == "hello chromium"
        finally:
            browser.close()
    # every request the browser made was recorded as a URL invocation with Chromium's user agent
    listed = api.get("/api/v1/functions/site/invocations").json()["invocations"]
    assert len(listed) >= 3
    fetched = [inv for inv in (api.get(f"/api/v1/invocations/{i['invocation_id']}").json() for i in listed)
               if isinstance(inv.get("output"), dict) and "agent" in inv["output"]]
    assert fetched and "Chrome" in fetched[0]["output"]["agent"] and fetched[0]["trigger"] == "url"
