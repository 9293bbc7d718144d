"""The Functions list, a function's page and an invocation's page, in a real Chromium against a real node.

alice deploys through the API (a source file and a zip package), invokes (sync, and async with a slow
function that logs), and then reads everything through the console; bob, another tenant, sees none of it.
"""

import base64
import io
import re
import zipfile

import pytest
from tests.console.conftest import api, shoot, sign_in, watch

pytestmark = pytest.mark.sandbox

HELLO = '''import json

def handler(event, context):
    """Greets whoever the event names."""
    print("hello from the console test")
    return {"greeting": "hi " + str(event.get("who", "nobody"))}
'''
SLOW = '''import time

def handler(event, context):
    print("slow: starting", flush=True)
    time.sleep(2)
    print("slow: done", flush=True)
    return {"slept": 2}
'''
EVIL = '''def handler(event, context):
    print("<script>alert(1)</script>")
    return "<img src=x onerror=alert(1)>"
'''
BROKEN = '''def handler(event, context):
    raise ValueError("bad <b>input</b>")
'''
MAIN = '''from lib import util

def handler(event, context):
    return util.double(event.get("n", 1))
'''
UTIL = '''def double(n):
    return 2 * n  # the package's helper
'''


@pytest.fixture
def problems(page) -> list[str]:
    """Console errors and CSP violations of the page."""
    return watch(page)


def _package() -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("main.py", MAIN)
        archive.writestr("lib/__init__.py", "")
        archive.writestr("lib/util.py", UTIL)
        archive.writestr("data/blob.bin", bytes(range(256)) * 4)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def alice(console):
    """alice's functions and calls, made through the API: ``(running, keys, ids)``."""
    running, keys = console
    ids = {}
    with api(running, keys["alice"]["key"]) as client:
        for name, fields in (("hello", {"code": HELLO, "env": {"GREETING": "hi"}}), ("slow", {"code": SLOW}),
                             ("evil", {"code": EVIL}), ("pkg", {"code_base64": _package()}),
                             ("doomed", {"code": HELLO}), ("broken", {"code": BROKEN})):
            made = client.post("/api/v1/functions", json={"name": name, "runtime": "python3", **fields})
            assert made.status_code == 201, made.text
        for name, event in (("hello", {"who": "alice"}), ("evil", {}), ("pkg", {"n": 21})):
            answer = client.post(f"/api/v1/functions/{name}/invoke", json=event)
            assert answer.status_code == 200, answer.text
            ids[name] = answer.json()["invocation_id"]
        assert answer.json()["output"] == 42
        ids["broken"] = client.post("/api/v1/functions/broken/invoke", json={}).json()["invocation_id"]
    return running, keys, ids


def test_the_list_searches_and_links_each_function(alice, page, problems):
    running, keys, _ = alice
    sign_in(page, running, keys["alice"]["key"], then="/console/functions")
    table = page.locator("#results table")
    for name in ("hello", "slow", "evil", "pkg"):
        assert table.get_by_role("link", name=name, exact=True).is_visible()
    hello = table.get_by_role("row").filter(has=page.get_by_role("link", name="hello", exact=True))
    assert "python3" in hello.inner_text() and "0 %" in hello.inner_text()  # called once, no error
    shoot(page, "functions")

    page.get_by_label("Search by name").fill("pk")  # live: htmx swaps the results, the URL follows
    page.wait_for_url(re.compile(r".*/console/functions\?q=pk$"))
    page.locator("#results").get_by_text("1 function matching").wait_for()
    assert page.locator("#results tbody tr").count() == 1
    page.get_by_label("Search by name").fill("nothing-like-this")
    page.get_by_text("No function has").wait_for()
    page.get_by_label("Search by name").fill("")
    page.get_by_label("Search by name").press("Enter")  # the plain form works too
    page.wait_for_url(re.compile(r".*/console/functions\?q=$"))
    page.get_by_role("link", name="hello", exact=True).click()
    page.wait_for_url(re.compile(r".*/console/functions/hello$"))
    assert problems == []


def test_the_function_page_shows_config_code_and_calls(alice, page, problems):
    running, keys, ids = alice
    sign_in(page, running, keys["alice"]["key"], then="/console/functions/hello")
    config = page.locator("section", has=page.get_by_role("heading", name="Configuration"))
    assert "main.handler" in config.inner_text() and "128 MB" in config.inner_text()
    assert page.locator("section", has=page.get_by_role("heading", name="Environment variables")).get_by_text(
        "GREETING").is_visible()
    code = page.locator("#code .code")
    assert code.locator("span.k", has_text="def").count() >= 1  # highlighted: Pygments' keyword class
    assert "hello from the console test" in code.inner_text()
    color = code.locator("span.k").first.evaluate("e => getComputedStyle(e).color")
    assert color != page.locator("#code h2").evaluate("e => getComputedStyle(e).color")  # code.css applies
    main = page.locator("main")
    assert main.get_by_role("link", name="Invoke", exact=True).get_attribute("href") == "/console/invoke?function=hello"
    assert main.get_by_role("link", name="Update").get_attribute("href") == "/console/deploy?function=hello"
    calls = page.locator("section", has=page.get_by_role("heading", name="Recent invocations"))
    assert "succeeded" in calls.inner_text()
    shoot(page, "function")

    calls.get_by_role("link", name=ids["hello"][:12]).click()
    page.wait_for_url(re.compile(rf".*/console/invocations/{ids['hello']}$"))
    assert '"greeting": "hi alice"' in page.locator("#output").inner_text()
    assert "hello from the console test" in page.locator("#logs").inner_text()
    assert page.locator("#status").inner_text() == "succeeded"

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{running.url}/console/functions/hello")
    shoot(page, "function-narrow")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1  # nothing wider than the phone
    assert problems == []


def test_a_package_shows_its_tree_and_files(alice, page, problems):
    running, keys, _ = alice
    sign_in(page, running, keys["alice"]["key"], then="/console/functions/pkg")
    files = page.get_by_role("navigation", name="Files of the package")
    for name in ("main.py", "lib/", "util.py", "blob.bin"):
        assert files.get_by_text(name, exact=True).is_visible()
    assert "from lib import util" in page.locator("#code .code").inner_text()  # the handler's file first
    files.get_by_role("link", name="util.py").click()
    page.wait_for_url(re.compile(r".*\?file=lib/util\.py#code$"))
    assert "the package's helper" in page.locator("#code .code").inner_text()
    files.get_by_role("link", name="blob.bin").click()
    page.get_by_text("is a binary file").wait_for()
    assert problems == []
    shoot(page, "function-package")
    missing = page.goto(f"{running.url}/console/functions/pkg?file=nope.py")
    assert missing.status == 404


def test_an_async_call_is_tailed_until_it_ends(alice, page, problems):
    running, keys, _ = alice
    sign_in(page, running, keys["alice"]["key"], then="/console/functions")
    with api(running, keys["alice"]["key"]) as client:
        queued = client.post("/api/v1/functions/slow/async", json={})
    assert queued.status_code == 202, queued.text
    invocation = queued.json()["invocation_id"]
    page.goto(f"{running.url}/console/invocations/{invocation}")
    assert page.locator("#status").inner_text() in ("queued", "running")
    page.evaluate("window.stillTheSamePage = true")
    shoot(page, "invocation-running")
    page.locator("#status", has_text="succeeded").wait_for(timeout=30_000)
    assert page.evaluate("window.stillTheSamePage") is True  # swapped in place, not reloaded
    assert "slow: starting" in page.locator("#logs").inner_text()
    assert "slow: done" in page.locator("#logs").inner_text()
    assert '"slept": 2' in page.locator("#output").inner_text()
    assert page.locator("#live").get_attribute("hx-trigger") is None  # the polling stopped
    shoot(page, "invocation")
    assert problems == []


def test_output_and_logs_are_text_never_markup(alice, page, problems):
    running, keys, ids = alice
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    sign_in(page, running, keys["alice"]["key"], then=f"/console/invocations/{ids['evil']}")
    assert page.locator("#output").inner_text() == '"<img src=x onerror=alert(1)>"'
    assert "<script>alert(1)</script>" in page.locator("#logs").inner_text()
    assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0
    page.goto(f"{running.url}/console/invocations/{ids['broken']}")
    assert page.get_by_role("alert").inner_text() == "ValueError: bad <b>input</b>"
    assert 'raise ValueError("bad <b>input</b>")' in page.locator("#stack").inner_text()
    assert page.locator("#status").inner_text() == "failed"
    page.goto(f"{running.url}/console/functions/evil")  # the code view escapes it too
    assert "<script>alert(1)</script>" in page.locator("#code .code").inner_text()
    page.wait_for_timeout(300)
    assert dialogs == [] and problems == []


def test_another_tenant_sees_nothing_of_alice(alice, page):
    running, keys, ids = alice
    sign_in(page, running, keys["bob"]["key"], then="/console/functions")
    assert page.get_by_text("No functions yet").is_visible()
    assert page.get_by_role("link", name="Deploy your first function").get_attribute("href") == "/console/deploy"
    for path in ("/console/functions/hello", f"/console/invocations/{ids['hello']}",
                 f"/console/invocations/{ids['hello']}/live", "/console/functions/pkg?file=main.py"):
        answer = page.goto(running.url + path)
        assert answer.status == 404, path
        assert "hi alice" not in page.content()
    assert page.request.post(f"{running.url}/console/functions/doomed/delete",
                             form={"csrf": _csrf(page)}).status == 404
    assert page.goto(f"{running.url}/console/functions/NOT..valid").status == 404
    assert page.goto(f"{running.url}/console/invocations/{'x' * 200}").status == 404


def _csrf(page) -> str:
    return page.locator("input[name=csrf]").first.get_attribute("value")


def test_publish_and_delete_from_the_function_page(alice, page, problems):
    running, keys, _ = alice
    sign_in(page, running, keys["alice"]["key"], then="/console/functions/hello")
    page.get_by_label("Version description").fill("first <b>cut</b>")
    page.get_by_role("button", name="Publish version").click()
    page.get_by_text("Published as version 1.").wait_for()
    versions = page.locator("section", has=page.get_by_role("heading", name="Versions and aliases"))
    assert "first <b>cut</b>" in versions.inner_text()

    page.goto(f"{running.url}/console/functions/doomed")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete").click()
    page.wait_for_url(re.compile(r".*/console/functions\?deleted=doomed$"))
    assert page.get_by_text("Function doomed was deleted.").is_visible()
    assert page.locator("#results").get_by_role("link", name="doomed").count() == 0
    with api(running, keys["alice"]["key"]) as client:
        assert client.get("/api/v1/functions/doomed").status_code == 404
        assert client.get("/api/v1/functions/hello/versions").json()["versions"][0]["description"] == "first <b>cut</b>"
    assert problems == []


def test_changes_without_the_csrf_token_are_refused(alice, page):
    running, keys, _ = alice
    sign_in(page, running, keys["alice"]["key"], then="/console/functions/hello")
    for form in ({}, {"csrf": "0" * 64}):
        for action in ("publish", "delete"):
            refused = page.request.post(f"{running.url}/console/functions/hello/{action}", form=form)
            assert refused.status == 403, (action, form)
    with api(running, keys["alice"]["key"]) as client:
        assert client.get("/api/v1/functions/hello").status_code == 200
