"""The invoke page in a real browser on a real node: a sync call shows its output, start kind, duration,
logs and a link to the invocation; an async call is watched until it ends; the events used are offered
again after a reload; an event that is not JSON is stopped in the browser and refused by the node; output
that looks like markup stays text; the form needs its CSRF token; bob cannot call alice's function."""

import re
import uuid

import pytest
from tests.console.conftest import api, expect, shoot, sign_in, signed_in, watch

pytestmark = pytest.mark.sandbox

ECHO = ('import time\n'
        'def handler(event, context):\n'
        '    print("got", event)\n'
        '    if isinstance(event, dict) and event.get("sleep"):\n'
        '        time.sleep(event["sleep"])\n'
        '    return {"echo": event, "fn": context.function_name}\n')


@pytest.fixture(scope="module")
def echo(console):
    """Alice's echo function, with a published version 1 and an alias ``live``."""
    running, keys = console
    name = f"echo-{uuid.uuid4().hex[:6]}"
    with api(running, keys["alice"]["key"]) as client:
        assert client.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": ECHO}
                           ).status_code == 201
        assert client.post(f"/api/v1/functions/{name}/versions").status_code == 201
        assert client.post(f"/api/v1/functions/{name}/aliases", json={"name": "live", "version": "1"}
                           ).status_code == 201
    return name


def test_a_sync_call_shows_output_start_duration_logs_and_its_invocation(console, echo, page):
    running, keys = console
    problems = watch(page)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    sign_in(page, running, keys["alice"]["key"], then=f"/console/invoke?function={echo}")
    assert page.get_by_label("Function").input_value() == echo
    qualifiers = page.get_by_label("Version or alias").locator("option").all_text_contents()
    assert qualifiers == ["$LATEST (unqualified)", "version 1", "alias live → 1"]
    page.get_by_label("Event (JSON)").fill('{"html": "<img src=x onerror=alert(1)>", "n": 1}')
    page.get_by_role("button", name="Invoke", exact=True).click()
    answer = page.locator("#answer")
    expect()(answer).to_have_attribute("data-status", "succeeded")
    expect()(answer.locator(".badge.cold, .badge.warm, .badge.hot, .badge.forked")).to_contain_text("start")
    expect()(answer).to_contain_text(" ms")
    output = answer.locator("pre.output")
    expect()(output).to_contain_text('"html": "<img src=x onerror=alert(1)>"')  # text, not markup
    expect()(output).to_contain_text(f'"fn": "{echo}"')
    expect()(answer.locator("pre.logs")).to_contain_text("got {'html'")
    assert page.locator("#answer img").count() == 0
    link = answer.get_by_role("link", name=re.compile(r"^\w{8,}"))
    invocation = answer.get_attribute("data-invocation")
    assert link.get_attribute("href") == f"/console/invocations/{invocation}"
    with api(running, keys["alice"]["key"]) as client:
        assert client.get(f"/api/v1/invocations/{invocation}").json()["status"] == "succeeded"
    shoot(page, "invoke")

    # A version by its alias: the answer says which version ran.
    page.get_by_label("Version or alias").select_option("live")
    page.get_by_role("button", name="Invoke", exact=True).click()
    expect()(answer).not_to_have_attribute("data-invocation", invocation)
    expect()(answer).to_have_attribute("data-status", "succeeded")
    expect()(answer).to_contain_text("ran 1")
    assert dialogs == [] and problems == []


def test_an_async_call_is_watched_until_it_ends(console, echo, page):
    running, keys = console
    sign_in(page, running, keys["alice"]["key"], then=f"/console/invoke?function={echo}")
    page.get_by_label("Event (JSON)").fill('{"sleep": 1.5, "mode": "async"}')
    page.get_by_label("Async: queue it and watch").check()
    with page.expect_response(lambda r: r.url.endswith("/console/invoke") and r.request.method == "POST") as sent:
        page.get_by_role("button", name="Invoke", exact=True).click()
    assert 'data-status="queued"' in sent.value.text()  # its first answer: queued, polled from then on
    answer = page.locator("#answer")
    expect()(answer).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect()(answer.locator("pre.output")).to_contain_text('"mode": "async"')
    expect()(answer).to_contain_text("async")


def test_the_events_used_are_offered_again_after_a_reload(console, echo, page):
    running, keys = console
    sign_in(page, running, keys["alice"]["key"], then=f"/console/invoke?function={echo}")
    for n in range(7):
        page.get_by_label("Event (JSON)").fill(f'{{"try": {n}}}')
        page.get_by_role("button", name="Invoke", exact=True).click()
        expect()(page.locator("#answer pre.output")).to_contain_text(f'"try": {n}')
    page.reload()
    recent = page.get_by_label("Recent events")
    options = recent.locator("option").all_text_contents()
    assert options[0] == "Choose one of 5 saved events…"
    assert options[1:] == [f'{{"try": {n}}}' for n in (6, 5, 4, 3, 2)]
    recent.select_option(label='{"try": 4}')
    assert page.get_by_label("Event (JSON)").input_value() == '{"try": 4}'


def test_an_event_that_is_not_json_is_stopped_in_the_browser_and_by_the_node(console, echo, page):
    running, keys = console
    sign_in(page, running, keys["alice"]["key"], then=f"/console/invoke?function={echo}")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
    page.get_by_label("Event (JSON)").fill('{"a": ')
    page.get_by_role("button", name="Invoke", exact=True).click()
    expect()(page.locator("#event-problem")).to_contain_text("not valid JSON")
    assert page.get_by_label("Event (JSON)").get_attribute("aria-invalid") == "true"
    assert sent == []
    page.get_by_label("Event (JSON)").fill('{"a":1}')
    page.get_by_role("button", name="Format JSON").click()
    assert page.get_by_label("Event (JSON)").input_value() == '{\n  "a": 1\n}'
    expect()(page.locator("#event-problem")).to_be_hidden()
    with signed_in(running, keys["alice"]["key"]) as client:
        headers = {"X-CSRF-Token": client.csrf, "HX-Request": "true"}
        resp = client.post("/console/invoke", data={"function": echo, "event": "[1, 2"}, headers=headers)
        assert resp.status_code == 422 and "the event is not valid JSON" in resp.text
        resp = client.post("/console/invoke", data={"function": echo, "event": "[" * 600 + "]" * 600},
                           headers=headers)
        assert resp.status_code == 422 and "nested more than" in resp.text
        resp = client.post("/console/invoke", data={"function": echo, "event": '"' + "x" * (6 << 20) + '"'},
                           headers=headers)
        assert resp.status_code == 413
        resp = client.post("/console/invoke", data={"function": echo, "qualifier": "9", "event": "{}"},
                           headers=headers)
        assert resp.status_code == 404
        resp = client.post("/console/invoke", data={"function": echo, "mode": "later"}, headers=headers)
        assert resp.status_code == 422


def test_the_form_needs_its_csrf_token_and_bob_cannot_call_alices_function(console, echo, page):
    running, keys = console
    with signed_in(running, keys["alice"]["key"]) as client:
        form = {"function": echo, "event": "{}", "mode": "sync"}
        assert client.post("/console/invoke", data=form).status_code == 403
        assert client.post("/console/invoke", data={**form, "csrf": "f" * 64}).status_code == 403
        resp = client.post("/console/invoke", data={**form, "csrf": client.csrf})
        assert resp.status_code == 200 and 'data-status="succeeded"' in resp.text  # a whole page without htmx
        invocation = re.search(r'data-invocation="(\w+)"', resp.text).group(1)
    with signed_in(running, keys["bob"]["key"]) as client:
        headers = {"X-CSRF-Token": client.csrf, "HX-Request": "true"}
        assert client.post("/console/invoke", data=form, headers=headers).status_code == 404
        assert client.post("/console/invoke", data={**form, "mode": "async"}, headers=headers).status_code == 404
        assert client.get(f"/console/invoke?function={echo}").status_code == 404
        assert client.get(f"/console/invoke/result/{invocation}", headers={"HX-Request": "true"}).status_code == 404
        page_text = client.get("/console/invoke").text
        assert echo not in page_text and "You have no functions yet" in page_text


def test_the_invoke_page_at_phone_width(console, echo, browser):
    running, keys = console
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        sign_in(page, running, keys["alice"]["key"], then=f"/console/invoke?function={echo}")
        page.get_by_role("button", name="Invoke", exact=True).click()
        expect()(page.locator("#answer")).to_have_attribute("data-status", "succeeded")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        shoot(page, "invoke-phone")
    finally:
        context.close()
