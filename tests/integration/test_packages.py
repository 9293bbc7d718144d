"""Many-file packages (a zip in code_base64) for python3 and nodejs, end to end on a real node; and the
zips the API must refuse, each with a 422 naming the entry. (Dependency layers are not built yet.)"""

import base64
import io
import stat
import uuid
import zipfile

import pytest
from test_api import assert_problem, invoke

pytestmark = pytest.mark.sandbox


def zipped(files: dict[str, bytes | str], links: dict[str, str] | None = None) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return base64.b64encode(buffer.getvalue()).decode()


def create(api, code_base64: str, runtime: str, handler: str, **fields):
    name = f"pkg-{uuid.uuid4().hex[:8]}"
    return name, api.post("/api/v1/functions", json={"name": name, "runtime": runtime, "handler": handler,
                                                      "code_base64": code_base64, **fields})


PYTHON_PACKAGE = {
    "api/__init__.py": "",
    "api/app.py": (
        "import os\n"
        "from .helpers.greet import greet\n"
        "from . import settings\n"
        "def handler(event, context):\n"
        "    here = os.path.dirname(__file__)\n"
        "    with open(os.path.join(here, 'data', 'motd.txt')) as f:\n"
        "        motd = f.read().strip()\n"
        "    return {'greeting': greet(event['name']), 'file': __file__, 'motd': motd, 'level': settings.LEVEL}\n"
    ),
    "api/settings.py": "LEVEL = 'debug'\n",
    "api/helpers/__init__.py": "",
    "api/helpers/greet.py": "def greet(name):\n    return 'hello ' + name\n",
    "api/data/motd.txt": "packaged data\n",
}


def test_a_python_package_with_subpackages_relative_imports_and_data(api):
    name, resp = create(api, zipped(PYTHON_PACKAGE), "python3", "api.app.handler")
    assert resp.status_code == 201, resp.text
    assert resp.json()["code_kind"] == "zip"
    out = invoke(api, name, {"name": "pkg"})
    assert out["status"] == "succeeded", out
    assert out["output"] == {"greeting": "hello pkg", "file": "/var/task/api/app.py", "motd": "packaged data",
                             "level": "debug"}
    assert invoke(api, name, {"name": "again"})["start"] == "hot"


def test_a_handler_may_name_its_module_as_a_path(api):
    name, resp = create(api, zipped(PYTHON_PACKAGE), "python3", "api/app.handler")
    assert resp.status_code == 201, resp.text
    assert invoke(api, name, {"name": "p"})["output"]["greeting"] == "hello p"


def test_a_node_package_with_local_requires_and_an_es_module_handler(api):
    files = {
        "index.js": "const { double } = require('./lib/math');\n"
                    "const cfg = require('./config.json');\n"
                    "exports.handler = async (event) => ({ doubled: double(event.n), name: cfg.name, dir: __dirname });\n",
        "lib/math.js": "exports.double = (n) => n * 2;\n",
        "config.json": '{"name": "from-json"}',
    }
    name, resp = create(api, zipped(files), "nodejs", "index.handler")
    assert resp.status_code == 201, resp.text
    assert invoke(api, name, {"n": 21})["output"] == {"doubled": 42, "name": "from-json", "dir": "/var/task"}

    esm = {
        "src/handler.mjs": "import { triple } from './util.mjs';\n"
                           "export const handler = async (event) => ({ tripled: triple(event.n) });\n",
        "src/util.mjs": "export const triple = (n) => n * 3;\n",
    }
    name, resp = create(api, zipped(esm), "nodejs", "src/handler.handler")
    assert resp.status_code == 201, resp.text
    assert invoke(api, name, {"n": 5})["output"] == {"tripled": 15}

    typed = {  # "type": "module": .js files are ES modules
        "package.json": '{"name": "typed", "type": "module"}',
        "app.js": "import { readFileSync } from 'node:fs';\n"
                  "export const handler = async () => JSON.parse(readFileSync(new URL('./package.json', "
                  "import.meta.url))).name;\n",
    }
    name, resp = create(api, zipped(typed), "nodejs", "app.handler")
    assert resp.status_code == 201, resp.text
    assert invoke(api, name)["output"] == "typed"


@pytest.mark.parametrize(("files", "links", "handler", "words"), [
    ({"../evil.py": "x", "main.py": "def handler(e, c): pass"}, None, "main.handler", ["../evil.py", ".."]),
    ({"/etc/evil.py": "x", "main.py": "def handler(e, c): pass"}, None, "main.handler", ["/etc/evil.py", "absolute"]),
    ({"main.py": "def handler(e, c): pass"}, {"secrets": "/etc/shadow"}, "main.handler",
     ["secrets", "out of the package"]),
    ({"main.py": "def handler(e, c): pass"}, {"up": "../../x"}, "main.handler", ["up", "out of the package"]),
    ({"main.py": "def handler(e, c): pass", "bomb.bin": b"\0" * (8 << 20)}, None, "main.handler",
     ["bomb.bin", "zip bomb"]),
    ({"app.py": "def handler(e, c): pass"}, None, "main.handler", ["main.py", "app.py"]),
])
def test_bad_packages_are_refused_naming_the_entry(api, files, links, handler, words):
    name, resp = create(api, zipped(files, links), "python3", handler)
    assert_problem(resp, 422, *words)
    assert api.get(f"/api/v1/functions/{name}").status_code == 404  # nothing was stored


def test_a_corrupt_zip_and_a_zip_for_a_compiled_runtime_are_refused(api):
    good = base64.b64decode(zipped({"main.py": "def handler(e, c):\n    return 1\n"}))
    broken = good[:40] + b"\xff" * 10 + good[50:]
    name, resp = create(api, base64.b64encode(broken).decode(), "python3", "main.handler")
    assert_problem(resp, 422, "package")
    name, resp = create(api, zipped({"main.go": "package main"}), "go", "main.Handle")
    assert_problem(resp, 422, "python3 and nodejs")
    name, resp = create(api, base64.b64encode(good).decode(), "python3", "main.handler")
    assert resp.status_code == 201 and invoke(api, name)["output"] == 1  # and the node still serves


def test_a_call_cannot_rewrite_the_code_later_calls_load(api, node):
    """On template machines the init makes /var/task read-only before the function's code loads
    (Lambda's is read-only too); booted machines have no init that may remount, and leave it writable."""
    files = {
        "app.py": "import errno, os\n"
                  "def handler(event, context):\n"
                  "    tried = {}\n"
                  "    for path in ('/var/task/app.py', '/var/task/planted.py'):\n"
                  "        try:\n"
                  "            with open(path, 'w') as f:\n"
                  "                f.write('def handler(e, c):\\n    return \"hijacked\"\\n')\n"
                  "            tried[path] = 0\n"
                  "        except OSError as exc:\n"
                  "            tried[path] = exc.errno\n"
                  "    return tried\n",
    }
    name, resp = create(api, zipped(files), "python3", "app.handler")
    assert resp.status_code == 201, resp.text
    out = invoke(api, name, {})
    sealed = node.node.driver.templates_on
    expected = 30 if sealed else 0  # EROFS
    assert out["output"] == {"/var/task/app.py": expected, "/var/task/planted.py": expected}, out
    if sealed:
        assert invoke(api, name, {})["output"] == out["output"]  # the same code answers again
