"""The bundled AWS SDK (issue 17): Lambda handlers import boto3 and the @aws-sdk v3 clients without
declaring them. Real nodes, real bwrap machines (template children and booted sandboxes), the real SDK
built once per host from PyPI and npm into the shared cache (NIMBUS_SDK_CACHE)."""

import asyncio
import base64
import io
import os
import subprocess
import sys
import uuid
import zipfile

import pytest

from nimbus.agent.base import FunctionSpec, InvocationError
from nimbus.agent.contract import SDK_DIRS
from nimbus.compiler import sdk

pytestmark = pytest.mark.sandbox

BOTO3 = next(pin.split("==")[1] for pin in sdk.PYTHON_PINS if pin.startswith("boto3=="))
S3_CLIENT = sdk.NODE_PINS["@aws-sdk/client-s3"]
OWN_BOTO3 = "1.35.0"  # what a function pins for itself: older than the bundled one

PY_HANDLER = (
    "import boto3, botocore\n"
    "def handler(event, context):\n"
    "    try:\n"
    "        open(boto3.__file__, 'a')\n"
    "        wrote = True\n"
    "    except OSError as exc:\n"
    "        wrote = exc.__class__.__name__\n"
    "    session = boto3.session.Session(region_name='eu-west-1')\n"
    "    return {'boto3': boto3.__version__, 'botocore': botocore.__version__, 'file': boto3.__file__,\n"
    "            'region': session.region_name, 'write': wrote}\n"
)
CJS_HANDLER = (
    "const { S3Client } = require('@aws-sdk/client-s3');\n"
    "const fs = require('fs');\n"
    "exports.handler = async () => {\n"
    "  const client = new S3Client({ region: 'eu-west-1' });\n"
    "  const from = require.resolve('@aws-sdk/client-s3');\n"
    "  let wrote = true;\n"
    "  try { fs.writeFileSync('/node_modules/planted.js', 'x'); } catch (err) { wrote = err.code; }\n"
    "  return { region: await client.config.region(), from, wrote,\n"
    "           version: require('@aws-sdk/client-s3/package.json').version };\n"
    "};\n"
)
ESM_HANDLER = (
    "import { S3Client, ListBucketsCommand } from '@aws-sdk/client-s3';\n"
    "export const handler = async () => {\n"
    "  const client = new S3Client({ region: 'ap-south-1' });\n"
    "  return { region: await client.config.region(), command: typeof ListBucketsCommand };\n"
    "};\n"
)


def zipped(files: dict[str, str]) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return base64.b64encode(buffer.getvalue()).decode()


def create(api, runtime: str, handler: str, **code) -> str:
    name = f"sdk-{uuid.uuid4().hex[:8]}"
    resp = api.post("/api/v1/functions", json={"name": name, "runtime": runtime, "handler": handler, **code})
    assert resp.status_code == 201, resp.text
    return name


def invoke(api, name: str) -> dict:
    resp = api.post(f"/api/v1/functions/{name}/invoke", json={})
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module", params=["auto", "off"])
def sdk_api(request, make_module_node, tmp_path_factory):
    """A node with the SDK on (the default), its machines forked from templates (auto, on a root node with
    cgroups) or booted (off); the SDK comes from the host's shared cache."""
    home = tmp_path_factory.mktemp("sdk-home")
    with make_module_node(home, f"sqlite:///{home / 'nimbus.db'}", templates=request.param) as running, \
            running.client() as client:
        yield client


@pytest.fixture(scope="module")
def off_api(make_module_node, tmp_path_factory):
    home = tmp_path_factory.mktemp("sdk-off-home")
    with make_module_node(home, f"sqlite:///{home / 'nimbus.db'}", sdk_layer=False) as running, \
            running.client() as client:
        yield client


def test_a_python_handler_imports_boto3_at_module_level_from_a_read_only_sdk(sdk_api):
    out = invoke(sdk_api, create(sdk_api, "python3", "index.handler", code=PY_HANDLER))
    assert out["status"] == "succeeded", out
    assert out["output"]["boto3"] == BOTO3 and out["output"]["botocore"] == BOTO3
    assert out["output"]["file"].startswith(SDK_DIRS["python3"] + "/")
    assert out["output"]["region"] == "eu-west-1"
    assert out["output"]["write"] in ("OSError", "PermissionError")  # EROFS, or EACCES before it


def test_a_boto3_the_function_pins_in_requirements_wins(sdk_api):
    code = zipped({"app.py": PY_HANDLER, "requirements.txt": f"boto3=={OWN_BOTO3}\n"})
    out = invoke(sdk_api, create(sdk_api, "python3", "app.handler", code_base64=code))
    assert out["status"] == "succeeded", out
    assert out["output"]["boto3"] == OWN_BOTO3 and out["output"]["botocore"] != BOTO3
    assert out["output"]["file"].startswith("/opt/layer/")


def test_a_commonjs_handler_requires_an_sdk_client(sdk_api):
    out = invoke(sdk_api, create(sdk_api, "nodejs", "index.handler", code=CJS_HANDLER))
    assert out["status"] == "succeeded", out
    assert out["output"]["region"] == "eu-west-1" and out["output"]["version"] == S3_CLIENT
    assert out["output"]["from"].startswith("/node_modules/@aws-sdk/client-s3/")
    assert out["output"]["wrote"] in ("EROFS", "EACCES")


def test_an_es_module_handler_imports_an_sdk_client(sdk_api):
    out = invoke(sdk_api, create(sdk_api, "nodejs", "index.handler", code_base64=zipped({"index.mjs": ESM_HANDLER})))
    assert out["status"] == "succeeded", out
    assert out["output"] == {"region": "ap-south-1", "command": "function"}


@pytest.mark.parametrize(("runtime", "code"), [("python3", PY_HANDLER), ("nodejs", CJS_HANDLER)])
def test_with_the_sdk_off_the_import_fails(off_api, runtime, code):
    out = invoke(off_api, create(off_api, runtime, "index.handler", code=code))
    assert out["status"] == "failed" and out["error"]["type"] == "ImportModuleError", out


def test_the_init_header_names_only_the_runtimes_own_sdk_directory():
    header = {"runtime": "python3", "handler": "app.handler", "filename": "app.py"}
    assert FunctionSpec({**header, "sdk": SDK_DIRS["python3"]}, "/var/task").sdk == SDK_DIRS["python3"]
    assert FunctionSpec(header, "/var/task").sdk is None
    for wrong in ("/etc", SDK_DIRS["nodejs"], "/opt/sdk/python/../../etc"):
        with pytest.raises(InvocationError, match="'sdk'"):
            FunctionSpec({**header, "sdk": wrong}, "/var/task")


async def test_builders_racing_on_an_empty_cache_build_it_once(tmp_path, caplog):
    """Two builders (as two nodes starting together) on one empty cache: one builds, the other waits for
    it and gets the same tree; nothing half-built is left behind."""
    cache = tmp_path / "sdk"
    caplog.set_level("INFO", logger="nimbus.sdk")
    first, second = await asyncio.gather(sdk.ensure("python3", cache, sdk.layer_builder(cache)),
                                         sdk.ensure("python3", cache, sdk.layer_builder(cache)))
    assert first == second and (first / "boto3" / "__init__.py").is_file()
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [first.name]
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{first.name[:16]}-")]
    assert sdk.versions("python3", first)["boto3"] == BOTO3
    assert (first.stat().st_mode & 0o777) == 0o755
    assert sum("building the python3 AWS SDK into" in r.getMessage() for r in caplog.records) == 1


def nimbus_sdk(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nimbus.cli", "sdk", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})


def test_the_sdk_command_builds_ahead_and_says_where():
    """What `make run` and `make test` run first (the host's shared cache: built once, then a look-up)."""
    done = nimbus_sdk("--runtime", "python3")
    assert done.returncode == 0, done.stderr
    assert f"boto3@{BOTO3}" in done.stdout and "nodejs" not in done.stdout
    off = nimbus_sdk(NIMBUS_SDK_LAYER="false")
    assert off.returncode == 0 and "nothing to build" in off.stderr + off.stdout
    wrong = nimbus_sdk("--runtime", "go")
    assert wrong.returncode == 2 and "no bundled SDK for go" in wrong.stderr
