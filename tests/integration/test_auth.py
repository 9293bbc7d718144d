"""API keys, tenants and rate limits on a real node with ``NIMBUS_AUTH=on``, on SQLite and PostgreSQL.

Each test gets an empty database of its own (a new SQLite file, or a new PostgreSQL database): the first
admin key is made only when the store has no key at all, so a shared database would hide it.
"""

import asyncio
import hashlib
import os
import re
import uuid

import pytest
from test_api import assert_problem
from test_packages import zipped

pytestmark = pytest.mark.sandbox

PG_ADMIN_DSN = os.environ.get("NIMBUS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
FIRST_KEY = re.compile(r"NIMBUS FIRST ADMIN API KEY.*?\n\s+(nmb_[A-Za-z0-9_-]+)\n", re.S)
ECHO = "def handler(event, context):\n    return {'event': event, 'function': context.function_name}\n"
SLOW_RATE = 0.001  # one token per 1000 s: nothing refills while a test runs, so counts are exact


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db(request, tmp_path):
    """A database with nothing in it, for this test alone."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nimbus.db'}"
        return
    name = f"nimbus_auth_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def in_store(url: str, use):
    """Run ``use(store)`` on a store of one's own over the node's database (the node's runs on its own loop)."""
    from nimbus.store import Store

    async def run():
        store = await Store.open(url)
        try:
            return await use(store)
        finally:
            await store.close()

    return asyncio.run(run())


def first_key(capfd) -> str:
    err = capfd.readouterr().err
    found = FIRST_KEY.findall(err)
    assert len(found) == 1, err[-2000:]
    return found[0]


@pytest.fixture
def authed(make_node, tmp_path, empty_db, capfd):
    """A node with auth on and its first admin key (read from what it printed)."""
    with make_node(tmp_path / "home", empty_db, auth="on", runtimes=["python3"]) as running:
        yield running, first_key(capfd)


def client(running, key=None):
    return running.client(headers={"Authorization": f"Bearer {key}"} if key else {})


def make_key(admin_api, tenant: str, **fields) -> dict:
    resp = admin_api.post("/api/v1/keys", json={"tenant": tenant, **fields})
    assert resp.status_code == 201, resp.text
    return resp.json()


def deploy(api, name: str, code: str = ECHO) -> dict:
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": "python3", "code": code})
    assert resp.status_code == 201, resp.text
    return resp.json()


# ---------------------------------------------------------------- the first key


def test_first_admin_key_is_printed_once_and_stored_hashed(make_node, tmp_path, empty_db, capfd):
    home = tmp_path / "home"
    with make_node(home, empty_db, auth="on", runtimes=["python3"]) as running:
        key = first_key(capfd)
        assert key.startswith("nmb_") and len(key) >= 4 + 43
        with client(running, key) as api:
            assert api.get("/api/v1/functions").status_code == 200
            listed = api.get("/api/v1/keys").json()["keys"]
        assert len(listed) == 1
        assert listed[0]["admin"] is True and listed[0]["tenant"] == "default"
        assert key.startswith(listed[0]["prefix"]) and len(listed[0]["prefix"]) < 16
        assert key not in str(listed)
        stored = in_store(empty_db, lambda store: store.list_api_keys())
        assert stored[0].key_hash == hashlib.sha256(key.encode()).hexdigest()
    if empty_db.startswith("sqlite"):
        for path in tmp_path.glob("nimbus.db*"):  # the database and its WAL
            assert key.encode() not in path.read_bytes()

    # a restart on the same store prints nothing, and the key still works
    with make_node(home, empty_db, auth="on", runtimes=["python3"]) as running:
        assert "NIMBUS FIRST ADMIN API KEY" not in capfd.readouterr().err
        with client(running, key) as api:
            assert api.get("/api/v1/functions").status_code == 200


# ---------------------------------------------------------------- 401 and the open paths


def test_missing_bad_and_unknown_keys_are_401(authed):
    running, admin = authed
    with client(running) as anon:
        resp = anon.get("/api/v1/functions")
        assert_problem(resp, 401, "Authorization: Bearer")
        assert resp.headers["www-authenticate"] == 'Bearer realm="nimbus"'
        for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-nimbus-key", "Bearer nmb_" + "x" * 43,
                       "Bearer " + admin[:-1]):
            resp = anon.post("/api/v1/functions/x/invoke", json={}, headers={"Authorization": header})
            assert_problem(resp, 401)
            assert resp.headers["www-authenticate"].startswith('Bearer realm="nimbus"'), header
        assert 'error="invalid_token"' in resp.headers["www-authenticate"]
        # probes and the API's description stay open
        assert anon.get("/health").status_code == 200
        assert anon.get("/openapi.json").json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        # an unknown route does not tell a stranger whether it exists
        assert_problem(anon.get("/api/v1/nothing-here"), 401)
        # metrics carry every tenant's function names: admin keys only
        assert_problem(anon.get("/metrics"), 401)
    with client(running, admin) as api:
        tenant_key = make_key(api, "metrics-t")["key"]
        assert api.get("/metrics").status_code == 200
    with client(running, tenant_key) as api:
        assert_problem(api.get("/metrics"), 403, "admin")


# ---------------------------------------------------------------- tenants


def test_tenants_see_only_their_own(authed):
    running, admin = authed
    with client(running, admin) as api:
        key_a, key_b = make_key(api, "tenant-a")["key"], make_key(api, "tenant-b")["key"]
    with client(running, key_a) as a, client(running, key_b) as b:
        fn_a = deploy(a, "only-a")
        shared_a = deploy(a, "shared")
        shared_b = deploy(b, "shared")  # the same name in another tenant is another function
        assert shared_a["id"] != shared_b["id"]
        sync_a = a.post("/api/v1/functions/only-a/invoke", json={"who": "a"}).json()
        assert sync_a["status"] == "succeeded", sync_a
        async_a = a.post("/api/v1/functions/only-a/async", json={"who": "a"})
        assert async_a.status_code == 202
        sync_b = b.post("/api/v1/functions/shared/invoke", json={"who": "b"}).json()
        assert sync_b["output"] == {"event": {"who": "b"}, "function": "shared"}

        # lists
        assert {f["name"] for f in a.get("/api/v1/functions").json()["functions"]} == {"only-a", "shared"}
        listed_b = b.get("/api/v1/functions").json()
        assert [f["id"] for f in listed_b["functions"]] == [shared_b["id"]] and listed_b["total"] == 1
        assert [i["invocation_id"] for i in b.get("/api/v1/functions/shared/invocations").json()["invocations"]] \
            == [sync_b["invocation_id"]]

        # another tenant's names and ids are 404, worded as for a name nobody has
        missing = assert_problem(b.get("/api/v1/functions/nobody-has-this"), 404)
        for key in ("only-a", fn_a["id"], shared_a["id"]):
            body = assert_problem(b.get(f"/api/v1/functions/{key}"), 404)
            assert body["detail"] == missing["detail"].replace("nobody-has-this", key)
            assert_problem(b.put(f"/api/v1/functions/{key}", json={"memory_mb": 256}), 404)
            assert_problem(b.post(f"/api/v1/functions/{key}/invoke", json={}), 404)
            assert_problem(b.post(f"/api/v1/functions/{key}/async", json={}), 404)
            assert_problem(b.get(f"/api/v1/functions/{key}/invocations"), 404)
            assert_problem(b.delete(f"/api/v1/functions/{key}"), 404)
        for inv in (sync_a["invocation_id"], async_a.json()["invocation_id"]):
            assert_problem(b.get(f"/api/v1/invocations/{inv}"), 404)
            assert a.get(f"/api/v1/invocations/{inv}").status_code == 200
        # and the other way round
        assert_problem(a.get(f"/api/v1/functions/{shared_b['id']}"), 404)
        assert_problem(a.get(f"/api/v1/invocations/{sync_b['invocation_id']}"), 404)
        # nothing of a's changed through b's calls
        assert a.get("/api/v1/functions/only-a").json()["memory_mb"] == fn_a["memory_mb"]
        assert a.get("/api/v1/functions/shared").json()["id"] == shared_a["id"]
    # an admin key is admin of keys, not of other tenants' functions
    with client(running, admin) as api:
        assert api.get("/api/v1/functions").json()["total"] == 0
        assert_problem(api.get("/api/v1/functions/only-a"), 404)


def test_layers_are_seen_per_tenant_and_gc_needs_an_admin_key(authed):
    """Two tenants share one layer (same requirements): each sees it with its own functions only."""
    running, admin = authed
    package = zipped({"app.py": "import six\ndef handler(e, c):\n    return six.__version__\n",
                      "requirements.txt": "six==1.16.0\n"})
    with client(running, admin) as api:
        key_a, key_b = make_key(api, "tenant-a")["key"], make_key(api, "tenant-b")["key"]
    with client(running, key_a) as a, client(running, key_b) as b:
        for tenant, name in ((a, "deps-a"), (b, "deps-b")):
            resp = tenant.post("/api/v1/functions", json={"name": name, "runtime": "python3",
                                                          "handler": "app.handler", "code_base64": package})
            assert resp.status_code == 201, resp.text
        layer_a = a.get("/api/v1/layers").json()["layers"]
        layer_b = b.get("/api/v1/layers").json()["layers"]
        assert [x["functions"] for x in layer_a] == [["deps-a"]] and [x["functions"] for x in layer_b] == [["deps-b"]]
        assert layer_a[0]["sha256"] == layer_b[0]["sha256"]
        assert "admin key" in assert_problem(a.post("/api/v1/gc", params={"grace_s": 0}), 403)["detail"]
    with client(running, admin) as api:
        everyone = api.get("/api/v1/layers").json()["layers"]
        assert everyone[0]["functions"] == ["tenant-a/deps-a", "tenant-b/deps-b"]
        assert api.post("/api/v1/gc", params={"grace_s": 0}).json()["layers"] == 0  # both still use it


def test_auth_off_is_one_default_tenant(make_node, tmp_path, empty_db):
    with make_node(tmp_path / "home", empty_db, runtimes=["python3"]) as running, running.client() as api:
        deploy(api, "open-fn")
        fn = in_store(empty_db, lambda store: store.get_function("open-fn", "default"))
        assert fn.tenant == "default"
        # there are no keys to manage on such a node
        assert_problem(api.get("/api/v1/keys"), 404, "NIMBUS_AUTH=off")
        assert_problem(api.post("/api/v1/keys", json={"tenant": "x"}), 404, "NIMBUS_AUTH=off")


# ---------------------------------------------------------------- key management


def test_only_admin_keys_manage_keys_and_revoked_keys_are_refused(authed):
    running, admin = authed
    with client(running, admin) as api:
        made = make_key(api, "acme", name="ci")
        assert made["tenant"] == "acme" and made["name"] == "ci" and made["admin"] is False
        assert made["key"].startswith(made["prefix"]) and made["revoked_at"] is None
        other = make_key(api, "other")
        assert [k["id"] for k in api.get("/api/v1/keys", params={"tenant": "acme"}).json()["keys"]] == [made["id"]]
        assert len(api.get("/api/v1/keys").json()["keys"]) == 3
        assert all("key" not in k and "key_hash" not in k for k in api.get("/api/v1/keys").json()["keys"])
        assert_problem(api.post("/api/v1/keys", json={"tenant": "Not A Tenant"}), 422)
        assert_problem(api.delete("/api/v1/keys/nope"), 404)

    with client(running, made["key"]) as acme:
        assert acme.get("/api/v1/functions").status_code == 200  # now cached on this node
        assert_problem(acme.get("/api/v1/keys"), 403, "admin key")
        assert_problem(acme.post("/api/v1/keys", json={"tenant": "acme", "admin": True}), 403)
        assert_problem(acme.delete(f"/api/v1/keys/{other['id']}"), 403)

        with client(running, admin) as api:
            revoked = api.delete(f"/api/v1/keys/{made['id']}")
            assert revoked.status_code == 200 and revoked.json()["revoked_at"]
            assert api.delete(f"/api/v1/keys/{made['id']}").json()["revoked_at"] == revoked.json()["revoked_at"]
        resp = acme.get("/api/v1/functions")  # refused at once, though the key was cached
        assert_problem(resp, 401, "revoked")
        assert 'error="invalid_token"' in resp.headers["www-authenticate"]

    with client(running, admin) as api:
        first_id = api.get("/api/v1/keys", params={"tenant": "default"}).json()["keys"][0]["id"]
        assert_problem(api.delete(f"/api/v1/keys/{first_id}"), 409, "last live admin key")
        second = make_key(api, "ops", admin=True)
    with client(running, second["key"]) as ops:  # an admin key of another tenant manages every tenant's keys
        assert ops.delete(f"/api/v1/keys/{first_id}").status_code == 200
        assert_problem(ops.get("/api/v1/functions/x", headers={"Authorization": f"Bearer {admin}"}), 401)


def test_revocation_on_another_node_with_no_cache(make_node, tmp_path, empty_db, capfd):
    """Two nodes on one store: a key revoked on one is refused by the other within NIMBUS_AUTH_CACHE_S (0 here)."""
    with make_node(tmp_path / "one", empty_db, auth="on", runtimes=["python3"], min_warm=0) as one:
        admin = first_key(capfd)
        with client(one, admin) as api:
            made = make_key(api, "acme")
        with make_node(tmp_path / "two", empty_db, auth="on", runtimes=["python3"], min_warm=0,
                       auth_cache_s=0) as two, client(two, made["key"]) as acme:
            assert "NIMBUS FIRST ADMIN API KEY" not in capfd.readouterr().err  # the store already had a key
            assert acme.get("/api/v1/functions").status_code == 200
            with client(one, admin) as api:
                assert api.delete(f"/api/v1/keys/{made['id']}").status_code == 200
            assert_problem(acme.get("/api/v1/functions"), 401)


# ---------------------------------------------------------------- rate limit


def test_rate_limit_per_key(make_node, tmp_path, empty_db, capfd):
    with make_node(tmp_path / "home", empty_db, auth="on", runtimes=["python3"], rate_limit=SLOW_RATE,
                   rate_burst=3, auth_cache_s=3600) as running:
        admin = first_key(capfd)
        with client(running, admin) as api:
            key = make_key(api, "busy")["key"]  # admin: 1 of 3; the address: 1 of 3 (a look-up)
        with client(running, key) as busy:
            for _ in range(3):  # the address: 2 of 3 (this key's look-up)
                assert busy.get("/api/v1/functions").status_code == 200
            resp = busy.get("/api/v1/functions")
            assert_problem(resp, 429, "API key")
            assert int(resp.headers["retry-after"]) >= 1
            assert busy.get("/health").status_code == 200  # probes are never limited
        with client(running, admin) as api:  # another key's bucket is its own
            assert api.get("/api/v1/functions").status_code == 200
        # keys not known to be good are charged to the address, before any look-up
        with client(running, "nmb_" + "y" * 43) as stranger:
            assert_problem(stranger.get("/api/v1/functions"), 401)
            resp = stranger.get("/api/v1/functions")
            assert_problem(resp, 429, "client address")
            assert int(resp.headers["retry-after"]) >= 1


def test_rate_limit_per_address_with_auth_off(make_node, tmp_path, empty_db):
    with make_node(tmp_path / "home", empty_db, runtimes=["python3"], rate_limit=SLOW_RATE,
                   rate_burst=2) as running, running.client() as api:
        assert api.get("/api/v1/functions").status_code == 200
        assert api.get("/api/v1/functions").status_code == 200
        resp = api.get("/api/v1/functions")
        assert_problem(resp, 429, "client address")
        assert resp.headers["retry-after"] == str(round(1 / SLOW_RATE))
        assert api.get("/health").status_code == 200

