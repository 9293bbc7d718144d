"""The console in a real browser: Debian's headless Chromium driven by Playwright's Python package (its own
browser download cannot work here, so ``executable_path``), against a real node with auth on.

One node per test module (SQLite, python3 machines). Keys are made in its store before it starts, so
tests know them: ``admin`` (tenant ``default``), ``alice`` and ``bob`` (tenants of their own). Every test
that opens a page can save a screenshot with ``shoot(page, name)`` into ``NIMBUS_ARTIFACTS``
(default ``.artifacts/console``, not committed).
"""

import asyncio
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("NIMBUS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("NIMBUS_ARTIFACTS") or Path(__file__).resolve().parents[2] / ".artifacts" / "console")

KEYS = {
    "admin": ("default", True),
    "alice": ("alice", False),
    "bob": ("bob", False),
}


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
    problems: list[str] = []
    opened.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    opened.on("pageerror", lambda exc: problems.append(str(exc)))
    opened.console_problems = problems  # type: ignore[attr-defined]
    try:
        yield opened
    finally:
        context.close()


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
