"""The console in a real browser: Debian's headless Chromium driven by Playwright's Python package (its own
browser download cannot work here, so ``executable_path``), against a real node with auth on.

One node per test module (SQLite, python3 machines). Keys are made in its store before it starts, so
tests know them: ``admin`` (tenant ``default``), ``alice`` and ``bob`` (tenants of their own). Every test
that opens a page can save a screenshot with ``shoot(page, name)`` into ``NIMBUS_ARTIFACTS``
(default ``.artifacts/console``, not committed).

The test modules share the plain helpers below, imported from ``tests.console.conftest``: ``CSRF`` and
``HTML``, ``expect()``, ``watch(page)``, ``sign_in``, ``shoot``, ``api``, ``login_form``, ``signed_in`` and
``routes``.
"""

import asyncio
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NIMBUS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("NIMBUS_ARTIFACTS") or Path(__file__).resolve().parents[2] / ".artifacts" / "console")

KEYS = {
    "admin": ("default", True),
    "alice": ("alice", False),
    "bob": ("bob", False),
}
CSRF = re.compile(r'(?:name="csrf" value="|"X-CSRF-Token": ")([0-9a-f]{64})"')  # a page's CSRF token, group 1
HTML = {"Accept": "text/html"}  # the headers of a browser asking for a page


def _key(name: str) -> str:
    # Fixed per name and run: the test knows the key, the store holds only its hash.
    return "nmb_" + (name * 43)[:43]


async def _make_keys(url: str) -> dict[str, dict]:
    from nimbus.gateway import auth
    from nimbus.store import Store

    store = await Store.open(url)
    try:
        made = {}
        for name, (tenant, admin) in KEYS.items():
            key = _key(name)
            record = await store.create_api_key(tenant=tenant, name=name, key_hash=auth.hash_key(key), admin=admin,
                                                prefix=auth.display_prefix(key))
            made[name] = {"key": key, "id": record.id, "tenant": tenant, "admin": admin}
        return made
    finally:
        await store.close()


@pytest.fixture(scope="module")
def console(make_module_node, tmp_path_factory):
    """A node with auth on and three known keys: ``(running, keys)``; ``keys[name]["key"]`` is the key."""
    home = tmp_path_factory.mktemp("home")
    url = f"sqlite:///{home / 'nimbus.db'}"
    keys = asyncio.run(_make_keys(url))
    with make_module_node(home, url, auth="on", runtimes=["python3"]) as running:
        yield running, keys


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency (pip install -e .[dev])")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: make test installs Debian's chromium when it runs as root")
    with sync_api.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (no cookies) at 1280 px; console errors and CSP violations are collected in
    ``page.console_problems``, which tests may assert empty."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.console_problems = watch(opened)  # type: ignore[attr-defined]
    try:
        yield opened
    finally:
        context.close()


def expect():
    """Playwright's ``expect`` (the test is skipped without Playwright)."""
    return pytest.importorskip("playwright.sync_api").expect


def watch(page) -> list[str]:
    """A list that collects the page's console errors (CSP violations among them) and uncaught exceptions."""
    found: list[str] = []
    page.on("console", lambda msg: found.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: found.append(str(exc)))
    return found


def sign_in(page, running, key: str, then: str = "/console/") -> None:
    """Sign in through the login form, as a person would."""
    page.goto(f"{running.url}/console/login?next={then}")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{running.url}{then}*")


def shoot(page, name: str) -> Path:
    """Save a full-page screenshot as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def api(running, key: str):
    """An httpx client of the node's API with ``key`` as its Bearer token."""
    return running.client(headers={"Authorization": f"Bearer {key}"})


def login_form(client) -> str:
    """Open the login page (the client gets its pre-login cookie) and return the form's CSRF token."""
    page = client.get("/console/login")
    assert page.status_code == 200
    return CSRF.search(page.text).group(1)


@contextmanager
def signed_in(running, key: str):
    """An httpx client holding a console session of ``key``; ``client.csrf`` is its CSRF token."""
    with running.client(follow_redirects=False, headers=HTML) as client:
        resp = client.post("/console/login", data={"key": key, "csrf": login_form(client)})
        assert resp.status_code == 303, resp.text
        client.csrf = CSRF.search(client.get("/console/layers").text).group(1)  # type: ignore[attr-defined]
        yield client


def routes(app, method: str) -> list[str]:
    """The console's routes answering ``method``, also those of routers FastAPI includes lazily."""
    def walk(found):
        for route in found:
            if hasattr(route, "original_router"):
                yield from walk(route.original_router.routes)
            else:
                yield route
    return sorted({route.path for route in walk(app.routes) if getattr(route, "path", "").startswith("/console")
                   and method in (getattr(route, "methods", None) or ())})
