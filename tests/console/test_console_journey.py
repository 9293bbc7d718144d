"""The console's whole story in one browser session, as issue 22 tells it: sign in, deploy a python3 function
from the deploy page, invoke it from the invoke page, see the invocation and its logs, update it, see the new
version, watch an async call finish, revoke a key as admin, check that another tenant sees nothing of it,
that markup in output runs no script, and that a form posted without its CSRF token is refused.

The pages' own test modules cover each page in depth; this one checks that they make one working console.
"""

import uuid

import pytest
from tests.console.conftest import shoot, sign_in

pytestmark = pytest.mark.sandbox

V1 = '''
import time

def handler(event, context):
    print("v1 got", event)
    time.sleep(event.get("sleep", 0))
    return {"greeting": "hello " + event.get("who", "you"), "version": 1}
'''
V2 = V1.replace('"version": 1', '"version": 2').replace("v1 got", "v2 got")


def _deploy(page, running, name: str, code: str, *, update: bool = False) -> None:
    page.goto(f"{running.url}/console/deploy" + (f"?function={name}" if update else ""))
    if not update:
        page.get_by_label("Name").fill(name)
        page.get_by_label("Runtime").select_option("python3")
    else:
        page.get_by_label("Paste").check()
    page.get_by_label("Source").fill(code)
    page.get_by_role("button", name=f"Update {name}" if update else "Deploy").click()
    page.wait_for_selector("#deploy-job[data-state=done]", timeout=60_000)


def _invoke(page, running, name: str, event: str, *, mode: str = "sync") -> None:
    page.goto(f"{running.url}/console/invoke?function={name}")
    page.get_by_label("Event (JSON)").fill(event)
    page.locator(f"#mode-{mode}").check()
    page.get_by_role("button", name="Invoke", exact=True).click()
    page.wait_for_selector("#answer[data-status=succeeded]", timeout=60_000)


def test_a_tenant_deploys_invokes_updates_and_watches_from_the_console(console, browser):
    running, keys = console
    name = f"journey-{uuid.uuid4().hex[:6]}"
    dialogs: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        sign_in(page, running, keys["alice"]["key"])
        assert page.get_by_role("heading", name="Overview").is_visible()

        _deploy(page, running, name, V1)
        assert page.get_by_role("link", name=f"Open {name}").is_visible()
        shoot(page, "journey-deployed")

        # Sync from the invoke page: the answer, its start kind and its timing.
        _invoke(page, running, name, '{"who": "ada"}')
        answer = page.locator("#answer")
        assert "hello ada" in answer.locator("pre.output").inner_text()
        assert answer.locator(".badge", has_text="start").count() == 1
        assert " ms" in answer.inner_text()
        shoot(page, "journey-invoked")

        # The invocation, with its logs.
        answer.get_by_role("link").first.click()
        page.wait_for_url("**/console/invocations/*")
        assert "hello ada" in page.locator("#output").inner_text()
        assert "v1 got {'who': 'ada'}" in page.locator("#logs").inner_text()
        shoot(page, "journey-invocation")

        # Update it, and see version 2 answer; publish it and see the published version on its page.
        _deploy(page, running, name, V2, update=True)
        _invoke(page, running, name, '{"who": "bo"}')
        assert '"version": 2' in page.locator("#answer pre.output").inner_text()
        page.goto(f"{running.url}/console/functions/{name}")
        page.get_by_role("button", name="Publish version").click()
        page.wait_for_load_state()
        versions = page.locator("section", has=page.get_by_role("heading", name="Versions and aliases"))
        assert versions.get_by_role("cell", name="1", exact=True).count() >= 1
        assert page.locator("a[href*='/console/invocations/']").count() >= 2  # both calls listed
        shoot(page, "journey-function")

        # An async call: queued, then running, then its result, without a reload.
        _invoke(page, running, name, '{"who": "async", "sleep": 1.5}', mode="async")
        assert "hello async" in page.locator("#answer pre.output").inner_text()

        # Markup in an event comes back as text and runs nothing.
        _invoke(page, running, name, '{"who": "<img src=x onerror=alert(1)>"}')
        assert "hello <img src=x onerror=alert(1)>" in page.locator("#answer pre.output").inner_text()
        assert page.locator("#answer img").count() == 0

        # A form posted without its CSRF token changes nothing.
        refused = page.request.post(f"{running.url}/console/functions/{name}/delete", form={"confirm": "yes"})
        assert refused.status == 403
        assert page.goto(f"{running.url}/console/functions/{name}").status == 200

        assert dialogs == [] and errors == []
    finally:
        context.close()

    # Another tenant sees none of it.
    other = browser.new_context()
    page = other.new_page()
    try:
        sign_in(page, running, keys["bob"]["key"], then="/console/functions")
        assert name not in page.content()
        assert page.goto(f"{running.url}/console/functions/{name}").status == 404
    finally:
        other.close()


def test_an_admin_revokes_a_key_and_its_console_session_ends(console, browser):
    running, keys = console
    admin = browser.new_context()
    holder = browser.new_context()
    try:
        page = admin.new_page()
        sign_in(page, running, keys["admin"]["key"], then="/console/keys")
        label = f"carol-{uuid.uuid4().hex[:6]}"
        page.locator("#key-tenant").fill("carol")
        page.locator("#key-name").fill(label)
        page.get_by_role("button", name="Create key").click()
        created = page.locator("input[readonly][value^='nmb_']").first
        created.wait_for()
        key = created.input_value()
        shoot(page, "journey-key-created")

        carol = holder.new_page()
        sign_in(carol, running, key, then="/console/functions")
        assert carol.get_by_role("heading", name="Functions").is_visible()

        page.goto(f"{running.url}/console/keys")
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name=f"Revoke key {label} (carol)").click()
        page.get_by_role("row", name=label).get_by_text("revoked").wait_for()

        carol.goto(f"{running.url}/console/functions")
        assert "/console/login" in carol.url
    finally:
        admin.close()
        holder.close()
