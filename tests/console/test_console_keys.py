"""The Keys page (admin only) and the Layers page, in a real browser and over plain HTTP, on a real node.

Keys: listed and filtered, created (the key and its SigV4 secret shown once, and working against the API at
once), revoked with a confirmation (refused by the API at once), the last live admin key kept as the API
keeps it, and every one of these refused to a tenant key. Layers: a tenant sees the layer its package
mounts and its build log, another tenant neither, an admin every layer.
"""

import base64
import io
import re
import zipfile

import pytest
from tests.console.conftest import CSRF, HTML, api, shoot, sign_in, signed_in, watch

# ---------------------------------------------------------------- keys


def test_admin_lists_filters_and_creates_a_key_shown_once(console, page):
    running, keys = console
    problems = watch(page)
    sign_in(page, running, keys["admin"]["key"], then="/console/keys")
    table = page.locator("#keys-table")
    for name in ("admin", "alice", "bob"):
        assert table.get_by_role("cell", name=name, exact=True).count() >= 1
    assert page.locator("#keys-table").get_by_text("this session").count() == 1
    shoot(page, "keys")

    page.get_by_label("Tenant", exact=True).first.fill("carol")
    page.get_by_label("Name").fill("ci-<b>bot</b>")
    page.get_by_role("button", name="Create key").click()
    notice = page.locator("#key-created")
    notice.get_by_text("copy it now").wait_for()
    made = page.locator("#created-key").input_value()
    secret = page.locator("#created-secret").input_value()
    assert made.startswith("nmb_") and len(secret) >= 40
    assert page.locator("#keys-table").get_by_text("ci-<b>bot</b>").count() == 1  # the table was swapped too
    shoot(page, "keys-created")
    with api(running, made) as client:  # the key works against the API at once
        assert client.get("/api/v1/functions").status_code == 200

    page.select_option("#filter-tenant", "carol")  # the filter swaps the table (htmx) and keeps the URL
    page.wait_for_url("**/console/keys?tenant=carol")
    rows = page.locator("#keys-table tbody tr")
    assert rows.count() == 1 and "carol" in rows.first.inner_text()
    page.reload()
    assert made not in page.content() and secret not in page.content()  # shown once, never again
    assert problems == []

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{running.url}/console/keys")
    shoot(page, "keys-390")


def test_revoking_asks_first_and_the_api_refuses_the_key_at_once(console, page):
    running, keys = console
    with api(running, keys["admin"]["key"]) as admin:
        made = admin.post("/api/v1/keys", json={"tenant": "dave", "name": "to-revoke"}).json()
    with api(running, made["key"]) as client:
        assert client.get("/api/v1/functions").status_code == 200  # the guard now caches it as valid
    problems = watch(page)
    sign_in(page, running, keys["admin"]["key"], then="/console/keys")
    row = page.locator(f"#key-{made['id']}")
    asked: list[str] = []
    page.once("dialog", lambda dialog: (asked.append(dialog.message), dialog.dismiss()))
    with page.expect_event("dialog"):
        row.get_by_role("button", name=re.compile("Revoke")).click()
    assert asked and "to-revoke" in asked[0] and "live" in row.inner_text()  # dismissed: nothing happened
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=re.compile("Revoke")).click()
    row.get_by_text("revoked").wait_for()
    with api(running, made["key"]) as client:
        assert client.get("/api/v1/functions").status_code == 401
    assert problems == []


def test_the_last_live_admin_key_is_kept_as_the_api_keeps_it(console, page):
    running, keys = console
    sign_in(page, running, keys["admin"]["key"], then="/console/keys")
    page.on("dialog", lambda dialog: dialog.accept())
    page.locator(f"#key-{keys['admin']['id']}").get_by_role("button", name=re.compile("Revoke")).click()
    page.locator("#messages").get_by_text("last live admin key").wait_for()
    assert "live" in page.locator(f"#key-{keys['admin']['id']}").inner_text()
    with api(running, keys["admin"]["key"]) as client:
        assert client.get("/api/v1/keys").status_code == 200


def test_keys_are_refused_to_tenant_keys_and_bad_input_is_a_4xx(console):
    running, keys = console
    with signed_in(running, keys["alice"]["key"]) as alice:
        assert alice.get("/console/keys").status_code == 403
        resp = alice.post("/console/keys", data={"tenant": "alice", "csrf": alice.csrf, "admin": "true"})
        assert resp.status_code == 403
        assert alice.post(f"/console/keys/{keys['bob']['id']}/revoke", data={"csrf": alice.csrf}).status_code == 403
        assert "Keys" not in re.findall(r"<nav.*?</nav>", alice.get("/console/layers").text, re.S)[0]
    with signed_in(running, keys["admin"]["key"]) as admin:
        for bad in ({"tenant": "Not A Tenant"}, {"tenant": "x" * 65}, {"tenant": "ok", "name": "n" * 65},
                    {"tenant": "ok", "admin": "maybe"}, {}):
            resp = admin.post("/console/keys", data={**bad, "csrf": admin.csrf})
            assert resp.status_code in (400, 422), (bad, resp.status_code)
        assert admin.get("/console/keys", params={"tenant": "NO!"}).status_code in (400, 422)
        assert admin.post("/console/keys/nope/revoke", data={"csrf": admin.csrf}).status_code == 404
        assert admin.post(f"/console/keys/{'x' * 500}/revoke", data={"csrf": admin.csrf}).status_code == 422
        assert admin.get("/console/keys").status_code == 200
    with api(running, keys["admin"]["key"]) as client:
        tenants = {k["tenant"] for k in client.get("/api/v1/keys").json()["keys"]}
    assert not tenants & {"ok", "Not A Tenant"}  # nothing was made by a refused form
    with api(running, keys["bob"]["key"]) as client:
        assert client.get("/api/v1/functions").status_code == 200  # alice's revoke changed nothing


def test_with_auth_off_there_are_no_keys(make_node, tmp_path):
    with make_node(tmp_path / "home", f"sqlite:///{tmp_path / 'nimbus.db'}", runtimes=["python3"]) as running:
        with running.client(headers=HTML) as client:
            page = client.get("/console/keys")
            assert page.status_code == 200 and "NIMBUS_AUTH=off" in page.text
            csrf = CSRF.search(page.text).group(1)
            assert client.post("/console/keys", data={"tenant": "x", "csrf": csrf}).status_code == 404


# ---------------------------------------------------------------- layers


def _package(files: dict[str, str]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def layered(console):
    """alice's package with a requirements.txt: one layer (six, from the local wheel index)."""
    running, keys = console
    package = _package({"app.py": "import six\ndef handler(e, c):\n    return six.__version__\n",
                        "requirements.txt": "six==1.16.0\n"})
    with api(running, keys["alice"]["key"]) as alice:
        resp = alice.post("/api/v1/functions", json={"name": "alice-deps", "runtime": "python3",
                                                     "handler": "app.handler", "code_base64": package})
        assert resp.status_code == 201, resp.text
        return alice.get("/api/v1/layers").json()["layers"][0]


def test_a_tenant_sees_its_layer_and_its_build_log(console, layered, page):
    running, keys = console
    problems = watch(page)
    sign_in(page, running, keys["alice"]["key"], then="/console/layers")
    row = page.locator("tbody tr").filter(has_text=layered["sha256"][:12])
    assert "alice-deps" in row.inner_text() and "six" in row.inner_text()
    shoot(page, "layers")
    row.get_by_role("link", name=re.compile("Layer")).click()
    page.wait_for_url(f"**/console/layers/{layered['sha256']}")
    assert layered["sha256"] in page.content()
    assert "six" in page.locator("pre").inner_text()  # pip's output
    shoot(page, "layer")
    assert problems == []


def test_layers_are_scoped_to_the_tenant_and_admins_see_all(console, layered):
    running, keys = console
    with signed_in(running, keys["bob"]["key"]) as bob:
        listing = bob.get("/console/layers")
        assert listing.status_code == 200 and layered["sha256"][:12] not in listing.text
        assert "alice-deps" not in listing.text
        detail = bob.get(f"/console/layers/{layered['sha256']}")
        assert detail.status_code == 404 and "alice-deps" not in detail.text
        assert bob.get(f"/console/layers/{'z' * 5000}").status_code == 404
    with signed_in(running, keys["admin"]["key"]) as admin:
        assert "alice/alice-deps" in admin.get("/console/layers").text
        assert admin.get(f"/console/layers/{layered['sha256']}").status_code == 200
