"""The deploy page in a real browser on a real node: create a function by pasting code, by uploading a zip
or a folder, update it, and see its progress; a syntax error, a bad environment and pip's failure to
resolve a requirement are shown in full; the form is refused without its CSRF token, and bob can neither
see nor update alice's function."""

import io
import re
import time
import uuid
import zipfile

import pytest
from tests.console.conftest import api, expect, shoot, sign_in, signed_in, watch

pytestmark = pytest.mark.sandbox

BUILD_S = 300_000  # ms Playwright waits for a deploy that resolves a layer

GREETER = 'def handler(event, context):\n    print("greeting", event)\n    return {"greeting": "hello " + event.get("who", "you")}\n'


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def submit(page, button: str = "Deploy"):
    """Send the deploy form; the job fragment of the POST's answer (its first state, before any poll)."""
    with page.expect_response(lambda r: r.url.endswith("/console/deploy") and r.request.method == "POST") as answer:
        page.get_by_role("button", name=button).click()
    return answer.value


def finished(page, state: str = "done", timeout: float = 60_000):
    job = page.locator("#deploy-job")
    expect()(job).to_have_attribute("data-state", state, timeout=timeout)
    return job


def invoke(running, key: str, name: str, event: dict) -> dict:
    with api(running, key) as client:
        resp = client.post(f"/api/v1/functions/{name}/invoke", json=event)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_alice_deploys_pasted_code_sees_progress_then_done_and_updates_it(console, page):
    running, keys = console
    problems = watch(page)
    name = unique("paste")
    sign_in(page, running, keys["alice"]["key"], then="/console/deploy")
    code = page.get_by_label("Source", exact=True)
    assert "def handler(event, context)" in code.input_value()  # the python3 starter
    assert page.get_by_label("Handler").input_value() == "main.handler"
    # Switching the runtime swaps the untouched starter and handler; switching back restores them.
    page.get_by_label("Runtime").select_option("nodejs")
    assert "exports.handler" in code.input_value()
    assert page.get_by_label("Handler").input_value() == "index.handler"
    page.get_by_label("Runtime").select_option("python3")
    assert "def handler(event, context)" in code.input_value()

    page.get_by_label("Name", exact=True).fill(name)
    code.fill(GREETER)
    page.get_by_label("Environment").fill("GREETING=hi\n# a comment\nMODE=test")
    answer = submit(page)
    assert answer.status == 202
    assert 'data-state="running"' in answer.text() and "checking" in answer.text()  # progress, then…
    job = finished(page)
    expect()(job).to_contain_text(f"{name} is deployed: version 1")
    expect()(job.locator("ol.stages")).to_contain_text("storing")
    assert job.get_by_role("link", name="Invoke it").get_attribute("href") == f"/console/invoke?function={name}"
    shoot(page, "deploy")
    assert invoke(running, keys["alice"]["key"], name, {"who": "ada"})["output"] == {"greeting": "hello ada"}
    with api(running, keys["alice"]["key"]) as client:
        assert client.get(f"/api/v1/functions/{name}").json()["env"] == {"GREETING": "hi", "MODE": "test"}

    # The update form is pre-filled with the function as it is; new code makes version 2.
    page.goto(f"{running.url}/console/deploy?function={name}")
    expect()(page.get_by_role("heading", level=1)).to_contain_text(f"Update {name}")
    assert page.get_by_label("Source", exact=True).input_value() == GREETER
    assert page.get_by_label("Environment").input_value() == "GREETING=hi\nMODE=test"
    page.get_by_label("Source", exact=True).fill(GREETER.replace("hello ", "bonjour "))
    submit(page, f"Update {name}")
    expect()(finished(page)).to_contain_text("version 2")
    assert invoke(running, keys["alice"]["key"], name, {"who": "ada"})["output"] == {"greeting": "bonjour ada"}

    # Settings alone, keeping the code.
    page.goto(f"{running.url}/console/deploy?function={name}")
    page.get_by_label("Keep the current code").check()
    expect()(page.get_by_label("Source", exact=True)).to_be_hidden()
    page.get_by_label("Memory (MiB)").fill("256")
    submit(page, f"Update {name}")
    finished(page)
    with api(running, keys["alice"]["key"]) as client:
        assert client.get(f"/api/v1/functions/{name}").json()["memory_mb"] == 256
    assert invoke(running, keys["alice"]["key"], name, {"who": "x"})["output"] == {"greeting": "bonjour x"}
    assert problems == []


def test_a_syntax_error_is_shown_and_nothing_is_stored(console, page):
    running, keys = console
    name = unique("broken")
    sign_in(page, running, keys["alice"]["key"], then="/console/deploy")
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Source", exact=True).fill("def handler(event, context)\n    return 1\n")
    submit(page)
    job = finished(page, "failed")
    expect()(job.locator("pre.deploy-error")).to_contain_text("the code does not compile")
    expect()(job.locator("pre.deploy-error")).to_contain_text("line 1")
    shoot(page, "deploy-error")
    with api(running, keys["alice"]["key"]) as client:
        assert client.get(f"/api/v1/functions/{name}").status_code == 404


def test_bad_settings_are_a_4xx_shown_on_the_page(console, page):
    running, keys = console
    sign_in(page, running, keys["alice"]["key"], then="/console/deploy")
    page.get_by_label("Name", exact=True).fill(unique("env"))
    page.get_by_label("Environment").fill("PATH=/evil\nnot a pair")
    assert submit(page).status == 422
    expect()(page.locator("#messages")).to_contain_text("environment line 2 is not KEY=VALUE")
    page.get_by_label("Environment").fill("PATH=/evil")
    assert submit(page).status == 422
    expect()(page.locator("#messages")).to_contain_text("reserved environment variables cannot be set: PATH")
    shoot(page, "deploy-invalid")
    # What the browser's own checks (pattern, min, max) stop never reaches the node from the page; sent
    # anyway, the node refuses it as the API does.
    with signed_in(running, keys["alice"]["key"]) as client:
        resp = client.post("/console/deploy", data={"name": "Bad_Name", "runtime": "python3", "source": "paste",
                                                    "code": GREETER},
                           headers={"X-CSRF-Token": client.csrf, "HX-Request": "true"})
        assert resp.status_code == 422
        assert "name: use lower-case letters, digits and &#39;-&#39;" in resp.text
        resp = client.post("/console/deploy", data={"name": unique("mem"), "runtime": "python3", "source": "paste",
                                                    "code": GREETER, "memory_mb": "16"},
                           headers={"X-CSRF-Token": client.csrf, "HX-Request": "true"})
        assert resp.status_code == 422 and "memory_mb: Input should be greater than or equal to 64" in resp.text
        resp = client.post("/console/deploy", data={"name": unique("mem"), "runtime": "cobol", "code": GREETER},
                           headers={"X-CSRF-Token": client.csrf, "HX-Request": "true"})
        assert resp.status_code == 202  # the runtime is the API's check, in the job: "unknown runtime 'cobol'"
        big = "x = 1\n" * (100_000)
        resp = client.post("/console/deploy", data={"name": unique("big"), "runtime": "python3", "source": "paste",
                                                    "code": big},
                           headers={"X-CSRF-Token": client.csrf, "HX-Request": "true"}, files={"none": ("", b"")})
        assert resp.status_code == 202  # the size is the API's check, in the job
        job = re.search(r'/console/deploy/jobs/([\w-]+)"', resp.text).group(1)
        for _ in range(100):
            state = client.get(f"/console/deploy/jobs/{job}", headers={"HX-Request": "true"})
            if 'data-state="running"' not in state.text:
                break
            time.sleep(0.1)
        assert 'data-state="failed"' in state.text and "(413)" in state.text and "the limit is 524288" in state.text


def zipped(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return buffer.getvalue()


def test_a_zip_upload_deploys(console, page):
    running, keys = console
    name = unique("zip")
    sign_in(page, running, keys["alice"]["key"], then="/console/deploy")
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Handler").fill("app.handler")
    page.get_by_label("Upload a file or .zip").check()
    expect()(page.get_by_label("Source", exact=True)).to_be_hidden()
    package = zipped({"app.py": "from lib.words import shout\ndef handler(e, c):\n    return shout(e['w'])\n",
                      "lib/__init__.py": "", "lib/words.py": "def shout(w):\n    return w.upper()\n"})
    page.set_input_files("#file", files=[{"name": "pkg.zip", "mimeType": "application/zip", "buffer": package}])
    submit(page)
    finished(page)
    assert invoke(running, keys["alice"]["key"], name, {"w": "zip"})["output"] == "ZIP"


def test_a_folder_upload_deploys_with_its_paths_and_without_what_is_left_out(console, page, tmp_path):
    running, keys = console
    name = unique("folder")
    root = tmp_path / "my-api"
    (root / "helpers").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "app.py").write_text("import os\nfrom helpers.text import shout\n"
                                 "def handler(e, c):\n    return {'out': shout(e['w']), 'files': sorted(os.listdir('.'))}\n")
    (root / "helpers" / "__init__.py").write_text("")
    (root / "helpers" / "text.py").write_text("def shout(w):\n    return w.upper() + '!'\n")
    (root / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"junk")
    (root / ".gitignore").write_text("*.log\n")
    (root / "debug.log").write_text("left out\n")
    sign_in(page, running, keys["alice"]["key"], then="/console/deploy")
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Handler").fill("app.handler")
    page.get_by_label("Upload a folder").check()
    page.set_input_files("#folder", str(root))
    submit(page)
    finished(page)
    out = invoke(running, keys["alice"]["key"], name, {"w": "hey"})["output"]
    assert out["out"] == "HEY!"
    assert "helpers" in out["files"] and "debug.log" not in out["files"] and "__pycache__" not in out["files"]


def test_a_requirement_pip_cannot_find_shows_pips_output(console, page):
    running, keys = console
    name = unique("layer")
    sign_in(page, running, keys["alice"]["key"], then="/console/deploy")
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Handler").fill("app.handler")
    page.get_by_label("Upload a file or .zip").check()
    package = zipped({"app.py": "def handler(e, c):\n    return 1\n",
                      "requirements.txt": "nimbus-no-such-package-4b1d==1.0\n"})
    page.set_input_files("#file", files=[{"name": "pkg.zip", "mimeType": "application/zip", "buffer": package}])
    submit(page)
    job = finished(page, "failed", timeout=BUILD_S)
    expect()(job.locator("ol.stages")).to_contain_text("resolving layer")
    error = job.locator("pre.deploy-error")
    expect()(error).to_contain_text("nimbus-no-such-package-4b1d")
    expect()(error).to_contain_text("No matching distribution")
    shoot(page, "deploy-layer-error")
    with api(running, keys["alice"]["key"]) as client:
        assert client.get(f"/api/v1/functions/{name}").status_code == 404


def test_the_form_needs_its_csrf_token_and_bob_cannot_touch_alices_function(console, page):
    running, keys = console
    name = unique("mine")
    with api(running, keys["alice"]["key"]) as client:
        assert client.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": GREETER}
                           ).status_code == 201
    with signed_in(running, keys["alice"]["key"]) as client:
        form = {"function": name, "runtime": "python3", "source": "paste", "code": "def handler(e, c): return 0\n"}
        assert client.post("/console/deploy", data=form).status_code == 403
        assert client.post("/console/deploy", data={**form, "csrf": "0" * 64}).status_code == 403
        assert client.post("/console/deploy", data=form, headers={"X-CSRF-Token": client.csrf}).status_code == 303
    with signed_in(running, keys["bob"]["key"]) as client:
        assert client.get(f"/console/deploy?function={name}").status_code == 404
        resp = client.post("/console/deploy", data=form, headers={"X-CSRF-Token": client.csrf, "HX-Request": "true"})
        assert resp.status_code == 404
    # Bob's browser: the 404 page, and alice's deploy job is not his to read either.
    sign_in(page, running, keys["bob"]["key"], then="/console/deploy")
    page.goto(f"{running.url}/console/deploy?function={name}")
    expect()(page.locator(".problem")).to_contain_text("not found")


def test_the_deploy_page_at_phone_width(console, browser):
    running, keys = console
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        sign_in(page, running, keys["alice"]["key"], then="/console/deploy")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        shoot(page, "deploy-phone")
    finally:
        context.close()
