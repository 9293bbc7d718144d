"""Every console page audited by axe-core, the accessibility engine browsers' own audits use: labels, names,
roles, landmarks, contrast, headings. The audit is injected into the page, so this context bypasses the
console's CSP (which would rightly refuse an injected script); the pages are the ones users get.

``make test`` fetches axe-core from npm into the venv once; ``NIMBUS_TEST_AXE`` names another copy.
"""

import glob
import os
from pathlib import Path

import pytest
from tests.console.conftest import api, shoot, sign_in

pytestmark = pytest.mark.sandbox

ROOT = Path(__file__).resolve().parents[2]
AXE = os.environ.get("NIMBUS_TEST_AXE") or next(iter(sorted(glob.glob(str(ROOT / ".venv" / "axe-core-*" / "axe.min.js")))), "")
AUDIT = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.map(v => ({rule: v.id, impact: v.impact, help: v.help,
                                      where: v.nodes.map(n => n.html.slice(0, 160))}));
}"""


@pytest.fixture(scope="module")
def seeded(console):
    running, keys = console
    with api(running, keys["admin"]["key"]) as client:
        resp = client.post("/api/v1/functions", json={"name": "audited", "runtime": "python3",
                                                      "code": "def handler(event, context):\n    print('hi')\n    return event\n"})
        assert resp.status_code == 201, resp.text
        done = client.post("/api/v1/functions/audited/invoke", json={"a": 1}).json()
        failed = client.post("/api/v1/functions/audited/invoke", content=b"[1, 2")  # refused: not JSON
        assert failed.status_code == 422
    return running, keys, done["invocation_id"]


def test_every_console_page_passes_axe(seeded, browser):
    if not AXE or not os.path.exists(AXE):
        pytest.skip("axe-core is not fetched (make test fetches it with npm; or set NIMBUS_TEST_AXE)")
    running, keys, invocation = seeded
    context = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    found = {}
    try:
        page.goto(f"{running.url}/console/login")
        page.add_script_tag(path=AXE)
        found["/console/login"] = page.evaluate(AUDIT)
        sign_in(page, running, keys["admin"]["key"])
        for path in ["/console/", "/console/functions", "/console/functions/audited", f"/console/invocations/{invocation}",
                     "/console/invoke?function=audited", "/console/deploy", "/console/deploy?function=audited",
                     "/console/layers", "/console/keys", "/console/no-such-page"]:
            page.goto(running.url + path)
            page.add_script_tag(path=AXE)
            found[path] = page.evaluate(AUDIT)
        shoot(page, "not-found")
    finally:
        context.close()
    assert {path: violations for path, violations in found.items() if violations} == {}
