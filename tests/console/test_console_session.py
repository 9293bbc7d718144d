"""Signing in and out of the console, on a real node with auth on: the cookie's attributes, a fresh token at
login (no session fixation), a logout that ends the session on the server, a ``next`` that cannot leave
the console, every page closed to the signed-out, and a revoked key's sessions ended at once.
"""

import re
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from tests.console.conftest import HTML, api, login_form, routes, shoot, sign_in, signed_in


def set_cookie(resp) -> tuple[str, dict[str, str]]:
    """The console cookie a response sets: its value and its attributes (lower-case names)."""
    headers = [v for k, v in resp.headers.multi_items() if k == "set-cookie" and v.startswith("nimbus_console=")]
    assert len(headers) == 1, headers
    flags = {part.strip().split("=", 1)[0].lower(): (part.split("=", 1)[1] if "=" in part else "")
             for part in headers[0].split(";")[1:]}
    morsel = SimpleCookie(headers[0])["nimbus_console"]
    return morsel.value, flags


def test_the_login_page_refuses_a_wrong_key_with_401(console, page):
    running, keys = console
    page.goto(f"{running.url}/console/login")
    shoot(page, "login")
    page.get_by_label("API key").fill("nmb_" + "x" * 43)
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    assert page.get_by_role("alert").inner_text() == "That key is unknown or revoked."
    with running.client(headers=HTML) as client:
        for wrong in ("", "nope", "nmb_" + "y" * 43, keys["alice"]["key"] + "x"):
            assert client.post("/console/login", data={"key": wrong, "csrf": login_form(client)}).status_code == 401
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{running.url}/console/login")
    shoot(page, "login-390")


def test_a_good_key_gets_a_new_strict_http_only_cookie(console):
    running, keys = console
    with running.client(follow_redirects=False, headers=HTML) as client:
        csrf = login_form(client)
        before = client.cookies.get("nimbus_console")
        resp = client.post("/console/login", data={"key": keys["alice"]["key"], "csrf": csrf})
        assert resp.status_code == 303 and resp.headers["location"] == "/console/"
        token, flags = set_cookie(resp)
        assert before and token != before  # a token planted before login is worth nothing after it
        assert "httponly" in flags and flags["samesite"].lower() == "strict" and flags["path"] == "/console"
        assert 0 < int(flags["max-age"]) <= running.settings.console_session_s
        assert "secure" not in flags  # plain http here; Secure is set over TLS
        assert client.get("/console/layers").status_code == 200
    with running.client(follow_redirects=False, headers=HTML, cookies={"nimbus_console": before}) as planted:
        assert planted.get("/console/layers").status_code == 303


def test_logout_ends_the_session_on_the_server(console):
    running, keys = console
    with signed_in(running, keys["bob"]["key"]) as bob:
        token = bob.cookies.get("nimbus_console")
        resp = bob.post("/console/logout", data={"csrf": bob.csrf})
        assert resp.status_code == 303 and resp.headers["location"] == "/console/login"
        assert set_cookie(resp)[0] != token
    with running.client(follow_redirects=False, headers=HTML, cookies={"nimbus_console": token}) as replay:
        resp = replay.get("/console/layers")
        assert resp.status_code == 303 and resp.headers["location"].startswith("/console/login")


def test_next_never_leaves_the_console(console):
    running, keys = console
    evil = ["//evil.com", "https://evil.com", "/\\evil", "/\\/evil.com", "http:evil.com", "/console\\..\\..//evil",
            "javascript:alert(1)", "//evil.com/console/", " //evil.com"]
    for target in evil:
        with running.client(follow_redirects=False, headers=HTML) as client:
            resp = client.post("/console/login", data={"key": keys["bob"]["key"], "csrf": login_form(client),
                                                       "next": target})
            assert resp.status_code == 303, target
            where = resp.headers["location"]
            assert where.startswith("/console") and not urlsplit(where).netloc and "\\" not in where, (target, where)
            again = client.get("/console/login", params={"next": target})  # signed in: sent on at once
            assert again.status_code == 303 and again.headers["location"].startswith("/console"), target
            assert not urlsplit(again.headers["location"]).netloc
            page = client.get("/console/logout")  # not a GET route: nothing happens
            assert page.status_code in (404, 405)
    with running.client(follow_redirects=False, headers=HTML) as client:
        page = client.get("/console/login", params={"next": "//evil.com"})
        assert "evil.com" not in page.text


def _filled(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x" * 32, path)


def test_every_page_sends_the_signed_out_to_the_login_page(console):
    running, _ = console
    pages = [p for p in routes(running.app, "GET") if p not in ("/console/login", "/console")]
    assert {"/console/", "/console/keys", "/console/layers"} <= set(pages)
    with running.client(follow_redirects=False, headers=HTML) as client:
        for path in pages:
            resp = client.get(_filled(path))
            assert resp.status_code == 303, path
            assert resp.headers["location"].startswith("/console/login?next=/console"), path
            hx = client.get(_filled(path), headers={"HX-Request": "true"})
            assert hx.status_code == 401 and hx.headers["hx-redirect"].startswith("/console/login"), path
        assert client.get("/console").status_code in (303, 307)
        for static in ("/console/static/console.css", "/console/static/console.js",
                       "/console/static/vendor/htmx.min.js"):
            assert client.get(static).status_code == 200, static
        assert client.get("/console/login").status_code == 200
    with running.client(follow_redirects=False) as api_client:  # neither browser nor htmx: problem+json
        resp = api_client.get("/console/layers", headers={"Accept": "application/json"})
        assert resp.status_code == 401 and resp.headers["content-type"].startswith("application/problem+json")


def test_revoking_a_key_ends_its_console_sessions_at_once(console, page):
    running, keys = console
    with api(running, keys["admin"]["key"]) as admin:
        made = admin.post("/api/v1/keys", json={"tenant": "erin", "name": "short-lived"}).json()
    sign_in(page, running, made["key"], then="/console/layers")
    with signed_in(running, made["key"]) as other:
        assert other.get("/console/layers").status_code == 200
        with api(running, keys["admin"]["key"]) as admin:
            assert admin.delete(f"/api/v1/keys/{made['id']}").status_code == 200
        resp = other.get("/console/layers")
        assert resp.status_code == 303 and resp.headers["location"].startswith("/console/login")
    page.goto(f"{running.url}/console/layers")
    assert urlsplit(page.url).path == "/console/login"  # the browser's session, too
