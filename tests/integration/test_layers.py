"""Dependency layers end to end on a real node, with real PyPI and npm downloads: requirements.txt and
package.json resolved at create time into a cached layer that machines mount read-only at /opt/layer;
the second function with the same dependencies reuses it without downloading; bad manifests and unknown
packages are 422s; layers are listed and collected by gc once nothing uses them."""

import base64
import json
import os
import uuid
from pathlib import Path

import pytest
from test_api import assert_problem, invoke
from test_packages import zipped

pytestmark = pytest.mark.sandbox

# Pure Python (six) and a compiled wheel (markupsafe's C speedups).
REQUIREMENTS = "six==1.16.0\nmarkupsafe==3.0.2  # compiled\n"
PYTHON_APP = {
    "app.py": (
        "import os, six, markupsafe\n"
        "from markupsafe import _speedups\n"
        "from helpers.fmt import shout\n"
        "def handler(event, context):\n"
        "    try:\n"
        "        open('/opt/layer/planted.py', 'w')\n"
        "        wrote = True\n"
        "    except OSError as exc:\n"
        "        wrote = exc.__class__.__name__\n"
        "    return {'six': six.__version__, 'escaped': str(markupsafe.escape(event['html'])),\n"
        "            'compiled': _speedups.__file__.endswith('.so'), 'six_file': six.__file__,\n"
        "            'shout': shout(event['html']), 'layer_write': wrote}\n"
    ),
    "helpers/__init__.py": "",
    "helpers/fmt.py": "def shout(s):\n    return s.upper()\n",
    "requirements.txt": REQUIREMENTS,
}

FASTAPI_APP = {
    "main.py": (
        "from fastapi import FastAPI\n"
        "from mangum import Mangum\n"
        "from pydantic import BaseModel\n"
        "app = FastAPI()\n"
        "class Item(BaseModel):\n"
        "    name: str\n"
        "    qty: int = 1\n"
        "@app.get('/items/{item_id}')\n"
        "def read_item(item_id: int, q: str | None = None):\n"
        "    return {'item_id': item_id, 'q': q}\n"
        "@app.post('/items')\n"
        "def make_item(item: Item):\n"
        "    return {'made': item.name, 'qty': item.qty}\n"
        "handler = Mangum(app, lifespan='off')\n"
    ),
    "requirements.txt": "fastapi\nmangum\npydantic\n",
}

# A lock as `npm install --package-lock-only` writes it (this npm omits "resolved" by configuration).
NODE_PACKAGE_JSON = '{"name": "thumb", "version": "1.0.0", "dependencies": {"ms": "2.1.3"}}'
NODE_LOCK = json.dumps({
    "name": "thumb", "version": "1.0.0", "lockfileVersion": 3, "requires": True,
    "packages": {
        "": {"name": "thumb", "version": "1.0.0", "dependencies": {"ms": "2.1.3"}},
        "node_modules/ms": {
            "version": "2.1.3",
            "integrity": "sha512-6FlzubTLZG3J2a/NVCAleEhjzq5oxgHyaCU9yYXvcLsvoVaHJq/s5xXI6/XXP6tz7R9xAOtHnSO/tXtF3WRTlA==",
            "license": "MIT",
        },
    },
})


def api_gateway_event(method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
    """An API Gateway (REST, payload 1.0) proxy event, as Lambda hands it to a function behind one."""
    return {
        "resource": "/{proxy+}", "path": path, "httpMethod": method,
        "headers": {"content-type": "application/json", "host": "api.example.com"},
        "multiValueHeaders": {"content-type": ["application/json"], "host": ["api.example.com"]},
        "queryStringParameters": query, "multiValueQueryStringParameters":
            {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": {"proxy": path.lstrip("/")}, "stageVariables": None,
        "requestContext": {"resourcePath": "/{proxy+}", "httpMethod": method, "path": f"/prod{path}",
                           "stage": "prod", "requestId": uuid.uuid4().hex, "identity": {"sourceIp": "10.0.0.1"}},
        "body": json.dumps(body) if body is not None else None, "isBase64Encoded": False,
    }


def deploy(api, files: dict, runtime: str, handler: str, name: str | None = None):
    name = name or f"lay-{uuid.uuid4().hex[:8]}"
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": runtime, "handler": handler,
                                               "code_base64": zipped(files)}, timeout=600)
    return name, resp


def test_a_python_package_with_a_pure_and_a_compiled_dependency_from_pypi(api):
    name, resp = deploy(api, PYTHON_APP, "python3", "app.handler")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["layer_sha256"] and body["layer"]["sha256"] == body["layer_sha256"]
    assert "python3.11" in body["layer"]["platform"]
    assert "six" in body["layer"]["log"] and "markupsafe" in body["layer"]["log"].lower()
    out = invoke(api, name, {"html": "<b>hi</b>"})
    assert out["status"] == "succeeded", out
    assert out["output"]["six"] == "1.16.0"
    assert out["output"]["escaped"] == "&lt;b&gt;hi&lt;/b&gt;"
    assert out["output"]["compiled"] is True
    assert out["output"]["six_file"].startswith("/opt/layer/")
    assert out["output"]["shout"] == "<B>HI</B>"
    assert out["output"]["layer_write"] in ("OSError", "PermissionError")  # EROFS: the layer is read-only
    assert out["start"] == "cold"  # blank machines have no layer: the first call makes its machine
    assert invoke(api, name, {"html": "x"})["start"] == "hot"


def test_a_second_function_with_the_same_requirements_reuses_the_layer_without_downloading(api, node):
    first, resp = deploy(api, PYTHON_APP, "python3", "app.handler")
    assert resp.status_code == 201, resp.text
    builds = node.node.compiler.builds_run
    files = dict(PYTHON_APP, **{"app.py": "import six\ndef handler(event, context):\n    return six.__version__\n"})
    second, resp = deploy(api, files, "python3", "app.handler")
    assert resp.status_code == 201, resp.text
    assert resp.json()["layer"]["cached"] is True
    assert resp.json()["layer_sha256"] == api.get(f"/api/v1/functions/{first}").json()["layer_sha256"]
    assert node.node.compiler.builds_run == builds  # no pip ran
    assert invoke(api, second, {})["output"] == "1.16.0"
    layers = {layer["sha256"]: layer for layer in api.get("/api/v1/layers").json()["layers"]}
    shared = layers[resp.json()["layer_sha256"]]
    assert {first, second} <= set(shared["functions"])
    assert shared["runtime"] == "python3" and shared["size"] > 0
    assert len(list((Path(node.node.settings.home) / "layers").glob("[0-9a-f]*"))) >= 1


def test_a_fastapi_app_wrapped_with_mangum_answers_api_gateway_events(api):
    name, resp = deploy(api, FASTAPI_APP, "python3", "main.handler")
    assert resp.status_code == 201, resp.text
    assert "pydantic_core" in resp.json()["layer"]["log"].replace("-", "_")  # a compiled wheel, fetched
    out = invoke(api, name, api_gateway_event("GET", "/items/42", query={"q": "blue"}))
    assert out["status"] == "succeeded", out
    assert out["output"]["statusCode"] == 200
    assert json.loads(out["output"]["body"]) == {"item_id": 42, "q": "blue"}
    out = invoke(api, name, api_gateway_event("POST", "/items", body={"name": "bolt", "qty": 3}))
    assert json.loads(out["output"]["body"]) == {"made": "bolt", "qty": 3}
    out = invoke(api, name, api_gateway_event("POST", "/items", body={"qty": "many"}))
    assert out["output"]["statusCode"] == 422  # pydantic validation, inside the function
    assert out["start"] == "hot"


def test_a_node_package_with_an_npm_dependency_from_cjs_and_an_es_module(api):
    files = {
        "package.json": NODE_PACKAGE_JSON,
        "package-lock.json": NODE_LOCK,
        "index.js": "const ms = require('ms');\nconst { unit } = require('./lib/unit');\n"
                    "exports.handler = async (event) => ({ ms: ms(event.span), unit, from: require.resolve('ms') });\n",
        "lib/unit.js": "exports.unit = 'ms';\n",
        "esm/handler.mjs": "import ms from 'ms';\nexport const handler = async (event) => ({ long: ms(event.n, { long: true }) });\n",
    }
    name, resp = deploy(api, files, "nodejs", "index.handler")
    assert resp.status_code == 201, resp.text
    assert resp.json()["layer"]["platform"].startswith("node v")
    out = invoke(api, name, {"span": "2 days"})
    assert out["status"] == "succeeded", out
    assert out["output"]["ms"] == 172800000 and out["output"]["unit"] == "ms"
    assert out["output"]["from"].startswith(("/opt/layer/", "/var/task/node_modules/"))
    esm, resp = deploy(api, files, "nodejs", "esm/handler.handler")
    assert resp.status_code == 201, resp.text
    assert resp.json()["layer"]["cached"] is True
    out = invoke(api, esm, {"n": 60000})
    assert out["status"] == "succeeded", out
    assert out["output"] == {"long": "1 minute"}


def test_an_npm_package_with_an_install_script_is_rebuilt_in_the_builder_sandbox(api):
    """esbuild's postinstall runs (in the builder sandbox, not on the host); its native binary then runs
    inside the machine, from the read-only layer."""
    files = {
        "package.json": '{"name": "ts", "version": "1.0.0", "dependencies": {"esbuild": "0.25.0"}}',
        "index.js": "const esbuild = require('esbuild');\n"
                    "exports.handler = async (event) => esbuild.transformSync(event.ts, { loader: 'ts' }).code;\n",
    }
    name, resp = deploy(api, files, "nodejs", "index.handler")
    assert resp.status_code == 201, resp.text
    log = resp.json()["layer"]["log"]
    assert "ran the install scripts of esbuild in the builder sandbox" in log and "node install.js" in log, log
    out = invoke(api, name, {"ts": "const n: number = 1 + 1;"})
    assert out["status"] == "succeeded", out
    assert out["output"] == "const n = 1 + 1;\n"


@pytest.mark.parametrize(("runtime", "files", "words"), [
    ("python3", {"app.py": "def handler(e, c): pass\n", "requirements.txt": "nimbus-no-such-package-4b1d==1.0\n"},
     ["nimbus-no-such-package-4b1d", "No matching distribution", "in the builder sandbox"]),
    ("python3", {"app.py": "def handler(e, c): pass\n", "requirements.txt": "six==0.0.999\n"},
     ["six==0.0.999", "Could not find a version"]),
    ("python3", {"app.py": "def handler(e, c): pass\n", "requirements.txt": "six==1.16.0\nsix==1.15.0\n"},
     ["ResolutionImpossible", "conflict"]),
    ("nodejs", {"index.js": "exports.handler = async () => 1;\n",
                "package.json": '{"dependencies": {"nimbus-no-such-package-4b1d": "1.0.0"}}'},
     ["package.json", "nimbus-no-such-package-4b1d"]),
])
def test_unknown_packages_are_a_422_with_the_tools_message(api, runtime, files, words):
    handler = "app.handler" if runtime == "python3" else "index.handler"
    name, resp = deploy(api, files, runtime, handler)
    problem = assert_problem(resp, 422)
    for word in words:
        assert word in problem["detail"], problem["detail"]
    assert api.get(f"/api/v1/functions/{name}").status_code == 404  # nothing was stored


@pytest.mark.parametrize(("runtime", "manifest", "words"), [
    ("python3", "-r /etc/shadow\n", ["line 1", "-r"]),
    ("python3", "six\n--index-url http://evil.example/simple\n", ["line 2", "--index-url"]),
    ("python3", "pkg @ file:///etc/passwd\n", ["URL or path"]),
    ("python3", "six==\n", ["not a requirement"]),
    ("nodejs", '{"dependencies": {"x": "file:../../etc"}}', ["file:../../etc", "registry"]),
    ("nodejs", '{"dependencies": {"x": "git+https://example.com/x.git"}}', ["registry"]),
    ("nodejs", '{"dependencies": ["ms"]}', ["dependencies must be an object"]),
    ("nodejs", '{"dependencies": {"ms": "2.1.3"}', ["not valid JSON"]),
])
def test_manifests_that_reach_outside_the_registry_are_refused(api, runtime, manifest, words):
    files = ({"app.py": "def handler(e, c): pass\n", "requirements.txt": manifest} if runtime == "python3"
             else {"index.js": "exports.handler = async () => 1;\n", "package.json": manifest})
    _, resp = deploy(api, files, runtime, "app.handler" if runtime == "python3" else "index.handler")
    problem = assert_problem(resp, 422)
    for word in words:
        assert word in problem["detail"], problem["detail"]


def test_a_lock_file_pointing_at_a_host_path_is_refused(api):
    lock = json.loads(NODE_LOCK)
    lock["packages"]["node_modules/ms"]["resolved"] = "file:/etc/passwd"
    files = {"index.js": "exports.handler = async () => 1;\n", "package.json": NODE_PACKAGE_JSON,
             "package-lock.json": json.dumps(lock)}
    _, resp = deploy(api, files, "nodejs", "index.handler")
    assert "file:/etc/passwd" in assert_problem(resp, 422)["detail"]


def test_a_package_without_dependencies_has_no_layer_and_starts_warm(api):
    files = {"app.py": "def handler(e, c):\n    return 1\n", "requirements.txt": "# nothing yet\n\n"}
    name, resp = deploy(api, files, "python3", "app.handler")
    assert resp.status_code == 201, resp.text
    assert resp.json()["layer_sha256"] is None and "layer" not in resp.json()
    assert invoke(api, name, {})["output"] == 1


def test_a_new_version_without_requirements_drops_the_layer_and_settings_keep_it(api):
    name, resp = deploy(api, PYTHON_APP, "python3", "app.handler")
    layer = resp.json()["layer_sha256"]
    resp = api.put(f"/api/v1/functions/{name}", json={"memory_mb": 192})
    assert resp.status_code == 200 and resp.json()["layer_sha256"] == layer
    assert invoke(api, name, {"html": "&"})["output"]["escaped"] == "&amp;"
    code = base64.b64decode(zipped({"app.py": "import importlib.util\ndef handler(e, c):\n"
                                               "    return importlib.util.find_spec('markupsafe') is None\n"}))
    resp = api.put(f"/api/v1/functions/{name}", json={"code_base64": base64.b64encode(code).decode()})
    assert resp.status_code == 200 and resp.json()["layer_sha256"] is None
    assert invoke(api, name, {})["output"] is True  # the new version's machine has no layer


def test_gc_removes_a_layer_only_once_no_function_uses_it(api, node):
    files = dict(PYTHON_APP, **{"requirements.txt": "six==1.15.0\n",
                                "app.py": "import six\ndef handler(e, c):\n    return six.__version__\n"})
    name, resp = deploy(api, files, "python3", "app.handler")
    layer = resp.json()["layer_sha256"]
    assert invoke(api, name, {})["output"] == "1.15.0"  # unpacked on this node now
    unpacked = Path(node.node.settings.home) / "layers" / layer
    assert unpacked.is_dir()
    detail = api.get(f"/api/v1/layers/{layer}").json()
    assert detail["functions"] == [name] and "six" in detail["log"]
    kept = api.post("/api/v1/gc", params={"grace_s": 0}).json()
    assert layer in {item["sha256"] for item in api.get("/api/v1/layers").json()["layers"]}
    assert unpacked.is_dir() and kept["unpacked"] >= 0
    assert api.delete(f"/api/v1/functions/{name}").status_code == 204
    assert api.post("/api/v1/gc", params={"grace_s": 3600}).json()["layers"] == 0  # too young yet
    gone = api.post("/api/v1/gc", params={"grace_s": 0}).json()
    assert gone["layers"] >= 1 and gone["artifacts"] >= 1 and gone["bytes"] > 0 and gone["unpacked"] >= 1
    assert layer not in {item["sha256"] for item in api.get("/api/v1/layers").json()["layers"]}
    assert not unpacked.exists()
    assert_problem(api.get(f"/api/v1/layers/{layer}"), 404)
    # The same requirements again: resolved anew, and they work.
    name, resp = deploy(api, files, "python3", "app.handler")
    assert resp.status_code == 201 and resp.json()["layer"]["cached"] is False
    assert invoke(api, name, {})["output"] == "1.15.0"


def test_layers_unpack_with_readable_permissions(api, node):
    name, resp = deploy(api, PYTHON_APP, "python3", "app.handler")
    invoke(api, name, {"html": ""})
    root = Path(node.node.settings.home) / "layers" / resp.json()["layer_sha256"]
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        assert mode & 0o004, path  # readable by the machine's uid 65534
        assert not mode & 0o022, path  # writable by no one but the node
    assert os.path.isdir(root / "six.py") is False and (root / "six.py").is_file()
