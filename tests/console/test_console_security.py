"""The console's security, attacked from outside on a real node with auth on: CSRF on every changing route,
the security headers, one tenant crawling every page it can reach for another's data, a function whose
output and logs are markup, and malformed input.
"""

import html
import re
from urllib.parse import urlsplit

import pytest
from tests.console.conftest import HTML, api, login_form, routes, shoot, sign_in, signed_in, watch

pytestmark = pytest.mark.sandbox

# Written out, not imported: the test states the policy, the code must match it.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
XSS_OUTPUT = "<img src=x onerror=alert(1)>"
XSS_LOG = "<script>alert(1)</script>"
ECHO = "def handler(event, context):\n    return {'event': event}\n"
XSS = f"def handler(event, context):\n    print({XSS_LOG!r})\n    return {XSS_OUTPUT!r}\n"
ALICE_FN = "alice-private-fn"


@pytest.fixture(scope="module")
def seeded(console):
    """alice's private function with a sync and an async call; bob's own function and the one printing markup."""
    running, keys = console
    made = {}
    with api(running, keys["alice"]["key"]) as alice:
        assert alice.post("/api/v1/functions", json={"name": ALICE_FN, "runtime": "python3",
                                                     "code": ECHO}).status_code == 201
        made["alice_sync"] = alice.post(f"/api/v1/functions/{ALICE_FN}/invoke", json={"x": 1}).json()["invocation_id"]
        made["alice_async"] = alice.post(f"/api/v1/functions/{ALICE_FN}/async", json={}).json()["invocation_id"]
    with api(running, keys["bob"]["key"]) as bob:
        for name, code in (("bob-fn", ECHO), ("bob-xss", XSS)):
            assert bob.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                       "code": code}).status_code == 201
        answer = bob.post("/api/v1/functions/bob-xss/invoke", json={}).json()
        assert answer["output"] == XSS_OUTPUT, answer
        made["xss"] = answer["invocation_id"]
        assert XSS_LOG in bob.get(f"/api/v1/invocations/{made['xss']}").json()["logs"]
    return made


def _fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: values.get(m.group(1), "0" * 32), path)


# ---------------------------------------------------------------- CSRF


def test_every_changing_route_refuses_a_missing_or_foreign_csrf_token_or_another_origin(console, seeded):
    running, keys = console
    posts = routes(running.app, "POST")
    assert {"/console/login", "/console/logout", "/console/keys", "/console/keys/{key_id}/revoke"} <= set(posts)
    with api(running, keys["admin"]["key"]) as admin_api:
        keys_before = admin_api.get("/api/v1/keys").json()["keys"]
    with api(running, keys["alice"]["key"]) as alice_api:
        versions_before = alice_api.get(f"/api/v1/functions/{ALICE_FN}/versions").json()
        calls_before = alice_api.get(f"/api/v1/functions/{ALICE_FN}/invocations").json()
    values = {"name": ALICE_FN, "key_id": keys["bob"]["id"], "invocation_id": seeded["alice_sync"]}
    with signed_in(running, keys["admin"]["key"]) as admin, signed_in(running, keys["alice"]["key"]) as alice, \
            signed_in(running, keys["bob"]["key"]) as bob:
        for route in posts:
            own = admin if "/keys" in route else alice
            url = _fill(route, values)
            form = {"key": keys["alice"]["key"], "tenant": "mallory", "name": ALICE_FN, "function": ALICE_FN,
                    "event": "{}", "mode": "sync", "runtime": "python3", "code": ECHO, "source": "paste"}
            if route == "/console/login":  # signed out: its own pre-login cookie and token
                own = running.client(follow_redirects=False, headers=HTML)
                own.csrf = login_form(own)  # type: ignore[attr-defined]
            attempts = {
                "no token": own.post(url, data=form),
                "another session's token": own.post(url, data={**form, "csrf": bob.csrf}),
                "another session's token in the header": own.post(url, data=form,
                                                                  headers={"X-CSRF-Token": bob.csrf}),
                "another site's Origin": own.post(url, data={**form, "csrf": own.csrf},
                                                  headers={"Origin": "https://evil.example"}),
                "a cross-site fetch": own.post(url, data={**form, "csrf": own.csrf},
                                               headers={"Sec-Fetch-Site": "cross-site"}),
            }
            for what, resp in attempts.items():
                assert resp.status_code == 403, (route, what, resp.status_code, resp.text[:300])
                assert "nimbus_console=" not in resp.headers.get("set-cookie", "") or route != "/console/login"
            if route == "/console/login":
                assert own.get("/console/layers").status_code == 303  # still signed out
                own.close()
        # nothing changed: both sessions live, no key made or revoked, no version, no deletion, no call
        assert admin.get("/console/keys").status_code == 200 and alice.get("/console/layers").status_code == 200
    with api(running, keys["admin"]["key"]) as admin_api:
        assert admin_api.get("/api/v1/keys").json()["keys"] == keys_before
    with api(running, keys["alice"]["key"]) as alice_api:
        assert alice_api.get(f"/api/v1/functions/{ALICE_FN}/versions").json() == versions_before
        assert alice_api.get(f"/api/v1/functions/{ALICE_FN}/invocations").json() == calls_before


def test_a_form_posted_without_its_token_is_refused_in_the_browser(console, page):
    """The browser's own path: the keys form with its hidden token removed is refused, and no key is made."""
    running, keys = console
    sign_in(page, running, keys["admin"]["key"], then="/console/keys")
    # A copy htmx never saw (it would add the token as a header), without the hidden token: a plain post.
    page.locator("form[method=post][action='/console/keys']").evaluate(
        "f => { const bare = f.cloneNode(true); bare.removeAttribute('hx-post');"
        " bare.querySelector('input[name=csrf]').remove(); f.replaceWith(bare); }")
    page.get_by_label("Tenant", exact=True).first.fill("no-token")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.get_by_role("button", name="Create key").click()
    assert answer.value.status == 403
    page.get_by_role("alert").get_by_text("CSRF").wait_for()
    with api(running, keys["admin"]["key"]) as admin_api:
        assert "no-token" not in {k["tenant"] for k in admin_api.get("/api/v1/keys").json()["keys"]}


# ---------------------------------------------------------------- headers


def _assert_page_headers(resp, what: str, *, page: bool = True) -> None:
    headers = resp.headers
    assert headers.get("content-security-policy") == CSP, what
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert "unsafe-eval" not in headers["content-security-policy"]
    assert headers.get("x-frame-options") == "DENY", what
    assert headers.get("x-content-type-options") == "nosniff", what
    if page:
        assert "no-store" in headers.get("cache-control", ""), what


def test_pages_and_static_files_carry_the_security_headers(console, seeded):
    running, keys = console
    with signed_in(running, keys["alice"]["key"]) as alice:
        for path in ("/console/", "/console/functions", f"/console/functions/{ALICE_FN}",
                     f"/console/invocations/{seeded['alice_sync']}", "/console/invoke", "/console/deploy",
                     "/console/layers", "/console/functions/no-such-fn", "/console/keys"):
            resp = alice.get(path)
            assert resp.status_code < 500, path
            _assert_page_headers(resp, path)
        _assert_page_headers(alice.get("/console/layers", headers={"HX-Request": "true"}), "htmx fragment")
    with signed_in(running, keys["admin"]["key"]) as admin:
        _assert_page_headers(admin.get("/console/keys"), "/console/keys")
    with running.client(follow_redirects=False, headers=HTML) as anonymous:
        _assert_page_headers(anonymous.get("/console/login"), "login")
        _assert_page_headers(anonymous.get("/console/functions"), "redirect to login")
        for static in ("/console/static/console.css", "/console/static/console.js",
                       "/console/static/vendor/htmx.min.js", "/console/static/no-such-file.js"):
            _assert_page_headers(anonymous.get(static), static, page=False)


# ---------------------------------------------------------------- tenant isolation

LINK = re.compile(r'(?:href|hx-get|action)="(/console[^"#]*)"')


def test_a_tenant_crawling_every_page_it_reaches_never_sees_another_tenants_data(console, seeded):
    running, keys = console
    secrets = [ALICE_FN, seeded["alice_sync"], seeded["alice_async"]]
    seen: set[str] = set()
    queue = ["/console/", "/console/functions", "/console/invoke", "/console/deploy", "/console/layers",
             "/console/functions/bob-xss", f"/console/invocations/{seeded['xss']}",
             "/console/deploy?function=bob-fn", "/console/invoke?function=bob-fn"]
    with signed_in(running, keys["bob"]["key"]) as bob:
        while queue and len(seen) < 400:
            url = queue.pop(0)
            if url in seen or url.startswith(("/console/static", "/console/logout", "/console/login")):
                continue
            seen.add(url)
            for fragment in (False, True):  # the page, and what htmx would swap in
                resp = bob.get(url, headers={"HX-Request": "true"} if fragment else {})
                assert resp.status_code < 500, url
                for secret in secrets:
                    assert secret not in resp.text, (url, secret, resp.status_code, resp.text[-1500:])
            queue.extend(html.unescape(found) for found in LINK.findall(resp.text))
        assert len(seen) >= 8, seen
        # 404, and the very page a name or id that never existed gets: nothing tells that alice's exist
        never = {ALICE_FN: "never-was-fn", seeded["alice_sync"]: "f" * 32, seeded["alice_async"]: "e" * 32}
        for url in (f"/console/functions/{ALICE_FN}", f"/console/invocations/{seeded['alice_sync']}",
                    f"/console/invocations/{seeded['alice_async']}", f"/console/invocations/{seeded['alice_sync']}/live",
                    f"/console/invoke/result/{seeded['alice_sync']}", f"/console/invoke?function={ALICE_FN}",
                    f"/console/deploy?function={ALICE_FN}", f"/console/invoke/qualifiers?function={ALICE_FN}"):
            secret, stand_in = next((k, v) for k, v in never.items() if k in url)
            resp = bob.get(url)
            assert resp.status_code == 404 or "qualifiers" in url, (url, resp.status_code)  # a form's fragment
            unknown = bob.get(url.replace(secret, stand_in))
            assert resp.text.replace(secret, stand_in) == unknown.text, url
        # and changing alice's function from bob's session finds nothing to change
        for route in routes(running.app, "POST"):
            if "{name}" in route:
                resp = bob.post(_fill(route, {"name": ALICE_FN}), data={"csrf": bob.csrf})
                assert resp.status_code == 404, (route, resp.status_code)
    with api(running, keys["alice"]["key"]) as alice_api:
        assert alice_api.get(f"/api/v1/functions/{ALICE_FN}").status_code == 200


# ---------------------------------------------------------------- markup in output and logs


def test_output_and_logs_that_are_markup_run_nothing_and_are_shown_as_text(console, seeded, page):
    running, keys = console
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    problems = watch(page)
    sign_in(page, running, keys["bob"]["key"], then="/console/invoke?function=bob-xss")
    page.get_by_role("button", name="Invoke", exact=True).click()
    page.locator("#result").get_by_text(XSS_OUTPUT).first.wait_for()
    assert page.locator("#result").get_by_text(XSS_LOG).count() >= 1
    shoot(page, "xss-invoke")
    for path in ("/console/functions/bob-xss", f"/console/invocations/{seeded['xss']}", "/console/functions",
                 "/console/", "/console/functions?q=bob-xss"):
        page.goto(f"{running.url}{path}")
        page.wait_for_load_state("networkidle")
        if "invocations" in path:
            assert page.get_by_text(XSS_OUTPUT).count() >= 1 and page.get_by_text(XSS_LOG).count() >= 1, path
            shoot(page, "xss-invocation")
        assert page.locator("img[src='x']").count() == 0, path
        assert page.locator("script:not([src])").count() == 0, path
    assert dialogs == []
    assert problems == []


def test_every_page_loads_without_a_console_error_or_csp_violation(console, seeded, page):
    running, keys = console
    problems = watch(page)
    sign_in(page, running, keys["admin"]["key"], then="/console/")
    for path in ("/console/", "/console/functions", "/console/invoke", "/console/deploy", "/console/layers",
                 "/console/keys", "/console/functions/no-such-fn"):
        page.goto(f"{running.url}{path}")
        page.wait_for_load_state("networkidle")
        assert urlsplit(page.url).path == path.split("?")[0], path
        assert [p for p in problems if "404" not in p] == [], path  # the 404 page's own status is logged
    sign_in_bob = page.context.browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    bob_problems = watch(sign_in_bob)
    sign_in(sign_in_bob, running, keys["bob"]["key"], then="/console/functions/bob-xss")
    for path in ("/console/functions/bob-xss", f"/console/invocations/{seeded['xss']}",
                 "/console/deploy?function=bob-fn", "/console/invoke?function=bob-fn"):
        sign_in_bob.goto(f"{running.url}{path}")
        sign_in_bob.wait_for_load_state("networkidle")
        assert bob_problems == [], path
    sign_in_bob.context.close()


# ---------------------------------------------------------------- malformed input


def test_malformed_input_is_a_4xx_page_and_the_node_keeps_serving(console, seeded):
    running, keys = console
    huge = "x" * 100_000
    with signed_in(running, keys["admin"]["key"]) as admin, signed_in(running, keys["bob"]["key"]) as bob:
        gets = [
            "/console/functions?page=-1", "/console/functions?page=abc", "/console/functions?page=0",
            f"/console/functions?page={10 ** 30}", f"/console/functions?q={huge[:5000]}",
            "/console/functions/no-such-fn", f"/console/functions/{'x' * 3000}", "/console/functions/%00",
            f"/console/invocations/{'0' * 32}", "/console/invocations/nope", f"/console/invocations/{'0' * 32}/live",
            f"/console/invoke/result/{'0' * 32}", "/console/invoke?function=no-such-fn",
            "/console/deploy?function=no-such-fn", "/console/deploy/jobs/nope", "/console/layers/nope",
            f"/console/layers/{'a' * 64}", "/console/keys?tenant=%00", f"/console/functions/bob-xss?file={huge[:3000]}",
        ]
        for url in gets:
            resp = bob.get(url) if "/keys" not in url else admin.get(url)
            assert 400 <= resp.status_code < 500, (url, resp.status_code)
            assert resp.headers["content-type"].startswith("text/html"), url
        posts = [
            (bob, "/console/invoke", {"function": huge, "event": "{}"}),
            (bob, "/console/invoke", {"function": "bob-fn", "event": "{not json"}),
            (bob, "/console/invoke", {"function": "bob-fn", "event": "{}", "mode": "sideways"}),
            (bob, "/console/deploy", {"name": huge, "runtime": "python3", "code": ECHO}),
            (bob, "/console/functions/bob-fn/publish", {"description": huge}),
            (admin, "/console/keys", {"tenant": "ok", "name": huge}),
            (admin, "/console/keys", {"tenant": huge}),
            (admin, f"/console/keys/{huge[:5000]}/revoke", {}),
        ]
        for client, url, data in posts:
            resp = client.post(url, data={**data, "csrf": client.csrf})
            assert 400 <= resp.status_code < 500, (url, resp.status_code, resp.text[:200])
        with running.client(headers=HTML) as anonymous:
            resp = anonymous.post("/console/login", data={"key": huge, "csrf": login_form(anonymous)})
            assert 400 <= resp.status_code < 500
        assert bob.get("/console/functions").status_code == 200
    with running.client() as client:
        assert client.get("/health").status_code == 200
