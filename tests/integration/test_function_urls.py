"""Function URLs over real HTTP (httpx) against a real node, on SQLite and PostgreSQL: the payload 2.0 event a
function sees, the response mapping, a FastAPI app behind Mangum and an Express app behind serverless-http
(both installed from PyPI / npm into a dependency layer), errors, CORS, keys and hostile requests.

A page opened in headless Chromium: test_function_url_browser.py.
"""

import asyncio
import base64
import io
import json
import struct
import uuid
import zipfile
import zlib

import pytest

pytestmark = pytest.mark.sandbox

RAW = """
import json
def handler(event, context):
    print("url call", event["rawPath"])
    return {"statusCode": 200, "headers": {"content-type": "application/json", "x-fn": "raw"},
            "body": json.dumps({"event": event, "aws_request_id": context.aws_request_id})}
"""
PLAIN = "def handler(event, context):\n    return {'answer': 42, 'list': [1, 2]}\n"
FAILS = "def handler(event, context):\n    raise ValueError('boom')\n"
SLOW = "import time\ndef handler(event, context):\n    time.sleep(10)\n"
SHAPES = """
import base64
def handler(event, context):
    kind = event["rawPath"].strip("/")
    if kind == "multi":
        return {"statusCode": 201, "multiValueHeaders": {"x-many": ["a", "b"]}, "cookies": ["a=1", "b=2; Path=/"],
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64Encoded": True}
    if kind == "nobody":
        return {"statusCode": 204, "body": "ignored"}
    if kind == "string-status":
        return {"statusCode": "418", "body": "teapot"}
    if kind == "bad-status":
        return {"statusCode": 42}
    if kind == "bad-cookies":
        return {"statusCode": 200, "cookies": "a=1"}
    if kind == "bad-base64":
        return {"statusCode": 200, "body": "***", "isBase64Encoded": True}
    if kind == "unicode-header":
        return {"statusCode": 200, "headers": {"x-u": "\u2603"}}
    return "just a string"
"""
BAD_HEADER = ("def handler(event, context):\n"
              "    return {'statusCode': 200, 'headers': {'x-evil': 'a\\r\\nset-cookie: pwn=1'}, 'body': 'x'}\n")

FASTAPI_APP = {
    "main.py": """
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from mangum import Mangum
from urllib.parse import parse_qs

app = FastAPI()

@app.get("/hello")
def hello(request: Request):
    return {"tags": request.query_params.getlist("tag"), "q": request.query_params.get("q")}

@app.post("/json")
async def post_json(request: Request):
    return {"got": await request.json()}

@app.post("/form")
async def post_form(request: Request):
    return {"form": parse_qs((await request.body()).decode()),
            "type": request.headers["content-type"]}

@app.post("/image")
async def image(request: Request):
    return Response(content=await request.body(), media_type="image/png")

@app.get("/cookies/set")
def set_cookies():
    response = JSONResponse({"set": True})
    response.set_cookie("session", "abc123")
    response.set_cookie("theme", "dark")
    return response

@app.get("/cookies/read")
def read_cookies(request: Request):
    return {"cookies": dict(request.cookies)}

@app.get("/go")
def go():
    return RedirectResponse("/fn/elsewhere/", status_code=302)

handler = Mangum(app, lifespan="off")
""",
    "requirements.txt": "fastapi\nmangum\n",
}

EXPRESS_APP = {
    "index.js": """
const express = require("express");
const serverless = require("serverless-http");
const app = express();
app.use(express.json());
app.use(express.urlencoded({ extended: false }));
app.use("/image", express.raw({ type: "image/png", limit: "5mb" }));
app.get("/hello", (req, res) => res.json({ tags: req.query.tag, q: req.query.q }));
app.post("/json", (req, res) => res.json({ got: req.body }));
app.post("/form", (req, res) => res.json({ form: req.body, type: req.get("content-type") }));
app.post("/image", (req, res) => res.type("image/png").send(req.body));
app.get("/cookies/set", (req, res) => {
  res.cookie("session", "abc123");
  res.cookie("theme", "dark");
  res.json({ set: true });
});
app.get("/cookies/read", (req, res) => {
  const cookies = {};
  for (const part of (req.get("cookie") || "").split(";")) {
    const [k, v] = part.trim().split("=");
    if (k) cookies[k] = v;
  }
  res.json({ cookies });
});
app.get("/go", (req, res) => res.redirect(302, "/fn/elsewhere/"));
module.exports.handler = serverless(app, { binary: ["image/*"] });  // as on Lambda: binary types base64
""",
    "package.json": json.dumps({"name": "urlapp", "version": "1.0.0",
                                "dependencies": {"express": "4.21.2", "serverless-http": "3.2.0"}}),
}


def png(width: int = 16, height: int = 16) -> bytes:
    """A real PNG (every byte value appears in its compressed data, so a text round trip would break it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\0" + bytes((x * 16 + y * 7) % 256 for x in range(width * 3)) for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def zipped(files: dict) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return base64.b64encode(buffer.getvalue()).decode()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def deploy(api, name: str, code: str | None = None, files: dict | None = None, runtime: str = "python3",
           handler: str | None = None, **settings) -> None:
    body = {"name": name, "runtime": runtime, **settings}
    if files is not None:
        body["code_base64"] = zipped(files)
    else:
        body["code"] = code
    if handler:
        body["handler"] = handler
    resp = api.post("/api/v1/functions", json=body, timeout=600)
    assert resp.status_code == 201, resp.text


def put_url(api, name: str, qualifier: str | None = None, **config) -> dict:
    resp = api.put(f"/api/v1/functions/{name}/url", json=config,
                   params={"qualifier": qualifier} if qualifier else None)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


@pytest.fixture(scope="module")
def raw(node):
    with node.client() as api:
        name = unique("raw")
        deploy(api, name, RAW)
        put_url(api, name, auth="none")
        yield name


# ---------------------------------------------------------------- the event and the response


def test_the_event_is_payload_2_0(api, raw):
    resp = api.post(f"/fn/{raw}/a/b%20c?x=1&x=2&y=&z=%C3%A9", content=b'{"k": "v"}',
                    headers=[("content-type", "application/json"), ("x-multi", "one"), ("x-multi", "two"),
                             ("Cookie", "c1=v1; c2=v2"), ("User-Agent", "tester/1")])
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-fn"] == "raw"
    out = resp.json()
    event = out["event"]
    assert event["version"] == "2.0" and event["routeKey"] == "$default"
    assert event["rawPath"] == "/a/b%20c"
    assert event["rawQueryString"] == "x=1&x=2&y=&z=%C3%A9"
    assert event["queryStringParameters"] == {"x": "1,2", "y": "", "z": "é"}
    assert event["headers"]["x-multi"] == "one,two"
    assert "cookie" not in event["headers"] and event["cookies"] == ["c1=v1", "c2=v2"]
    assert event["body"] == '{"k": "v"}' and event["isBase64Encoded"] is False
    ctx = event["requestContext"]
    assert ctx["http"] == {"method": "POST", "path": "/a/b c", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1",
                           "userAgent": "tester/1"}
    assert ctx["accountId"] == "000000000000"
    assert ctx["domainName"] == api.base_url.netloc.decode()
    assert ctx["requestId"] == resp.headers["x-amzn-requestid"] == out["aws_request_id"]
    assert ctx["stage"] == "$default" and isinstance(ctx["timeEpoch"], int) and ctx["time"].endswith(" +0000")
    # Recorded like any other call, with its trigger and logs.
    node_inv = api.get(f"/api/v1/invocations/{ctx['requestId']}")
    assert node_inv.status_code == 200, node_inv.text
    assert node_inv.json()["trigger"] == "url"
    assert "url call /a/b%20c" in node_inv.json()["logs"]
    through_api = api.post(f"/api/v1/functions/{raw}/invoke", json={"rawPath": "/"}).json()
    assert api.get(f"/api/v1/invocations/{through_api['invocation_id']}").json()["trigger"] == "api"


def test_binary_and_empty_bodies(api, raw):
    image = png()
    event = api.put(f"/fn/{raw}", content=image, headers={"content-type": "image/png"}).json()["event"]
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == image
    assert event["rawPath"] == "/" and event["queryStringParameters"] is None
    big = bytes(range(256)) * (12 << 10)  # 3 MiB, 4 MiB as base64 in the event
    event = api.post(f"/fn/{raw}/big", content=big, headers={"content-type": "application/octet-stream"}).json()["event"]
    assert base64.b64decode(event["body"]) == big
    event = api.get(f"/fn/{raw}/").json()["event"]
    assert "body" not in event and "cookies" not in event
    # Text by content type, but not UTF-8: base64 too.
    event = api.post(f"/fn/{raw}/", content=b"\xff\xfe", headers={"content-type": "text/plain"}).json()["event"]
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == b"\xff\xfe"


def test_a_result_without_status_code_is_200_json_of_the_whole_result(api):
    name = unique("plain")
    deploy(api, name, PLAIN)
    put_url(api, name, auth="none")
    resp = api.get(f"/fn/{name}/")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"answer": 42, "list": [1, 2]}


def test_errors_are_502_504_and_404(api):
    fails, slow, bad, bare = unique("fails"), unique("slow"), unique("bad"), unique("bare")
    deploy(api, fails, FAILS)
    deploy(api, slow, SLOW, timeout_s=1)
    deploy(api, bad, BAD_HEADER)
    deploy(api, bare, PLAIN)
    for name in (fails, slow, bad):
        put_url(api, name, auth="none")
    assert api.get(f"/fn/{fails}/").status_code == 502
    assert api.get(f"/fn/{slow}/").status_code == 504
    resp = api.get(f"/fn/{bad}/")
    assert resp.status_code == 502 and "set-cookie" not in resp.headers  # no response splitting
    assert api.get(f"/fn/{bare}/").status_code == 404  # a function without a URL config
    assert api.get(f"/fn/{unique('none')}/x").status_code == 404
    assert api.get(f"/fn/{bare}:nosuchalias/").status_code == 404


def test_response_shapes(api):
    name = unique("shapes")
    deploy(api, name, SHAPES)
    put_url(api, name, auth="none")
    resp = api.get(f"/fn/{name}/multi")
    assert resp.status_code == 201 and resp.content == bytes(range(256))
    assert resp.headers.get_list("x-many") == ["a", "b"]
    assert resp.headers.get_list("set-cookie") == ["a=1", "b=2; Path=/"]
    resp = api.get(f"/fn/{name}/nobody")
    assert resp.status_code == 204 and resp.content == b""
    resp = api.get(f"/fn/{name}/string-status")
    assert resp.status_code == 418 and resp.text == "teapot"
    for bad in ("bad-status", "bad-cookies", "bad-base64", "unicode-header"):
        assert api.get(f"/fn/{name}/{bad}").status_code == 502, bad
    resp = api.get(f"/fn/{name}/other")
    assert resp.status_code == 200 and resp.json() == "just a string"
    assert api.head(f"/fn/{name}/multi").status_code == 201


def test_config_api_and_alias_urls(api):
    name = unique("cfg")
    deploy(api, name, RAW)
    assert api.get(f"/api/v1/functions/{name}/url").status_code == 404
    first = api.put(f"/api/v1/functions/{name}/url", json={"auth": "none"})
    assert first.status_code == 201 and first.json()["url"].endswith(f"/fn/{name}/")
    again = api.put(f"/api/v1/functions/{name}/url",
                    json={"auth": "key", "cors": {"allow_origins": ["https://a.example"]}})
    assert again.status_code == 200 and again.json()["cors"]["allow_origins"] == ["https://a.example"]
    assert api.put(f"/api/v1/functions/{name}/url", json={"auth": "maybe"}).status_code == 422
    assert api.put(f"/api/v1/functions/{name}/url",
                   json={"cors": {"allow_origins": ["not an origin"]}}).status_code == 422
    assert api.put(f"/api/v1/functions/{name}/url", params={"qualifier": "prod"}, json={}).status_code == 404
    assert api.post(f"/api/v1/functions/{name}/versions", json={}).status_code == 201
    assert api.post(f"/api/v1/functions/{name}/aliases", json={"name": "prod", "version": "1"}).status_code == 201
    put_url(api, name, "prod", auth="none")
    event = api.get(f"/fn/{name}:prod/p").json()["event"]
    assert event["rawPath"] == "/p"
    inv = api.get(f"/api/v1/invocations/{event['requestContext']['requestId']}").json()
    assert inv["executed_version"] == "1" and inv["trigger"] == "url"
    assert api.delete(f"/api/v1/functions/{name}/url").status_code == 204
    assert api.get(f"/fn/{name}/").status_code == 404
    assert api.get(f"/fn/{name}:prod/").status_code == 200
    assert api.delete(f"/api/v1/functions/{name}/url").status_code == 404


def test_cli_sets_shows_and_deletes_a_url(api, node):
    from typer.testing import CliRunner

    from nimbus.cli import app

    name = unique("cli")
    deploy(api, name, PLAIN)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(app, ["url", *args, "--url", node.url])
        assert result.exit_code == 0, result.output
        return result.output

    assert f"/fn/{name}/" in run(name, "--auth", "none", "--cors-origin", "https://a.example", "--cors-max-age", "60")
    shown = json.loads(run(name))
    assert shown["auth"] == "none" and shown["cors"]["allow_origins"] == ["https://a.example"]
    assert shown["cors"]["max_age"] == 60
    assert api.get(f"/fn/{name}/").json() == {"answer": 42, "list": [1, 2]}
    run(name, "--delete")
    assert api.get(f"/fn/{name}/").status_code == 404
    assert runner.invoke(app, ["url", name, "--url", node.url]).exit_code == 1


# ---------------------------------------------------------------- CORS and keys


def test_cors_preflight_is_answered_by_the_node_and_real_responses_carry_cors(api):
    name = unique("cors")
    deploy(api, name, FAILS)  # any call of the function would be a 502
    put_url(api, name, auth="key", cors={"allow_origins": ["https://app.example"], "allow_methods": ["GET", "POST"],
                                         "allow_headers": ["x-custom"], "max_age": 600, "allow_credentials": True,
                                         "expose_headers": ["x-fn"]})
    resp = api.options(f"/fn/{name}/thing", headers={"Origin": "https://app.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "https://app.example"
    assert resp.headers["access-control-allow-methods"] == "GET,POST"
    assert resp.headers["access-control-allow-headers"] == "x-custom"
    assert resp.headers["access-control-max-age"] == "600"
    assert resp.headers["access-control-allow-credentials"] == "true"
    other = api.options(f"/fn/{name}/", headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    assert api.get(f"/api/v1/functions/{name}/invocations").json()["invocations"] == []
    plain = unique("corsok")
    deploy(api, plain, RAW)
    put_url(api, plain, auth="none", cors={"allow_origins": ["*"], "expose_headers": ["x-fn"]})
    resp = api.get(f"/fn/{plain}/", headers={"Origin": "https://any.example"})
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["access-control-expose-headers"] == "x-fn"


def test_auth_key_without_a_valid_key_is_403(api):
    name = unique("keyed")
    deploy(api, name, RAW)
    put_url(api, name, auth="key")
    assert api.get(f"/fn/{name}/").status_code == 403
    assert api.get(f"/fn/{name}/", headers={"Authorization": "Bearer nmb_" + "x" * 43}).status_code == 403
    assert api.get(f"/fn/{name}/", headers={"Authorization": "Basic dTpw"}).status_code == 403


@pytest.fixture(scope="module")
def authed(make_module_node, tmp_path_factory):
    """A node with auth on (SQLite) and keys of two tenants, made in its store before it starts."""
    from nimbus.gateway import auth as gateway_auth
    from nimbus.store import Store

    home = tmp_path_factory.mktemp("authed")
    url = f"sqlite:///{home / 'nimbus.db'}"
    keys = {tenant: gateway_auth.new_key() for tenant in ("default", "acme")}

    async def make_keys() -> None:
        store = await Store.open(url)
        try:
            for tenant, key in keys.items():
                await store.create_api_key(tenant=tenant, name=tenant, key_hash=gateway_auth.hash_key(key),
                                           prefix=gateway_auth.display_prefix(key))
        finally:
            await store.close()

    asyncio.run(make_keys())
    with make_module_node(home, url, auth="on", runtimes=["python3"]) as running:
        yield running, keys


def test_with_node_auth_on_a_url_with_auth_key_needs_the_key_and_hides_it(authed):
    running, keys = authed
    name, open_name = unique("keyed"), unique("open")
    with running.client(headers={"Authorization": f"Bearer {keys['default']}"}) as api:
        deploy(api, name, RAW)
        put_url(api, name, auth="key")
        resp = api.get(f"/fn/{name}/")
        assert resp.status_code == 200, resp.text
        assert "authorization" not in resp.json()["event"]["headers"]  # the node's key stays with the node
        deploy(api, open_name, RAW)
        put_url(api, open_name, auth="none")
    with running.client() as anonymous:
        assert anonymous.get(f"/fn/{name}/").status_code == 403
        assert anonymous.get("/api/v1/functions").status_code == 401  # the rest of the API still needs a key
        assert anonymous.get(f"/fn/{open_name}/").status_code == 200
        # Another Authorization scheme is the app's own: passed on, not refused by the node.
        resp = anonymous.get(f"/fn/{open_name}/", headers={"Authorization": "Bearer app-token"})
        assert resp.status_code == 200 and resp.json()["event"]["headers"]["authorization"] == "Bearer app-token"
    # A key names its tenant: acme's key does not reach the default tenant's function.
    with running.client(headers={"Authorization": f"Bearer {keys['acme']}"}) as acme:
        assert acme.get(f"/fn/{name}/").status_code == 404


# ---------------------------------------------------------------- hostile requests


def test_hostile_requests_are_4xx(api, raw):
    assert api.get(f"/fn/{raw}/%ff%fe").status_code == 400  # requestContext.http.path must decode
    assert api.get(f"/fn/%ff{raw}/").status_code == 400
    assert api.get(f"/fn/{raw}/?a=%ff").status_code == 400
    assert api.get("/fn/").status_code == 400
    assert api.post(f"/fn/{raw}/", content=b"x" * ((6 << 20) + 1)).status_code == 413
    huge = [(f"x-h{i}", "v" * 8000) for i in range(10)]
    assert 400 <= api.get(f"/fn/{raw}/", headers=huge).status_code < 500
    assert api.get(f"/fn/{raw}/", params=[("k", "v")] * 2000).status_code == 400


# ---------------------------------------------------------------- real web apps


@pytest.fixture(scope="module", params=["fastapi", "express"])
def webapp(request, node):
    with node.client() as api:
        name = unique(request.param)
        if request.param == "fastapi":
            deploy(api, name, files=FASTAPI_APP, handler="main.handler")
        else:
            deploy(api, name, files=EXPRESS_APP, runtime="nodejs", handler="index.handler")
        put_url(api, name, auth="none")
        yield name


def test_web_app_json_query_and_form(api, webapp):
    resp = api.get(f"/fn/{webapp}/hello", params=[("tag", "a"), ("tag", "b"), ("q", "x y")])
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"tags": ["a", "b"], "q": "x y"}
    resp = api.post(f"/fn/{webapp}/json", json={"n": [1, 2], "s": "é"})
    assert resp.status_code == 200 and resp.json() == {"got": {"n": [1, 2], "s": "é"}}
    resp = api.post(f"/fn/{webapp}/form", data={"a": "1", "b": "two words"})
    assert resp.status_code == 200, resp.text
    form = resp.json()["form"]
    assert {k: v if isinstance(v, str) else v[0] for k, v in form.items()} == {"a": "1", "b": "two words"}


def test_web_app_binary_round_trip(api, webapp):
    image = png(64, 64)
    resp = api.post(f"/fn/{webapp}/image", content=image, headers={"content-type": "image/png"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("image/png")
    assert resp.content == image


def test_web_app_cookies_redirects_and_its_own_404(api, webapp):
    resp = api.get(f"/fn/{webapp}/cookies/set")
    assert resp.status_code == 200
    assert sorted(c.split(";")[0] for c in resp.headers.get_list("set-cookie")) == ["session=abc123", "theme=dark"]
    resp = api.get(f"/fn/{webapp}/cookies/read", headers={"Cookie": "session=abc123; theme=dark"})
    assert resp.json() == {"cookies": {"session": "abc123", "theme": "dark"}}
    resp = api.get(f"/fn/{webapp}/go")
    assert resp.status_code == 302 and resp.headers["location"] == "/fn/elsewhere/"
    resp = api.get(f"/fn/{webapp}/no/such/page")
    assert resp.status_code == 404
    assert resp.headers["x-amzn-requestid"]  # the app's 404, served through a call, not the node's


def test_a_url_qualifier_that_is_no_alias_name_is_refused_before_the_store(api):
    """Fuzzing found a NUL in ``?qualifier=`` reaching PostgreSQL (a 503); now every route refuses it."""
    for method in ("GET", "DELETE"):
        resp = api.request(method, "/api/v1/functions/no-such-fn/url", params={"qualifier": "a\x00b"})
        assert resp.status_code in (400, 422), resp.text
        assert "alias name" in resp.json()["detail"]
